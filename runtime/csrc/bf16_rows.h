// bf16 weight rows: widening loads, the row dot product, and the row GEMV / transposed GEMV loops.
// Included by partinfer_cpu.cpp inside its anonymous namespace (one translation unit).


inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// Loads 16 bf16 weights as two fp32 vectors without a permute: the even elements (low halves of the
// 32-bit lanes, shifted up) and the odd ones (high halves, masked). x is split the same way once per
// call (xe = x[0::2], xo = x[1::2]), so a dot product costs 1 load + 1 shift + 1 and + 2 FMA per 16
// weights: few enough micro-ops that two cores keep up with memory.
inline void load_bf16x16(const uint16_t* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// x . w for a bf16 row of n (a multiple of 16) elements; xe/xo = even/odd halves of x. `ahead`
// (or nullptr) is the row the caller reads next: its cache lines are prefetched in step with w's,
// one row ahead, which covers rows gathered out of order too. Four accumulators, 32 weights per pass.
inline float dot_bf16(const float* xe, const float* xo, const uint16_t* w, int64_t n, const uint16_t* ahead = nullptr) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {  // one 64-byte cache line of weights per pass
    if (ahead) _mm_prefetch(reinterpret_cast<const char*>(ahead + i), _MM_HINT_T0);
    __m256 e0, o0, e1, o1;
    load_bf16x16(w + i, e0, o0);
    load_bf16x16(w + i + 16, e1, o1);
    acc0 = _mm256_fmadd_ps(e0, _mm256_loadu_ps(xe + i / 2), acc0);
    acc1 = _mm256_fmadd_ps(o0, _mm256_loadu_ps(xo + i / 2), acc1);
    acc2 = _mm256_fmadd_ps(e1, _mm256_loadu_ps(xe + i / 2 + 8), acc2);
    acc3 = _mm256_fmadd_ps(o1, _mm256_loadu_ps(xo + i / 2 + 8), acc3);
  }
  for (; i < n; i += 16) {
    if (ahead) _mm_prefetch(reinterpret_cast<const char*>(ahead + i), _MM_HINT_T0);
    __m256 e, o;
    load_bf16x16(w + i, e, o);
    acc0 = _mm256_fmadd_ps(e, _mm256_loadu_ps(xe + i / 2), acc0);
    acc1 = _mm256_fmadd_ps(o, _mm256_loadu_ps(xo + i / 2), acc1);
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}

// Even/odd halves of the first K16 elements of x (K16 = K rounded down to 16).
void split_even_odd(const float* x, int64_t K16, std::vector<float>& xe, std::vector<float>& xo) {
  xe.resize(K16 / 2);
  xo.resize(K16 / 2);
  for (int64_t j = 0; j < K16 / 2; ++j) {
    xe[j] = x[2 * j];
    xo[j] = x[2 * j + 1];
  }
}

// y[r] = W[row(r)] . x for r in [r0, r1); xe/xo from split_even_odd. One row at a time, each read
// front to back while the next is prefetched: measured on a decode step's matrices (2 threads),
// 18-20.5 GB/s against 14-17 for four interleaved rows with prefetching 16 rows ahead, and
// 20-24 GB/s for a loop that only loads the same bytes.
void gemv_rows(const uint16_t* W, int64_t K, const float* x, const float* xe, const float* xo, const int64_t* rows,
               float* y, int64_t r0, int64_t r1) {
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* w = W + (rows ? rows[r] : r) * K;
    const uint16_t* ahead = r + 1 < r1 ? W + (rows ? rows[r + 1] : r + 1) * K : nullptr;
    float s = dot_bf16(xe, xo, w, K16, ahead);
    for (int64_t i = K16; i < K; ++i) s += bf16_to_float(w[i]) * x[i];
    y[r] = s;
  }
}

// out_even/out_odd (even/odd halves of the first K16 outputs) and out_tail (the rest) +=
// sum_{r in [r0, r1)} a[r] * W[row(r)].
void axpy_rows(const uint16_t* W, int64_t K, const float* a, const int64_t* rows, float* out_even, float* out_odd,
               float* out_tail, int64_t r0, int64_t r1) {
  const int64_t K16 = K & ~int64_t(15);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {  // four rows per pass: one load/store of the accumulators per four weight rows
    const uint16_t* w[4];
    const uint16_t* ahead[4];  // prefetched 16 rows on
    __m256 s[4];
    for (int j = 0; j < 4; ++j) {
      w[j] = W + (rows ? rows[r + j] : r + j) * K;
      const int64_t next = std::min(r + 16 + j, r1 - 1);
      ahead[j] = W + (rows ? rows[next] : next) * K;
      s[j] = _mm256_set1_ps(a[r + j]);
    }
    for (int64_t i = 0; i < K16; i += 16) {
      if ((i & 31) == 0)
        for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(ahead[j] + i), _MM_HINT_T0);
      __m256 acc_e = _mm256_loadu_ps(out_even + i / 2), acc_o = _mm256_loadu_ps(out_odd + i / 2);
      for (int j = 0; j < 4; ++j) {
        __m256 e, o;
        load_bf16x16(w[j] + i, e, o);
        acc_e = _mm256_fmadd_ps(e, s[j], acc_e);
        acc_o = _mm256_fmadd_ps(o, s[j], acc_o);
      }
      _mm256_storeu_ps(out_even + i / 2, acc_e);
      _mm256_storeu_ps(out_odd + i / 2, acc_o);
    }
    for (int j = 0; j < 4; ++j)
      for (int64_t i = K16; i < K; ++i) out_tail[i - K16] += a[r + j] * bf16_to_float(w[j][i]);
  }
  for (; r < r1; ++r) {
    const uint16_t* w = W + (rows ? rows[r] : r) * K;
    const __m256 s = _mm256_set1_ps(a[r]);
    for (int64_t i = 0; i < K16; i += 16) {
      __m256 e, o;
      load_bf16x16(w + i, e, o);
      _mm256_storeu_ps(out_even + i / 2, _mm256_fmadd_ps(e, s, _mm256_loadu_ps(out_even + i / 2)));
      _mm256_storeu_ps(out_odd + i / 2, _mm256_fmadd_ps(o, s, _mm256_loadu_ps(out_odd + i / 2)));
    }
    for (int64_t i = K16; i < K; ++i) out_tail[i - K16] += a[r] * bf16_to_float(w[i]);
  }
}

