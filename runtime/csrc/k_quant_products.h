// K-quant products for decode and prompts up to 128 tokens (k_quants.h has the block layouts and the
// de-quantizers).
//
//   gemv_k(W [N, cols / 256 * block_bytes] uint8, x [T, cols] fp32, kernel, rows [R] int64 or None)
//       -> y [T, R or N] fp32, y[t, r] = W[rows[r]] . x[t]
//   down_k(codes [k, d / 256 * code_bytes] uint8, table [n / 256, head_bytes / 2, d] fp16, ids [j] int64,
//          a [T, j] fp32, kernel, rows [j] int64 or None) -> y [T, d] fp32, y[t] = sum_i a[t, i] * column(ids[i]),
//          entry i's codes in row rows[i] of `codes` (row i when None; then k = j)
//
// Rows: as llama.cpp does, the input is quantized once per matrix to 8 bits per weight in blocks of 256
// (its Q8_K: a float scale d_x, int8 codes, and the sum of each 16 codes), so a super-block's product is
// integer multiply-adds with the 6- or 8-bit sub-block scales and two float terms:
//   Q4_K . x = d_x (d sum_s sc_s sum_j q_j q_x_j  -  dmin sum_s m_s sum_j q_x_j)      (8 sub-blocks of 32)
//   Q6_K . x = d_x d sum_s sc_s (sum_j q_j q_x_j  -  32 sum_j q_x_j)                 (16 sub-blocks of 16)
// The u8 x s8 code products are `vpmaddubsw`, the scales multiply in with `vpmaddwd`. |partial sums| stay
// far inside int16 (15 * 127 * 2, 63 * 127 * 2) and int32.
// Down columns: the neurons are grouped by their block's sub-block (the neurons that share one scale
// and offset per output: 32 for Q4_K, 16 for Q6_K), a block's activations quantized to 8 bits with one
// unit and summed with the codes in integers, four neurons per multiply-add, the sub-block scales
// multiplied in as integers and the block's float scales applied once per output (`axpy_columns_k`).
// `down_k`'s threads split the neurons into partial outputs.

namespace kq {

// An input quantized per 256 as the row kernels read it: codes q, scale d, and each 16 codes' sum.
struct Q8KInput {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int16_t> sums16;  // |sum| <= 16 * 127
  std::vector<int8_t> q_pairs;  // q with each block's sub-blocks of 32 in the order 0 2 1 3 4 6 5 7 (k_quant_vnni.h)
  std::vector<int16_t> sums32;  // each 32 codes' sum, |sum| <= 32 * 127
  void quantize(const float* x, int64_t n) {
    const int64_t nb = n / QK_K;
    q.resize(n);
    q_pairs.resize(n);
    sums32.resize(8 * nb);
    d.resize(nb);
    sums16.resize(16 * nb);
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + QK_K * b;
      float amax = 0.0f;
      for (int64_t i = 0; i < QK_K; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float scale = amax / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
      d[b] = scale;
      for (int64_t g = 0; g < 16; ++g) {
        int32_t sum = 0;
        for (int64_t i = 16 * g; i < 16 * g + 16; ++i) {
          const int8_t v = static_cast<int8_t>(std::nearbyint(xb[i] * inv));  // round half to even, as torch.round
          q[QK_K * b + i] = v;
          sum += v;
        }
        sums16[16 * b + g] = static_cast<int16_t>(sum);
      }
      for (int64_t g = 0; g < 8; ++g) sums32[8 * b + g] = static_cast<int16_t>(sums16[16 * b + 2 * g] + sums16[16 * b + 2 * g + 1]);
      static constexpr int pair_order[8] = {0, 2, 1, 3, 4, 6, 5, 7};
      for (int i = 0; i < 8; ++i) std::memcpy(&q_pairs[QK_K * b + 32 * i], &q[QK_K * b + 32 * pair_order[i]], 32);
    }
  }
};

inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// A Q4_K head's 12 bytes of 6-bit (scale, min) pairs -> sc[8], m[8] bytes (as k_scale_offset reads
// them), four at a time in 32-bit words: with p = the 12 bytes, sub-blocks 0-3 keep the low 6 bits of
// p[s] and p[s + 4]; 4-7 take nibbles of p[s + 4] and, as their top two bits, the top bits of p[s - 4], p[s].
inline void q4_k_scales(const uint8_t* p, uint8_t* sc, uint8_t* m) {
  uint32_t w[3];
  std::memcpy(w, p, sizeof w);
  const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
  const uint32_t out[4] = {w[0] & low6, (w[2] & low4) | (((w[0] >> 6) & low2) << 4), w[1] & low6,
                           ((w[2] >> 4) & low4) | (((w[1] >> 6) & low2) << 4)};
  std::memcpy(sc, out, 8);
  std::memcpy(m, out + 2, 8);
}

// 32 Q6_K codes (0..63) of group g = 4h + t of a block's code bytes (ql [128] | qh [64]): outputs or
// weights 128h + 32t .. +31, as unpack_k_codes orders them.
inline __m256i q6_k_codes(const uint8_t* codes, int g) {
  const int h = g / 4, t = g % 4;
  const __m256i low4 = _mm256_set1_epi8(0x0F), low2 = _mm256_set1_epi8(0x03);
  const __m256i ql = load32(codes + 64 * h + 32 * (t % 2));
  const __m256i nib = _mm256_and_si256(t < 2 ? ql : _mm256_srli_epi16(ql, 4), low4);
  const __m256i qh = _mm256_and_si256(_mm256_srli_epi16(load32(codes + 128 + 32 * h), 2 * t), low2);
  return _mm256_or_si256(nib, _mm256_slli_epi16(qh, 4));
}

// 32 Q4_K codes (0..15) of sub-block s of a block's 128 code bytes.
inline __m256i q4_k_codes(const uint8_t* codes, int s) {
  const __m256i bytes = load32(codes + 32 * (s / 2));
  return _mm256_and_si256(s % 2 ? _mm256_srli_epi16(bytes, 4) : bytes, _mm256_set1_epi8(0x0F));
}

// One row . NT inputs (out[t] = row . in[t]): a block's scales are decoded and its codes unpacked once
// for all NT tokens of a prompt (NT = 1 for decode).
template <int NT>
inline void dots_q4_k(const uint8_t* w, int64_t nb, const Q8KInput* const* in, float* out) {
  __m256 acc[NT];
  float min_total[NT];  // sum over blocks of dmin d_x sum_s m_s (sum of the input codes of sub-block s)
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps(), min_total[t] = 0.0f;
  for (int64_t b = 0; b < nb; ++b, w += Q4_K_BYTES) {
    alignas(16) uint8_t sc[8], m[8];
    q4_k_scales(w + 4, sc, m);
    // the scales as int16, both 128-bit halves; sub-block s's scale broadcast by a byte shuffle
    const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc))));
    const __m128i m8 = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
    const __m256i m16 = _mm256_set_m128i(_mm_unpackhi_epi16(m8, m8), _mm_unpacklo_epi16(m8, m8));  // m_{i/2}, i < 16
    __m256i isum[NT];
    for (int t = 0; t < NT; ++t) isum[t] = _mm256_setzero_si256();
    for (int s = 0; s < 8; ++s) {
      const __m256i pick = _mm256_set1_epi16(static_cast<int16_t>((2 * s) | ((2 * s + 1) << 8)));
      const __m256i codes = q4_k_codes(w + 16, s), scale = _mm256_shuffle_epi8(sc16, pick);
      for (int t = 0; t < NT; ++t) {
        const __m256i p = _mm256_maddubs_epi16(codes, load32(in[t]->q.data() + QK_K * b + 32 * s));
        isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p, scale));
      }
    }
    const float d = fp16_to_float(w), dmin = fp16_to_float(w + 2);
    for (int t = 0; t < NT; ++t) {
      const float dx = in[t]->d[b];
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(isum[t]), acc[t]);
      const int32_t msum = hsum_i32(_mm256_madd_epi16(m16, load32(in[t]->sums16.data() + 16 * b)));
      min_total[t] += dmin * dx * static_cast<float>(msum);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]) - min_total[t];
}

template <int NT>
inline void dots_q6_k(const uint8_t* w, int64_t nb, const Q8KInput* const* in, float* out) {
  __m256 acc[NT];
  float bias[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps(), bias[t] = 0.0f;
  for (int64_t b = 0; b < nb; ++b, w += Q6_K_BYTES) {
    // the sixteen int8 sub-block scales as int16 lanes 0-15; group g (32 weights) needs 2g in its low
    // half and 2g + 1 in its high half, picked by a byte shuffle from the 128-bit half that holds them
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 192)));
    const __m256i low = _mm256_permute4x64_epi64(sc16, 0x44), high = _mm256_permute4x64_epi64(sc16, 0xEE);
    __m256i isum[NT];
    for (int t = 0; t < NT; ++t) isum[t] = _mm256_setzero_si256();
    for (int g = 0; g < 8; ++g) {  // 32 weights: sub-blocks 2g (int16 lanes 0-7) and 2g + 1 (lanes 8-15)
      const int k = 2 * (g % 4);  // scale 2g's position in its half
      const __m256i pick = _mm256_set_m128i(_mm_set1_epi16(static_cast<int16_t>((2 * k + 2) | ((2 * k + 3) << 8))),
                                            _mm_set1_epi16(static_cast<int16_t>((2 * k) | ((2 * k + 1) << 8))));
      const __m256i codes = q6_k_codes(w, g), sc = _mm256_shuffle_epi8(g < 4 ? low : high, pick);
      for (int t = 0; t < NT; ++t) {
        const __m256i p = _mm256_maddubs_epi16(codes, load32(in[t]->q.data() + QK_K * b + 32 * g));
        isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p, sc));
      }
    }
    const float d = fp16_to_float(w + 208);
    for (int t = 0; t < NT; ++t) {
      const float dd = d * in[t]->d[b];
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(isum[t]), acc[t]);
      const int32_t ssum = hsum_i32(_mm256_madd_epi16(sc16, load32(in[t]->sums16.data() + 16 * b)));
      bias[t] += 32.0f * dd * static_cast<float>(ssum);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]) - bias[t];
}

// y[t * stride + r] = row(r) . in[t] for r in [r0, r1) and t < T, row(r) = w + (rows ? rows[r] : r) * row_bytes:
// rows prefetched ahead (rows_ahead), four tokens per pass over a row.
void rows_dots(bool q4_k, const uint8_t* w, int64_t row_bytes, const int64_t* rows, int64_t r0, int64_t r1,
               const Q8KInput* const* in, int64_t T, float* y, int64_t stride) {
  const int64_t nb = row_bytes / (q4_k ? Q4_K_BYTES : Q6_K_BYTES), ahead = rows_ahead(row_bytes, rows != nullptr);
  float out[4];
  for (int64_t r = r0; r < r1; ++r) {
    if (ahead && r + ahead < r1) prefetch_row(w + (rows ? rows[r + ahead] : r + ahead) * row_bytes, row_bytes);
    const uint8_t* row = w + (rows ? rows[r] : r) * row_bytes;
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) {
      q4_k ? dots_q4_k<4>(row, nb, in + t, out) : dots_q6_k<4>(row, nb, in + t, out);
      for (int i = 0; i < 4; ++i) y[(t + i) * stride + r] = out[i];
    }
    for (; t < T; ++t) {
      q4_k ? dots_q4_k<1>(row, nb, in + t, out) : dots_q6_k<1>(row, nb, in + t, out);
      y[t * stride + r] = out[0];
    }
  }
}

inline __m256 fp16_8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// K-quant down columns as the kernels read them: `rows` neurons, each `code_bytes` of codes for `d`
// outputs; neuron r's scales are those of its sub-block keys[r] = original id / group (the block is
// keys[r] * group / 256) in the layer's table [n / 256, halves, d] of head units.
struct KColumns {
  const uint8_t* codes = nullptr;
  const uint16_t* table = nullptr;
  const int64_t* keys = nullptr;
  int64_t rows = 0, d = 0, code_bytes = 0, n_keys = 0;
  bool q4_k = false;
  int64_t group() const { return q4_k ? 32 : 16; }
  int64_t halves() const { return q4_k ? 8 : 9; }
  const uint8_t* row(int64_t r) const { return codes + r * code_bytes; }
};

// The 8-bit units of K-quant down columns' activations: max |a| / 127 over each block of 256 neurons (as
// llama.cpp's Q8_K quantizes down's input), from all of the product's activations so that a result does
// not depend on how rows are split; kept per sub-block group (each group holding its block's unit), the
// column sums add a block's groups in integers. units [n_keys].
void k_column_units(const KColumns& W, const float* a, const int64_t* rows, int64_t n, std::vector<float>& units) {
  group_units(W.keys, W.n_keys, a, rows, n, units);
  const int64_t per_block = QK_K / W.group();
  for (int64_t g0 = 0; g0 < W.n_keys; g0 += per_block) {
    const int64_t g1 = std::min(W.n_keys, g0 + per_block);
    const float block = *std::max_element(units.begin() + g0, units.begin() + g1);
    std::fill(units.begin() + g0, units.begin() + g1, block);
  }
}

// Head byte k of the 16 outputs r .. r + 15 of one block's heads in the down table ([head_bytes / 2, d]
// 2-byte units of this block; unit u of output r at unit[u * d + r]) as 16-bit lanes, 0..255.
inline __m256i head_bytes16(const uint16_t* unit, int64_t d, int k, int64_t r) {
  const __m256i u = load32(unit + (k / 2) * d + r);
  return k % 2 ? _mm256_srli_epi16(u, 8) : _mm256_and_si256(u, _mm256_set1_epi16(0xFF));
}

// The integer scale of sub-block s for the 16 outputs r .. r + 15 (Q6_K: signed 8 bits; Q4_K: 6 bits) and,
// for Q4_K, its 6-bit min, in 16-bit lanes, decoded from the down table as k_scale_offset does.
inline void sub_block_scales16(bool q4_k, const uint16_t* unit, int64_t d, int s, int64_t r, __m256i* sc, __m256i* m) {
  if (!q4_k) {
    const __m256i raw = head_bytes16(unit, d, s, r), sign = _mm256_set1_epi16(0x80);
    *sc = _mm256_sub_epi16(_mm256_xor_si256(raw, sign), sign);
    return;
  }
  const __m256i low6 = _mm256_set1_epi16(63), low4 = _mm256_set1_epi16(15);
  if (s < 4) {  // head byte 4 + s: p[s], 8 + s: p[s + 4]
    *sc = _mm256_and_si256(head_bytes16(unit, d, 4 + s, r), low6);
    *m = _mm256_and_si256(head_bytes16(unit, d, 8 + s, r), low6);
  } else {  // p = head + 4: sc = p[s + 4] & 15 | (p[s - 4] >> 6) << 4, m = p[s + 4] >> 4 | (p[s] >> 6) << 4
    const __m256i hi = head_bytes16(unit, d, 8 + s, r);
    *sc = _mm256_or_si256(_mm256_and_si256(hi, low4), _mm256_slli_epi16(_mm256_srli_epi16(head_bytes16(unit, d, s, r), 6), 4));
    *m = _mm256_or_si256(_mm256_srli_epi16(hi, 4), _mm256_slli_epi16(_mm256_srli_epi16(head_bytes16(unit, d, 4 + s, r), 6), 4));
  }
}

// 16-bit values of 32 outputs (x0: outputs 0-15, x1: 16-31) -> each value twice in the 32-bit lanes of the
// four sums quad_sums keeps, which hold outputs 0-3 | 16-19, 4-7 | 20-23, 8-11 | 24-27, 12-15 | 28-31.
inline void in_sum_order(__m256i x0, __m256i x1, __m256i* out) {
  const __m256i t = _mm256_permute2x128_si256(x0, x1, 0x20), u = _mm256_permute2x128_si256(x0, x1, 0x31);
  out[0] = _mm256_unpacklo_epi16(t, t), out[1] = _mm256_unpackhi_epi16(t, t);
  out[2] = _mm256_unpacklo_epi16(u, u), out[3] = _mm256_unpackhi_epi16(u, u);
}

// Four sums in sum order (in_sum_order) -> outputs 0-7, 8-15, 16-23, 24-31.
inline void from_sum_order(const __m256i* v, __m256i* out) {
  out[0] = _mm256_permute2x128_si256(v[0], v[1], 0x20), out[1] = _mm256_permute2x128_si256(v[2], v[3], 0x20);
  out[2] = _mm256_permute2x128_si256(v[0], v[1], 0x31), out[3] = _mm256_permute2x128_si256(v[2], v[3], 0x31);
}

// Four neurons' codes at chunk c of an output group (32 outputs; codes[i] is neuron i's code bytes of the
// output group, a row of zeros past a group's count) interleaved byte by byte: u[0..3] hold each output's
// four codes in one 32-bit lane, outputs in sum order (in_sum_order).
template <bool Q4K>
inline void interleave_quad(const uint8_t* const* codes, int c, __m256i* u) {
  const __m256i q0 = Q4K ? q4_k_codes(codes[0], c) : q6_k_codes(codes[0], c);
  const __m256i q1 = Q4K ? q4_k_codes(codes[1], c) : q6_k_codes(codes[1], c);
  const __m256i q2 = Q4K ? q4_k_codes(codes[2], c) : q6_k_codes(codes[2], c);
  const __m256i q3 = Q4K ? q4_k_codes(codes[3], c) : q6_k_codes(codes[3], c);
  const __m256i t0 = _mm256_unpacklo_epi8(q0, q1), t1 = _mm256_unpackhi_epi8(q0, q1);
  const __m256i t2 = _mm256_unpacklo_epi8(q2, q3), t3 = _mm256_unpackhi_epi8(q2, q3);
  u[0] = _mm256_unpacklo_epi16(t0, t2), u[1] = _mm256_unpackhi_epi16(t0, t2);
  u[2] = _mm256_unpacklo_epi16(t1, t3), u[3] = _mm256_unpackhi_epi16(t1, t3);
}

// acc[0..3] += sc * (u . act) per output: one u8 x s8 multiply-add (`vpmaddubsw`) sums two of the four
// neurons (|sum| <= 2 * 63 * 127), `vpmaddwd` multiplies both pairs by the output's sub-block scale.
// act4: the four neurons' 8-bit activations in one word.
inline void scaled_quad(const __m256i* u, int32_t act4, const __m256i* sc, __m256i* acc) {
  const __m256i act = _mm256_set1_epi32(act4);
  for (int j = 0; j < 4; ++j) acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(_mm256_maddubs_epi16(u[j], act), sc[j]));
}

// sums[0..31] += acc (sum order) less Q6_K's 32 sc qa_sum; Q4_K: mins[0..31] += m qa_sum. qa_sum16: the
// sub-block's sum of 8-bit activations as (qa_sum, 0) in each pair of 16-bit lanes.
inline void add_chunk(bool q4_k, __m256i* acc, const __m256i* sc, const __m256i* m, __m256i qa_sum16, int32_t* sums,
                      int32_t* mins) {
  for (int i = 0; i < 4; ++i) {
    if (!q4_k)  // w = d sc (q - 32): sc * 32 * qa_sum as 32 * (sc * qa_sum)
      acc[i] = _mm256_sub_epi32(acc[i], _mm256_slli_epi32(_mm256_madd_epi16(sc[i], qa_sum16), 5));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + 8 * i), _mm256_add_epi32(load32(sums + 8 * i), acc[i]));
    if (q4_k)  // w = d sc q - dmin m
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(mins + 8 * i),
                          _mm256_add_epi32(load32(mins + 8 * i), _mm256_madd_epi16(m[i], qa_sum16)));
  }
}

// out[d] += unit * (d * sums - dmin * mins) (Q6_K: unit * d * sums) for one block's integer sums [d] (sum
// order per 32 outputs), head the block's heads in the down table.
inline void fold_block(bool q4_k, const uint16_t* head, int64_t d, float unit, const int32_t* sums, const int32_t* mins,
                       float* out) {
  const __m256 u = _mm256_set1_ps(unit);
  for (int64_t o0 = 0; o0 < d; o0 += 32) {
    __m256i v[4], natural[4];
    for (int i = 0; i < 4; ++i) v[i] = load32(sums + o0 + 8 * i);
    from_sum_order(v, natural);
    for (int i = 0; i < 4; ++i) {
      const int64_t r = o0 + 8 * i;
      const __m256 scale = _mm256_mul_ps(u, fp16_8(head + (q4_k ? 0 : 8 * d) + r));
      _mm256_storeu_ps(out + r, _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(natural[i]), _mm256_loadu_ps(out + r)));
    }
    if (!q4_k) continue;
    for (int i = 0; i < 4; ++i) v[i] = load32(mins + o0 + 8 * i);
    from_sum_order(v, natural);
    for (int i = 0; i < 4; ++i) {
      const int64_t r = o0 + 8 * i;
      const __m256 offset = _mm256_mul_ps(u, fp16_8(head + d + r));
      _mm256_storeu_ps(out + r, _mm256_fnmadd_ps(offset, _mm256_cvtepi32_ps(natural[i]), _mm256_loadu_ps(out + r)));
    }
  }
}

// out + t * out_stride += sum_{r in [r0, r1)} a[t * a_stride + r] * column(row(r)) (row(r) = rows[r], or r)
// for T tokens, summed in integers per block of 256 neurons as llama.cpp sums a Q4_K/Q6_K row against its
// Q8_K input: the share grouped by sub-block (a counting sort); a block's activations quantized to 8
// bits with one unit per token (`k_column_units`), each sub-block's codes times those activations
// multiplied by its integer scales (`vpmaddwd`) into the block's int32 sums for all d outputs (Q6_K's -32
// and Q4_K's mins as integer terms per sub-block), which meet the floats once per block and output
// (fold_block). Per sub-block float scales (a decode, two multiplies and a fold per 32 outputs, before)
// cost as much as the multiply-adds for a sparse 40 % of a group.
// A group's 32 outputs at a time keep its codes in L1 over the eight chunks of an output group; the next
// group's codes are fetched while one is summed, a 256-output slice at a time. One token (decode) sums
// each quad of neurons as it is interleaved; a prompt's tokens share one interleaving per chunk (T
// passes over the codes read each layer's down T times).
void axpy_columns_k(const KColumns& W, const float* a, int64_t T, int64_t a_stride, const int64_t* rows,
                    const float* units, float* out, int64_t out_stride, int64_t r0, int64_t r1) {
  const int64_t G = W.n_keys, group = W.group(), per_block = QK_K / group, halves = W.halves(), d = W.d;
  const int64_t ob = (W.q4_k ? 128 : 192);  // code bytes per 256 outputs
  alignas(32) static const uint8_t zero_codes[192] = {};
  thread_local RowGroups groups;
  thread_local std::vector<int32_t> sums, mins, acts;  // sums, mins [T, d]: one block's; acts [T, 8]
  thread_local std::vector<int8_t> qa;                // [T, 32]: a group's 8-bit activations, zero past count
  std::vector<__m256i> qa_sum16(T);
  acts.resize(8 * T);
  qa.resize(32 * T);
  groups.sort(W.keys, G, rows, r0, r1);
  const std::vector<int64_t>&start = groups.start, &order = groups.order;
  const uint8_t* ptr[32];
  __m256i u[8][4];
  for (int64_t b = 0, next = 0; b < G / per_block; ++b) {
    const int64_t g0 = b * per_block;
    if (start[g0] == start[g0 + per_block]) continue;
    sums.assign(T * d, 0);
    if (W.q4_k) mins.assign(T * d, 0);
    const uint16_t* head = W.table + b * halves * d;
    for (int64_t g = g0; g < g0 + per_block; ++g) {
      if (start[g] == start[g + 1]) continue;
      for (next = std::max(next, g + 1); next < G && start[next] == start[next + 1];) ++next;
      const int64_t count = start[g + 1] - start[g], quads = (count + 3) / 4;
      std::fill(qa.begin(), qa.end(), 0);
      for (int64_t t = 0; t < T; ++t) {
        const float unit = units[t * G + g], inv = unit != 0.0f ? 1.0f / unit : 0.0f;
        int32_t qa_sum = 0;  // Q6_K's -32 and Q4_K's mins multiply the quantized activations too
        for (int64_t k = 0; k < count; ++k) {
          const int8_t q = static_cast<int8_t>(std::nearbyint(a[t * a_stride + order[start[g] + k]] * inv));  // half to even
          qa[32 * t + k] = q;
          qa_sum += q;
        }
        std::memcpy(acts.data() + 8 * t, qa.data() + 32 * t, 32);
        qa_sum16[t] = _mm256_set1_epi32(qa_sum & 0xFFFF);
      }
      const int s = static_cast<int>(g - g0);
      for (int64_t og = 0; og < d / QK_K; ++og) {
        for (int64_t k = 0; k < 4 * quads; ++k) {
          ptr[k] = k < count ? W.row(rows ? rows[order[start[g] + k]] : order[start[g] + k]) + og * ob : zero_codes;
        }
        if (next < G)  // the next group's codes for these outputs, spread over this group's work
          for (int64_t k = start[next]; k < start[next + 1]; ++k) {
            const int64_t r = order[k];
            prefetch_row(W.row(rows ? rows[r] : r) + og * ob, ob);
          }
        for (int c = 0; c < 8; ++c) {
          const int64_t o0 = og * QK_K + 32 * c;
          __m256i sc0, sc1, m0, m1, sc[4], m[4];
          sub_block_scales16(W.q4_k, head, d, s, o0, &sc0, &m0);
          sub_block_scales16(W.q4_k, head, d, s, o0 + 16, &sc1, &m1);
          in_sum_order(sc0, sc1, sc);
          if (W.q4_k) in_sum_order(m0, m1, m);
          if (T == 1) {
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
            for (int64_t q = 0; q < quads; ++q) {
              W.q4_k ? interleave_quad<true>(ptr + 4 * q, c, u[0]) : interleave_quad<false>(ptr + 4 * q, c, u[0]);
              scaled_quad(u[0], acts[q], sc, acc);
            }
            add_chunk(W.q4_k, acc, sc, m, qa_sum16[0], sums.data() + o0, mins.data() + o0);
            continue;
          }
          for (int64_t q = 0; q < quads; ++q)
            W.q4_k ? interleave_quad<true>(ptr + 4 * q, c, u[q]) : interleave_quad<false>(ptr + 4 * q, c, u[q]);
          for (int64_t t = 0; t < T; ++t) {
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
            for (int64_t q = 0; q < quads; ++q) scaled_quad(u[q], acts[8 * t + q], sc, acc);
            add_chunk(W.q4_k, acc, sc, m, qa_sum16[t], sums.data() + t * d + o0, mins.data() + t * d + o0);
          }
        }
      }
    }
    for (int64_t t = 0; t < T; ++t)  // one unit per block (k_column_units)
      fold_block(W.q4_k, head, d, units[t * G + g0], sums.data() + t * d, mins.data() + t * d, out + t * out_stride);
  }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
#include "k_quant_vnni.h"
#pragma GCC pop_options

// The K-quant products of this CPU, chosen once by the rule of compact_kernels (PARTINFER_VNNI=0: AVX2).
struct KQuantKernels {
  const char* name;
  void (*rows_dots)(bool, const uint8_t*, int64_t, const int64_t*, int64_t, int64_t, const Q8KInput* const*, int64_t, float*,
                    int64_t);
  void (*axpy_columns)(const KColumns&, const float*, int64_t, int64_t, const int64_t*, const float*, float*, int64_t,
                       int64_t, int64_t);
};

const KQuantKernels& k_quant_kernels() {
  static const KQuantKernels chosen = [] {
    if (vnni_allowed()) return KQuantKernels{"avx512-vnni", vnni512::rows_dots, vnni512::axpy_columns};
    return KQuantKernels{"avx2", rows_dots, axpy_columns_k};
  }();
  return chosen;
}

// codes [k, d / 256 * (128 | 192)] uint8, table [nb, 8 | 9, d] fp16 (Q4_K | Q6_K), keys [k] int64 sub-block
// indices in [0, nb * 256 / group): checked once.
KColumns k_columns_of(const at::Tensor& codes, const at::Tensor& table, const at::Tensor& keys, const char* name) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2 && codes.device().is_cpu(),
              name, " codes: contiguous uint8 [k, bytes]");
  TORCH_CHECK(table.scalar_type() == at::kHalf && table.is_contiguous() && table.dim() == 3 &&
              (table.size(1) == 8 || table.size(1) == 9), name, " table: contiguous fp16 [n / 256, 8 | 9, d]");
  KColumns W;
  W.q4_k = table.size(1) == 8;
  W.d = table.size(2);
  W.rows = codes.size(0);
  W.code_bytes = codes.size(1);
  W.n_keys = table.size(0) * QK_K / W.group();
  TORCH_CHECK(W.d % QK_K == 0 && W.code_bytes == W.d / QK_K * (W.q4_k ? 128 : 192), name, " codes do not hold d = ", W.d,
              " outputs");
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.is_contiguous() && keys.dim() == 1 && keys.numel() == W.rows,
              name, " keys: int64 [k]");
  W.keys = keys.data_ptr<int64_t>();
  for (int64_t r = 0; r < W.rows; ++r) TORCH_CHECK(W.keys[r] >= 0 && W.keys[r] < W.n_keys, name, " sub-block ", W.keys[r], " outside the table");
  W.codes = codes.data_ptr<uint8_t>();
  W.table = reinterpret_cast<const uint16_t*>(table.data_ptr<at::Half>());
  return W;
}

at::Tensor gemv_k(const at::Tensor& W, const at::Tensor& x, const std::string& kernel,
                  const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(kernel == "q4_k" || kernel == "q6_k", "no K-quant product for ", kernel);
  const bool q4_k = kernel == "q4_k";
  const int64_t block_bytes = q4_k ? Q4_K_BYTES : Q6_K_BYTES;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x: contiguous fp32 [T, cols]");
  const int64_t T = x.size(0), cols = x.size(1), nb = cols / QK_K;
  TORCH_CHECK(W.scalar_type() == at::kByte && W.is_contiguous() && W.dim() == 2 && cols % QK_K == 0 &&
              W.size(1) == nb * block_bytes, "W: contiguous uint8 [N, ", nb * block_bytes, "] for ", cols, " inputs");
  const int64_t* rp = nullptr;
  int64_t R = W.size(0);
  if (rows.has_value()) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->is_contiguous() && rows->dim() == 1, "rows: int64 [R]");
    rp = rows->data_ptr<int64_t>();
    R = rows->numel();
    for (int64_t r = 0; r < R; ++r) TORCH_CHECK(rp[r] >= 0 && rp[r] < W.size(0), "row ", rp[r], " out of range");
  }
  std::vector<Q8KInput> inputs(T);
  std::vector<const Q8KInput*> in(T);
  for (int64_t t = 0; t < T; ++t) inputs[t].quantize(x.data_ptr<float>() + t * cols, cols), in[t] = &inputs[t];
  const KQuantKernels& kernels = k_quant_kernels();
  at::Tensor y = at::empty({T, R}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* w = W.data_ptr<uint8_t>();
  parallel_chunks(R, 16, 8, [&](int64_t r0, int64_t r1, int64_t) {
    kernels.rows_dots(q4_k, w, W.size(1), rp, r0, r1, in.data(), T, yp, R);
  });
  return y;
}

at::Tensor down_k(const at::Tensor& codes, const at::Tensor& table, const at::Tensor& ids, const at::Tensor& a,
                  const std::string& kernel, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(kernel == "q4_k" || kernel == "q6_k", "no K-quant product for ", kernel);
  TORCH_CHECK(table.dim() == 3 && table.size(1) == (kernel == "q4_k" ? 8 : 9), "table does not hold ", kernel, " heads");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.dim() == 1, "ids: int64 [j]");
  const int64_t j = ids.numel(), group = kernel == "q4_k" ? 32 : 16;
  const int64_t* idp = ids.data_ptr<int64_t>();
  const int64_t* rp = nullptr;  // entry i's codes are row rows[i] of `codes` (the token-wise method's chosen neurons, in place)
  if (rows.has_value()) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->is_contiguous() && rows->numel() == j, "rows: int64 [j]");
    rp = rows->data_ptr<int64_t>();
    for (int64_t i = 0; i < j; ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < codes.size(0), "row ", rp[i], " out of range");
  } else {
    TORCH_CHECK(codes.size(0) == j, "codes: one row per id");
  }
  at::Tensor keys = at::zeros({codes.size(0)}, ids.options());  // each codes row's sub-block
  int64_t* kp = keys.data_ptr<int64_t>();
  for (int64_t i = 0; i < j; ++i) {
    TORCH_CHECK(idp[i] >= 0, "neuron id ", idp[i], " is negative");
    kp[rp ? rp[i] : i] = idp[i] / group;
  }
  const KColumns W = k_columns_of(codes, table, keys, "down");
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.is_contiguous() && a.dim() == 2 && a.size(1) == j, "a: contiguous fp32 [T, j]");
  const int64_t T = a.size(0), d = W.d;
  std::vector<float> units(T * W.n_keys);  // [T, n_keys]
  std::vector<float> one;
  for (int64_t t = 0; t < T; ++t) {
    k_column_units(W, a.data_ptr<float>() + t * j, rp, j, one);
    std::copy(one.begin(), one.end(), units.begin() + t * W.n_keys);
  }
  // The threads take chunks of the neurons (whole sub-block groups: the sorted order keeps a group's rows
  // together), each summed into a partial output of its own: two chunks per thread, so that the partials
  // of a 128-token prompt stay under 4 MiB.
  constexpr int per_thread = 2;
  const int64_t parts = per_thread * at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(parts) * T * d, 0.0f);
  const KQuantKernels& kernels = k_quant_kernels();
  parallel_chunks(j, 32, per_thread, [&](int64_t r0, int64_t r1, int64_t chunk) {
    kernels.axpy_columns(W, a.data_ptr<float>(), T, j, rp, units.data(), partial.data() + chunk * T * d, d, r0, r1);
  });
  at::Tensor y = at::zeros({T, d}, a.options());
  float* yp = y.data_ptr<float>();
  for (int64_t p = 0; p < parts; ++p)
    for (int64_t i = 0; i < T * d; ++i) yp[i] += partial[p * T * d + i];
  return y;
}

}  // namespace kq
