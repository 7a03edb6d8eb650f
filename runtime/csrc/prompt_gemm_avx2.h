// The prompt products of prompt_gemm.h on AVX2 (no VNNI): panels of 8 rows (or outputs), one per 32-bit
// lane of a 256-bit vector, laid out as the VNNI form lays out 16. AVX2 has no `vpdpbusd`: a block's 8
// groups of four u8 x s8 products are `vpmaddubsw` pairs summed in int16 (at most 8 * 2 * 15 * 127 =
// 30,480, inside int16: 4-bit codes, inputs within +-127), then widened and pair-summed once per block
// by `vpmaddwd` with ones. The integer sums are the VNNI form's, and the float steps after them are the
// same operations in the same order.
//
// Why: on an AVX2 CPU a prompt on Q4_1 rows was de-quantized into fp32 tiles for the float GEMM; those
// copies and the de-quantization took a quarter of a prompt's time (docs/benchmarks.md).
// Included by prompt_gemm.h after what both forms share.

namespace prompt_gemm_avx2 {

constexpr int PANEL = 8;       // rows per panel: one per 32-bit lane
constexpr int MAX_TOKENS = 4;  // tokens per pass over a panel: 4 int16 + 4 float accumulators, of 16 registers

// The first n of the 8 lanes, as a mask for AVX2's masked loads, stores and gathers.
inline __m256i live_lanes(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }

// The first n of 8 fp32 results to y, as fp32 or rounded to bf16 (to nearest, ties to even).
inline void store8(float* y, int n, __m256 v) { _mm256_maskstore_ps(y, live_lanes(n), v); }
inline void store8(at::BFloat16* y, int n, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  alignas(16) uint16_t out[PANEL];  // <= 0xFFFF in every lane: the unsigned pack keeps it
  _mm_store_si128(reinterpret_cast<__m128i*>(out), _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1)));
  std::memcpy(y, out, sizeof(uint16_t) * n);
}

// The fp16 value in the low 16 bits of each 32-bit lane, as floats.
inline __m256 fp16_lanes(__m256i words) {
  const __m256i low = _mm256_and_si256(words, _mm256_set1_epi32(0xFFFF));
  return _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(low), _mm256_extracti128_si256(low, 1)));
}

// One block's 32-bit dot products (lanes) from its int16 pair sums.
inline __m256i widen_pairs(__m256i pairs) { return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)); }

// The 32-bit word at p + r * stride of each of a panel's rows r (one gather; lanes past `rows` are 0).
struct RowWords {
  __m256i live, offsets;
  RowWords(int64_t stride, int rows)
      : live(live_lanes(rows)),
        offsets(_mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int32_t>(stride)))) {}
  __m256i at(const uint8_t* p) const {
    return _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), reinterpret_cast<const int*>(p), offsets, live, 1);
  }
};

// A panel of up to 8 rows: per block, 8 vectors (4 weights of each row, 32 weights in all), and the
// rows' scales and mins as floats.
struct Panel {
  std::vector<int32_t> codes;  // [nb * 8][8]
  std::vector<float> d, m;     // [nb][8]
  __m256i code(int64_t i) const { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes.data() + PANEL * i)); }
  __m256 scale(int64_t b) const { return _mm256_loadu_ps(d.data() + PANEL * b); }
  __m256 min(int64_t b) const { return _mm256_loadu_ps(m.data() + PANEL * b); }
  void resize(int64_t nb) {
    codes.resize(nb * 8 * PANEL);
    d.resize(nb * PANEL);
    m.resize(nb * PANEL);
  }
  // Four code bytes per row: their low nibbles are code vector `low`, their high nibbles vector `high`.
  void put_codes(int64_t low, int64_t high, __m256i bytes) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes.data() + PANEL * low), _mm256_and_si256(bytes, mask));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes.data() + PANEL * high), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask));
  }
  void put_scales(int64_t b, __m256 scale, __m256 min) {
    _mm256_storeu_ps(d.data() + PANEL * b, scale);
    _mm256_storeu_ps(m.data() + PANEL * b, min);
  }
  void fill(const uint8_t* w, int64_t stride, int rows, int64_t nb, bool q4_k) {
    if (q4_k) return fill_q4_k(w, stride, rows, nb);
    resize(nb);
    const RowWords words(stride, rows);
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = w + b * Q4_1_BYTES;
      const __m256i heads = words.at(blk);  // (d, m) fp16 pairs
      put_scales(b, fp16_lanes(heads), fp16_lanes(_mm256_srli_epi32(heads, 16)));
      for (int g = 0; g < 4; ++g)  // bytes 4g..4g+3 of the codes: weights 4g.. (low nibbles), 16 + 4g.. (high)
        put_codes(b * 8 + g, b * 8 + 4 + g, words.at(blk + 4 + 4 * g));
    }
  }
  // Q4_K super-blocks, each as 8 blocks of 32 (the layout is in prompt_gemm_vnni.h's Panel::fill_q4_k).
  void fill_q4_k(const uint8_t* w, int64_t stride, int rows, int64_t nb) {
    resize(nb);
    const RowWords words(stride, rows);
    const __m256i six = _mm256_set1_epi32(63), four = _mm256_set1_epi32(15);
    auto byte = [](__m256i v, int i) { return _mm256_and_si256(_mm256_srli_epi32(v, 8 * i), _mm256_set1_epi32(255)); };
    for (int64_t sb = 0; sb < nb / 8; ++sb) {
      const uint8_t* blk = w + sb * Q4_K_BYTES;
      const __m256i heads = words.at(blk);
      const __m256 dd = fp16_lanes(heads), dmin = fp16_lanes(_mm256_srli_epi32(heads, 16));
      const __m256i p0 = words.at(blk + 4), p1 = words.at(blk + 8), p2 = words.at(blk + 12);  // scale bytes 0-3, 4-7, 8-11
      for (int s = 0; s < 8; ++s) {
        __m256i sc, mn;
        if (s < 4) {
          sc = _mm256_and_si256(byte(p0, s), six);
          mn = _mm256_and_si256(byte(p1, s), six);
        } else {
          sc = _mm256_or_si256(_mm256_and_si256(byte(p2, s - 4), four), _mm256_slli_epi32(_mm256_srli_epi32(byte(p0, s - 4), 6), 4));
          mn = _mm256_or_si256(_mm256_srli_epi32(byte(p2, s - 4), 4), _mm256_slli_epi32(_mm256_srli_epi32(byte(p1, s - 4), 6), 4));
        }
        put_scales(sb * 8 + s, _mm256_mul_ps(dd, _mm256_cvtepi32_ps(sc)),
                   _mm256_mul_ps(_mm256_set1_ps(-1.0f), _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(mn))));
      }
      for (int pair = 0; pair < 4; ++pair)
        for (int g = 0; g < 8; ++g)
          put_codes((sb * 8 + 2 * pair) * 8 + g, (sb * 8 + 2 * pair + 1) * 8 + g, words.at(blk + 16 + 32 * pair + 4 * g));
    }
  }
};

// y rows [t0, t0 + NT) of columns [r0, r0 + rows) from one panel.
template <int NT, class Out>
void panel_tokens(const Panel& p, const Tokens& x, const float* bias, int64_t t0, Out* y, int64_t ldy, int64_t r0, int rows) {
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = bias ? _mm256_maskload_ps(bias + r0, live_lanes(rows)) : _mm256_setzero_ps();
  const int8_t* q = x.q.data() + t0 * x.K;
  for (int64_t b = 0; b < x.nb; ++b, q += 32) {
    __m256i pairs[NT];  // int16 pair sums of the block
    for (int t = 0; t < NT; ++t) pairs[t] = _mm256_setzero_si256();
    for (int g = 0; g < 8; ++g) {
      const __m256i w = p.code(b * 8 + g);
      for (int t = 0; t < NT; ++t) {
        int32_t four;
        std::memcpy(&four, q + t * x.K + 4 * g, 4);
        pairs[t] = _mm256_add_epi16(pairs[t], _mm256_maddubs_epi16(w, _mm256_set1_epi32(four)));
      }
    }
    const __m256 scale = p.scale(b), min = p.min(b);
    const float* d = x.d.data() + b * x.M + t0;
    const float* s = x.s.data() + b * x.M + t0;
    for (int t = 0; t < NT; ++t) {
      const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(widen_pairs(pairs[t])), _mm256_set1_ps(d[t]));
      acc[t] = _mm256_fmadd_ps(min, _mm256_set1_ps(s[t]), _mm256_fmadd_ps(scaled, scale, acc[t]));
    }
  }
  for (int t = 0; t < NT; ++t) store8(y + (t0 + t) * ldy + r0, rows, acc[t]);
}

// ---- Down columns (the layout is in prompt_gemm_vnni.h): lanes are 8 outputs ----------------------------

constexpr int OUTPUTS = 8;  // outputs per panel: one per 32-bit lane

// 8 outputs [o0, o0 + 8) of 4 neuron rows: lane j holds output o0 + j of each row. Output o of a row is
// the low (o % 32 < 16) or high nibble of its byte o / 32 * 16 + o % 16.
inline __m256i four_rows(const ColumnMatrix& C, const int64_t* rows, int n, int64_t o0) {
  const int64_t byte = o0 / 32 * 16 + o0 % 16;
  const bool high = o0 % 32 >= 16;
  __m128i v[4];
  for (int i = 0; i < 4; ++i) {
    const __m128i c = i < n ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(C.row(rows[i]) + byte)) : _mm_setzero_si128();
    v[i] = _mm_and_si128(high ? _mm_srli_epi16(c, 4) : c, _mm_set1_epi8(0x0F));
  }
  const __m128i p01 = _mm_unpacklo_epi8(v[0], v[1]), p23 = _mm_unpacklo_epi8(v[2], v[3]);
  return _mm256_set_m128i(_mm_unpackhi_epi16(p01, p23), _mm_unpacklo_epi16(p01, p23));
}

template <int NT, class Out>
void column_tokens(const std::vector<int32_t>& codes, const std::vector<float>& scales, const Tokens& x,
                   const RowGroups& groups, int64_t t0, Out* y, int64_t ldy, int64_t o0) {
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  const int32_t* w = codes.data();
  for (int64_t g = 0; g < x.nb; ++g) {
    __m256i pairs[NT];  // a block holds at most 32 neurons: 8 steps of four, inside int16 as for rows
    for (int t = 0; t < NT; ++t) pairs[t] = _mm256_setzero_si256();
    const int64_t end = 32 * g + groups.start[g + 1] - groups.start[g];  // the block's rows; zero codes after
    for (int64_t k = 32 * g; k < end; k += 4, w += OUTPUTS) {
      const __m256i wk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      for (int t = 0; t < NT; ++t) {
        int32_t four;
        std::memcpy(&four, x.q.data() + (t0 + t) * x.K + k, 4);
        pairs[t] = _mm256_add_epi16(pairs[t], _mm256_maddubs_epi16(wk, _mm256_set1_epi32(four)));
      }
    }
    const __m256 d = _mm256_loadu_ps(scales.data() + 2 * OUTPUTS * g), m = _mm256_loadu_ps(scales.data() + 2 * OUTPUTS * g + OUTPUTS);
    for (int t = 0; t < NT; ++t) {
      const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(widen_pairs(pairs[t])), _mm256_set1_ps(x.d[g * x.M + t0 + t]));
      acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(x.s[g * x.M + t0 + t]), _mm256_fmadd_ps(scaled, d, acc[t]));
    }
  }
  for (int t = 0; t < NT; ++t) store8(y + (t0 + t) * ldy + o0, OUTPUTS, acc[t]);
}

// Output panel o0's column codes (each block's rows four to a vector, padded to fours) into w, and each
// used block's scales d then m for its 8 outputs into scales [G][2][8].
inline void fill_column_panel(const ColumnMatrix& C, const ColumnBlocks& blocks, int64_t o0, int32_t* w, float* scales) {
  const RowGroups& used = blocks.used;
  for (int64_t g = 0; g < blocks.size(); ++g) {
    const uint16_t* head = C.scales(blocks.block_of[g]);
    _mm256_storeu_ps(scales + 2 * OUTPUTS * g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(head + o0))));
    _mm256_storeu_ps(scales + 2 * OUTPUTS * g + OUTPUTS, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(head + C.cols + o0))));
    for (int64_t i = used.start[g]; i < used.start[g + 1]; i += 4, w += OUTPUTS)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w),
                          four_rows(C, used.order.data() + i, static_cast<int>(std::min<int64_t>(4, used.start[g + 1] - i)), o0));
  }
}

#include "prompt_gemm_drivers.h"

}  // namespace prompt_gemm_avx2
