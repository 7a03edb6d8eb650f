// Kernels for compact weight rows (common/formats/blocks.py: ggml Q4_1 and Q8_0 blocks of 32 along a row).
//
// Included twice by compact_input.h, inside `namespace avx2` and, compiled for AVX-512 VNNI, inside
// `namespace vnni` (PARTINFER_VNNI defined); the loader picks one set once per process.
//
// As llama.cpp does on the CPU, the input vector is quantized once per matrix to 8 bits per weight
// in blocks of 32 (`QuantizedInput`: codes q, scale d, and d * sum(q) for Q4_1's minimum term), so a
// block's dot product is 32 integer multiply-adds and one scaled float FMA:
//   Q4_1 . x = d_w d_x sum(q_w q_x) + m_w (d_x sum q_x)     (q_w unsigned 4-bit, q_x signed 8-bit)
//   Q8_0 . x = d_w d_x sum(q_w q_x)                          (both signed: |q_w| times sign-adjusted q_x)
// The u8 x s8 products are `vpmaddubsw` + `vpmaddwd` on AVX2 and one `vpdpbusd` with VNNI.
// The transposed product (down columns summed with per-neuron weights, `axpy_columns`) sums per
// block of 32 neurons and applies the block's scales once per output: Q4_1 codes in integers with
// the block's activations quantized to 8 bits (two neurons per `vpmaddubsw`), Q8_0 codes in fp32.

// u8 x s8 products of 32 byte pairs, summed in fours -> 8 int32 lanes.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef PARTINFER_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// One Q4_1 block (20 bytes) . 32 quantized inputs, as a vector of 8 partial int sums scaled to float.
inline __m256 block_q4_1(const uint8_t* w, const int8_t* q) {
  const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 4));
  const __m256i qw = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(codes, 4), codes), _mm256_set1_epi8(0x0F));
  return _mm256_cvtepi32_ps(dot_u8s8(qw, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))));
}

inline __m256 block_q8_0(const uint8_t* w, const int8_t* q) {
  const __m256i qw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
  const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  return _mm256_cvtepi32_ps(dot_u8s8(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw)));
}

// Row of nb Q4_1 blocks . the quantized input. A block's fp16 (d, m) pair is widened by one
// conversion and multiplied by the input's (d_x, d_x sum q_x) pair at once: the first lane scales
// the integer sum, the second is the minimum's term, summed in a vector (no scalar chain). Two blocks
// per pass for two independent FMA chains.
inline float dot_q4_1(const uint8_t* w, int64_t nb, const QuantizedInput& in) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m128 mins = _mm_setzero_ps();
  const float* ds = in.ds.data();  // (d_x, s_x) per block
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2, w += 2 * Q4_1_BYTES) {
    const __m128 s0 = _mm_mul_ps(fp16_pair(w), _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(ds + 2 * b))));
    const __m128 s1 = _mm_mul_ps(fp16_pair(w + Q4_1_BYTES),
                                 _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(ds + 2 * b + 2))));
    acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(s0), block_q4_1(w, in.q.data() + 32 * b), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_broadcastss_ps(s1), block_q4_1(w + Q4_1_BYTES, in.q.data() + 32 * (b + 1)), acc1);
    mins = _mm_add_ps(mins, _mm_add_ps(s0, s1));
  }
  for (; b < nb; ++b, w += Q4_1_BYTES) {
    const __m128 s0 = _mm_mul_ps(fp16_pair(w), _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(ds + 2 * b))));
    acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(s0), block_q4_1(w, in.q.data() + 32 * b), acc0);
    mins = _mm_add_ps(mins, s0);
  }
  return hsum(_mm256_add_ps(acc0, acc1)) + _mm_cvtss_f32(_mm_shuffle_ps(mins, mins, 1));
}

inline float dot_q8_0(const uint8_t* w, int64_t nb, const QuantizedInput& in) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2, w += 2 * Q8_0_BYTES) {
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(fp16_to_float(w) * in.d[b]), block_q8_0(w, in.q.data() + 32 * b), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_set1_ps(fp16_to_float(w + Q8_0_BYTES) * in.d[b + 1]),
                           block_q8_0(w + Q8_0_BYTES, in.q.data() + 32 * (b + 1)), acc1);
  }
  for (; b < nb; ++b, w += Q8_0_BYTES)
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(fp16_to_float(w) * in.d[b]), block_q8_0(w, in.q.data() + 32 * b), acc0);
  return hsum(_mm256_add_ps(acc0, acc1));
}

// y[r] = W[row(r)] . x for r in [r0, r1), W compact rows (Q4_1 or Q8_0); rows are prefetched ahead
// (rows_ahead), which matters most for rows gathered out of order (token-wise).
void gemv_rows(const CompactMatrix& W, const QuantizedInput& in, const int64_t* rows, float* y, int64_t r0, int64_t r1) {
  const int64_t nb = W.cols / 32, ahead = rows_ahead(W.row_bytes, rows != nullptr);
  for (int64_t r = r0; r < r1; ++r) {
    if (ahead && r + ahead < r1) prefetch_row(W.row(rows ? rows[r + ahead] : r + ahead), W.row_bytes);
    const uint8_t* w = W.row(rows ? rows[r] : r);
    y[r] = W.q4 ? dot_q4_1(w, nb, in) : dot_q8_0(w, nb, in);
  }
}

// One neuron's Q8_0 codes for 32 consecutive outputs, times a, added into acc[0..3] (outputs 0-7,
// 8-15, 16-23, 24-31).
inline void axpy_codes_q8(const uint8_t* c, __m256 a, __m256* acc) {
  const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
  const __m128i lo = _mm256_castsi256_si128(codes), hi = _mm256_extracti128_si256(codes, 1);
  acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), a, acc[0]);
  acc[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), a, acc[1]);
  acc[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), a, acc[2]);
  acc[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), a, acc[3]);
}

// acc[D] += sum_j a[j] codes_j over n (<= 4) neurons' Q8_0 codes, four per pass so that each group of
// the accumulator is loaded and stored once per four neurons.
inline void axpy_codes(const ColumnMatrix& W, const uint8_t* const* c, const float* a, int n, float* acc) {
  const int64_t groups = W.cols / 32, step = 32;
  __m256 s[4];
  for (int j = 0; j < n; ++j) s[j] = _mm256_set1_ps(a[j]);
  for (int64_t g = 0; g < groups; ++g) {
    float* o = acc + 32 * g;
    __m256 v[4] = {_mm256_loadu_ps(o), _mm256_loadu_ps(o + 8), _mm256_loadu_ps(o + 16), _mm256_loadu_ps(o + 24)};
    for (int j = 0; j < n; ++j) axpy_codes_q8(c[j] + g * step, s[j], v);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + 8 * i, v[i]);
  }
}

// Q4_1 codes of up to 16 neurons of one block with 8-bit activations qa (pairs: neurons 2p, 2p + 1),
// summed in int16 per output and added, as floats, into acc[D]. Two neurons' codes are interleaved
// byte by byte so that one u8 x s8 multiply-add (`vpmaddubsw`) takes both: 64 weights per two
// multiply-adds, where the fp32 path needs eight FMAs. |sum| <= 16 * 15 * 127 < 2^15: no overflow.
inline void axpy_codes_q4_int(const ColumnMatrix& W, const uint8_t* const* c, const int8_t* qa, int n, float* acc) {
  const int pairs = (n + 1) / 2;
  __m256i act[8];
  for (int p = 0; p < pairs; ++p) {
    const int8_t second = 2 * p + 1 < n ? qa[2 * p + 1] : 0;
    act[p] = _mm256_set1_epi16(static_cast<int16_t>(static_cast<uint8_t>(qa[2 * p]) | (static_cast<uint16_t>(static_cast<uint8_t>(second)) << 8)));
  }
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < W.cols / 32; ++g) {
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();  // outputs 0-15, 16-31 of this group
    for (int p = 0; p < pairs; ++p) {
      const uint8_t* c1 = c[2 * p] + 16 * g;
      const uint8_t* c2 = (2 * p + 1 < n ? c[2 * p + 1] : c[2 * p]) + 16 * g;
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c1));
      const __m128i y = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c2));
      const __m128i xl = _mm_and_si128(x, low4), yl = _mm_and_si128(y, low4);
      const __m128i xh = _mm_and_si128(_mm_srli_epi16(x, 4), low4), yh = _mm_and_si128(_mm_srli_epi16(y, 4), low4);
      const __m256i lo = _mm256_set_m128i(_mm_unpackhi_epi8(xl, yl), _mm_unpacklo_epi8(xl, yl));
      const __m256i hi = _mm256_set_m128i(_mm_unpackhi_epi8(xh, yh), _mm_unpacklo_epi8(xh, yh));
      s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(lo, act[p]));
      s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(hi, act[p]));
    }
    float* o = acc + 32 * g;
    const __m256i parts[4] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(s0)), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s0, 1)),
                              _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s1)), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s1, 1))};
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + 8 * i, _mm256_add_ps(_mm256_loadu_ps(o + 8 * i), _mm256_cvtepi32_ps(parts[i])));
  }
}

// out[D] += sum_{r in [r0, r1)} a[r] * W[row(r)] for down columns: the rows are grouped by their block
// (a counting sort of this share), each block's codes summed with the activations into acc, and the
// block's scales applied once per output: out += d * acc (+ m * sum of the block's a for Q4_1).
// Q4_1 sums in integers, as the row kernels do: the block's activations are quantized to 8 bits with
// the scale unit[b] (`column_block_units`, as llama.cpp quantizes down's input per block of 32), acc
// in units of it; Q8_0 sums the fp32 activations (`axpy_codes`; unit unused).
void axpy_columns(const ColumnMatrix& W, const float* a, const int64_t* rows, const float* unit, float* out, int64_t r0,
                  int64_t r1) {
  const int64_t nb = W.n_blocks, D = W.cols;
  thread_local RowGroups groups;
  thread_local std::vector<float> acc;
  groups.sort(W.blocks, nb, rows, r0, r1);
  const std::vector<int64_t>&start = groups.start, &order = groups.order;
  acc.resize(D);
  for (int64_t b = 0; b < nb; ++b) {
    if (start[b] == start[b + 1]) continue;
    std::fill(acc.begin(), acc.end(), 0.0f);
    float a_sum = 0.0f;
    for (int64_t i = start[b]; i < start[b + 1]; ++i) a_sum += a[order[i]];
    const float scale = W.q4 ? unit[b] : 1.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
    const int64_t per_pass = W.q4 ? 16 : 4;
    for (int64_t i = start[b]; i < start[b + 1]; i += per_pass) {
      const int n = static_cast<int>(std::min<int64_t>(per_pass, start[b + 1] - i));
      const uint8_t* c[16];
      float aj[16];
      int8_t qa[16];
      for (int j = 0; j < n; ++j) {
        const int64_t r = order[i + j];
        c[j] = W.row(rows ? rows[r] : r);
        aj[j] = a[r];
        qa[j] = static_cast<int8_t>(std::nearbyint(a[r] * inv));  // round half to even, as torch.round
      }
      for (int j = 0; j < n && i + per_pass + j < start[b + 1]; ++j) {
        const int64_t r = order[i + per_pass + j];
        prefetch_row(W.row(rows ? rows[r] : r), W.code_bytes);
      }
      if (W.q4)
        axpy_codes_q4_int(W, c, qa, n, acc.data());
      else
        axpy_codes(W, c, aj, n, acc.data());
    }
    const uint16_t* d = W.scales(b);
    const __m256 step = _mm256_set1_ps(scale), sum = _mm256_set1_ps(a_sum);
    for (int64_t i = 0; i < D; i += 8) {
      const __m256 ds = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + i))), step);
      __m256 y = _mm256_fmadd_ps(ds, _mm256_loadu_ps(acc.data() + i), _mm256_loadu_ps(out + i));
      if (W.q4) y = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + D + i))), sum, y);
      _mm256_storeu_ps(out + i, y);
    }
  }
}
