// The prompt products of prompt_gemm.h on AVX-512 VNNI: panels of 16 rows (or outputs), one per 32-bit
// lane of a 512-bit vector, and `vpdpbusd` for four u8 x s8 products at a time. Included by prompt_gemm.h
// after what both forms share.

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
namespace prompt_gemm_vnni {

constexpr int PANEL = 16;  // rows per panel: one per 32-bit lane
constexpr int MAX_TOKENS = 8;  // tokens per pass over a panel: 8 int + 8 float accumulators in registers

// 16 fp32 results to y (those of `live` lanes), as fp32 or rounded to bf16 (to nearest, ties to even,
// as at::BFloat16 rounds), so that a bf16 prompt's product needs no conversion op after it.
inline void store16(float* y, __mmask16 live, __m512 v) { _mm512_mask_storeu_ps(y, live, v); }
inline void store16(at::BFloat16* y, __mmask16 live, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_mask_storeu_epi16(y, live, _mm512_cvtepi32_epi16(rounded));
}

// The 32-bit word at p + r * stride of each of a panel's rows r (one gather; lanes past `rows` are 0).
struct RowWords {
  __mmask16 live;
  __m512i offsets;
  RowWords(int64_t stride, int rows)
      : live(static_cast<__mmask16>((1u << rows) - 1)),
        offsets(_mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                   _mm512_set1_epi32(static_cast<int32_t>(stride)))) {}
  __m512i at(const uint8_t* p) const { return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offsets, p, 1); }
};

// A panel of up to 16 rows in VNNI order: per block, 8 vectors (4 weights of each row, 32 weights in
// all), and the rows' scales and mins as floats. (Plain arrays, read with unaligned loads: a std::vector
// of 512-bit vectors is not 64-byte aligned here.)
struct Panel {
  std::vector<int32_t> codes;  // [nb * 8][16]
  std::vector<float> d, m;     // [nb][16]
  __m512i code(int64_t i) const { return _mm512_loadu_si512(codes.data() + 16 * i); }
  __m512 scale(int64_t b) const { return _mm512_loadu_ps(d.data() + 16 * b); }
  __m512 min(int64_t b) const { return _mm512_loadu_ps(m.data() + 16 * b); }
  void resize(int64_t nb) {
    codes.resize(nb * 8 * 16);
    d.resize(nb * 16);
    m.resize(nb * 16);
  }
  // Four code bytes per row: their low nibbles are code vector `low`, their high nibbles vector `high`.
  void put_codes(int64_t low, int64_t high, __m512i bytes) {
    const __m512i mask = _mm512_set1_epi8(0x0F);
    _mm512_storeu_si512(codes.data() + 16 * low, _mm512_and_si512(bytes, mask));
    _mm512_storeu_si512(codes.data() + 16 * high, _mm512_and_si512(_mm512_srli_epi16(bytes, 4), mask));
  }
  void put_scales(int64_t b, __m512 scale, __m512 min) {
    _mm512_storeu_ps(d.data() + 16 * b, scale);
    _mm512_storeu_ps(m.data() + 16 * b, min);
  }
  void fill(const uint8_t* w, int64_t stride, int rows, int64_t nb, bool q4_k) {
    if (q4_k) return fill_q4_k(w, stride, rows, nb);
    resize(nb);
    const RowWords words(stride, rows);
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = w + b * Q4_1_BYTES;
      const __m512i heads = words.at(blk);  // (d, m) fp16 pairs
      put_scales(b, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(heads)), _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(heads, 16))));
      for (int g = 0; g < 4; ++g)  // bytes 4g..4g+3 of the codes: weights 4g.. (low nibbles), 16 + 4g.. (high)
        put_codes(b * 8 + g, b * 8 + 4 + g, words.at(blk + 4 + 4 * g));
    }
  }
  // Q4_K super-blocks (144 bytes: fp16 d, dmin; 12 bytes of 6-bit scale/min pairs; 128 bytes of codes,
  // sub-blocks 2i and 2i + 1 the low and high nibbles of bytes 32 i ..), each as 8 blocks of 32.
  void fill_q4_k(const uint8_t* w, int64_t stride, int rows, int64_t nb) {
    resize(nb);
    const RowWords words(stride, rows);
    const __m512i six = _mm512_set1_epi32(63);
    auto byte = [](__m512i v, int i) { return _mm512_and_si512(_mm512_srli_epi32(v, 8 * i), _mm512_set1_epi32(255)); };
    for (int64_t sb = 0; sb < nb / 8; ++sb) {
      const uint8_t* blk = w + sb * Q4_K_BYTES;
      const __m512i heads = words.at(blk);
      const __m512 dd = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(heads));
      const __m512 dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(heads, 16)));
      const __m512i p0 = words.at(blk + 4), p1 = words.at(blk + 8), p2 = words.at(blk + 12);  // scale bytes 0-3, 4-7, 8-11
      for (int s = 0; s < 8; ++s) {
        __m512i sc, mn;
        if (s < 4) {
          sc = _mm512_and_si512(byte(p0, s), six);
          mn = _mm512_and_si512(byte(p1, s), six);
        } else {
          sc = _mm512_or_si512(_mm512_and_si512(byte(p2, s - 4), _mm512_set1_epi32(15)),
                               _mm512_slli_epi32(_mm512_srli_epi32(byte(p0, s - 4), 6), 4));
          mn = _mm512_or_si512(_mm512_srli_epi32(byte(p2, s - 4), 4), _mm512_slli_epi32(_mm512_srli_epi32(byte(p1, s - 4), 6), 4));
        }
        put_scales(sb * 8 + s, _mm512_mul_ps(dd, _mm512_cvtepi32_ps(sc)),
                   _mm512_mul_ps(_mm512_set1_ps(-1.0f), _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(mn))));
      }
      for (int pair = 0; pair < 4; ++pair)
        for (int g = 0; g < 8; ++g)  // bytes 32 pair + 4g ..: weights 4g.. of sub-blocks 2 pair (low), 2 pair + 1 (high)
          put_codes((sb * 8 + 2 * pair) * 8 + g, (sb * 8 + 2 * pair + 1) * 8 + g, words.at(blk + 16 + 32 * pair + 4 * g));
    }
  }
};

// y rows [t0, t0 + NT) of columns [r0, r0 + rows) from one panel.
template <int NT, class Out>
void panel_tokens(const Panel& p, const Tokens& x, const float* bias, int64_t t0, Out* y, int64_t ldy, int64_t r0, int rows) {
  const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1);
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = bias ? _mm512_maskz_loadu_ps(live, bias + r0) : _mm512_setzero_ps();
  const int8_t* q = x.q.data() + t0 * x.K;
  for (int64_t b = 0; b < x.nb; ++b, q += 32) {
    __m512i sums[NT];
    for (int t = 0; t < NT; ++t) sums[t] = _mm512_setzero_si512();
    for (int g = 0; g < 8; ++g) {
      const __m512i w = p.code(b * 8 + g);
      for (int t = 0; t < NT; ++t) {
        int32_t four;
        std::memcpy(&four, q + t * x.K + 4 * g, 4);
        sums[t] = _mm512_dpbusd_epi32(sums[t], w, _mm512_set1_epi32(four));
      }
    }
    const __m512 scale = p.scale(b), min = p.min(b);
    const float* d = x.d.data() + b * x.M + t0;
    const float* s = x.s.data() + b * x.M + t0;
    for (int t = 0; t < NT; ++t) {
      const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(sums[t]), _mm512_set1_ps(d[t]));
      acc[t] = _mm512_fmadd_ps(min, _mm512_set1_ps(s[t]), _mm512_fmadd_ps(scaled, scale, acc[t]));
    }
  }
  for (int t = 0; t < NT; ++t) store16(y + (t0 + t) * ldy + r0, live, acc[t]);
}

// ---- Down columns: y [M, D] = a [M, n] . W, W's n neurons as Q4_1 column codes (ColumnMatrix) ----------
//
// Neuron r's weight for output o is d[b][o] q[r][o] + m[b][o], b its block of 32 neurons. Lanes are 16
// outputs; a 32-bit lane holds 4 neurons' codes of its output, so the neurons of a block (sorted
// together, padded to fours with zero codes) are summed in integers against the tokens' activations
// quantized to 8 bits per block (unit max |a| / 127 over the block's neurons), scaled once per block.

constexpr int OUTPUTS = 16;  // outputs per panel: one per 32-bit lane

// 16 outputs [o0, o0 + 16) of 4 neuron rows as a VNNI vector: lane j holds output o0 + j of each row.
inline __m512i four_rows(const ColumnMatrix& C, const int64_t* rows, int n, int64_t o0) {
  const int64_t byte = o0 / 32 * 16;
  const bool high = o0 % 32 != 0;
  __m128i v[4];
  for (int i = 0; i < 4; ++i) {
    const __m128i c = i < n ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(C.row(rows[i]) + byte)) : _mm_setzero_si128();
    v[i] = _mm_and_si128(high ? _mm_srli_epi16(c, 4) : c, _mm_set1_epi8(0x0F));
  }
  const __m128i p01l = _mm_unpacklo_epi8(v[0], v[1]), p01h = _mm_unpackhi_epi8(v[0], v[1]);
  const __m128i p23l = _mm_unpacklo_epi8(v[2], v[3]), p23h = _mm_unpackhi_epi8(v[2], v[3]);
  __m512i out = _mm512_castsi128_si512(_mm_unpacklo_epi16(p01l, p23l));
  out = _mm512_inserti32x4(out, _mm_unpackhi_epi16(p01l, p23l), 1);
  out = _mm512_inserti32x4(out, _mm_unpacklo_epi16(p01h, p23h), 2);
  return _mm512_inserti32x4(out, _mm_unpackhi_epi16(p01h, p23h), 3);
}

template <int NT, class Out>
void column_tokens(const std::vector<int32_t>& codes, const std::vector<float>& scales, const Tokens& x,
                   const RowGroups& groups, int64_t t0, Out* y, int64_t ldy, int64_t o0) {
  const int64_t G = x.nb;
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  const int32_t* w = codes.data();
  for (int64_t g = 0; g < G; ++g) {
    __m512i sums[NT];
    for (int t = 0; t < NT; ++t) sums[t] = _mm512_setzero_si512();
    const int64_t end = 32 * g + groups.start[g + 1] - groups.start[g];  // the block's rows; zero codes after
    for (int64_t k = 32 * g; k < end; k += 4, w += 16) {
      const __m512i wk = _mm512_loadu_si512(w);
      for (int t = 0; t < NT; ++t) {
        int32_t four;
        std::memcpy(&four, x.q.data() + (t0 + t) * x.K + k, 4);
        sums[t] = _mm512_dpbusd_epi32(sums[t], wk, _mm512_set1_epi32(four));
      }
    }
    const __m512 d = _mm512_loadu_ps(scales.data() + 32 * g), m = _mm512_loadu_ps(scales.data() + 32 * g + 16);
    for (int t = 0; t < NT; ++t) {
      const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(sums[t]), _mm512_set1_ps(x.d[g * x.M + t0 + t]));
      acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(x.s[g * x.M + t0 + t]), _mm512_fmadd_ps(scaled, d, acc[t]));
    }
  }
  for (int t = 0; t < NT; ++t) store16(y + (t0 + t) * ldy + o0, 0xFFFF, acc[t]);
}

// Output panel o0's column codes (each block's rows four to a vector, padded to fours) into w, and each
// used block's scales d then m for its 16 outputs into scales [G][2][16].
inline void fill_column_panel(const ColumnMatrix& C, const ColumnBlocks& blocks, int64_t o0, int32_t* w, float* scales) {
  const RowGroups& used = blocks.used;
  for (int64_t g = 0; g < blocks.size(); ++g) {
    const uint16_t* head = C.scales(blocks.block_of[g]);
    _mm512_storeu_ps(scales + 32 * g, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(head + o0))));
    _mm512_storeu_ps(scales + 32 * g + 16, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(head + C.cols + o0))));
    for (int64_t i = used.start[g]; i < used.start[g + 1]; i += 4, w += 16)
      _mm512_storeu_si512(w, four_rows(C, used.order.data() + i, static_cast<int>(std::min<int64_t>(4, used.start[g + 1] - i)), o0));
  }
}

#include "prompt_gemm_drivers.h"

}  // namespace prompt_gemm_vnni
#pragma GCC pop_options
