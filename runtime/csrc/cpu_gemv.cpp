// Batch-1 decode kernels for bf16 weights on x86 CPUs with AVX2 + FMA (no native bf16 arithmetic).
//
// Why: a decode step is a chain of matrix-vector products whose cost is reading the weights once.
// Stock bf16 GEMV in PyTorch reaches 11-18 GB/s on the 2-core development CPU (29.8 GB/s copy), so
// these kernels widen bf16 to fp32 in registers (a 16-bit shift) and stream each weight row once,
// four rows at a time, rows split across threads with at::parallel_for.
//
//   gemv(W [N, K] bf16, x [K] fp32|bf16, rows [R] int64 or empty) -> y [R or N] in x's dtype, y_r = W[rows[r]] . x
//   gemv_t(W [N, K] bf16, a [R] fp32, rows [R] int64 or empty)    -> y [K] fp32,       y = sum_r a_r W[rows[r]]
//
// `rows` lets the token-wise method read only its chosen neurons' rows in place (no gathered copy).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cstring>
#include <vector>

namespace {

inline __m256 load_bf16x8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

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

// y[r] = W[row(r)] . x for r in [r0, r1).
void gemv_rows(const uint16_t* W, int64_t K, const float* x, const int64_t* rows, float* y, int64_t r0, int64_t r1) {
  const int64_t K16 = K & ~int64_t(15);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const uint16_t* w[4];
    for (int j = 0; j < 4; ++j) w[j] = W + (rows ? rows[r + j] : r + j) * K;
    __m256 acc[4][2];
    for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < K16; i += 16) {
      __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
      for (int j = 0; j < 4; ++j) {
        acc[j][0] = _mm256_fmadd_ps(load_bf16x8(w[j] + i), x0, acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(load_bf16x8(w[j] + i + 8), x1, acc[j][1]);
      }
    }
    for (int j = 0; j < 4; ++j) {
      float s = hsum(_mm256_add_ps(acc[j][0], acc[j][1]));
      for (int64_t i = K16; i < K; ++i) s += bf16_to_float(w[j][i]) * x[i];
      y[r + j] = s;
    }
  }
  for (; r < r1; ++r) {
    const uint16_t* w = W + (rows ? rows[r] : r) * K;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < K16; i += 8) acc = _mm256_fmadd_ps(load_bf16x8(w + i), _mm256_loadu_ps(x + i), acc);
    float s = hsum(acc);
    for (int64_t i = K16; i < K; ++i) s += bf16_to_float(w[i]) * x[i];
    y[r] = s;
  }
}

// out[0:K] += sum_{r in [r0, r1)} a[r] * W[row(r)].
void axpy_rows(const uint16_t* W, int64_t K, const float* a, const int64_t* rows, float* out, int64_t r0, int64_t r1) {
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* w = W + (rows ? rows[r] : r) * K;
    __m256 s = _mm256_set1_ps(a[r]);
    for (int64_t i = 0; i < K8; i += 8)
      _mm256_storeu_ps(out + i, _mm256_fmadd_ps(load_bf16x8(w + i), s, _mm256_loadu_ps(out + i)));
    for (int64_t i = K8; i < K; ++i) out[i] += a[r] * bf16_to_float(w[i]);
  }
}

void check(const at::Tensor& W, const at::Tensor& v, const at::Tensor& rows) {
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kBFloat16 && W.is_contiguous() && W.device().is_cpu(),
              "W must be a contiguous 2-D bf16 CPU tensor");
  TORCH_CHECK(v.dim() == 1 && v.is_contiguous(), "vector must be a contiguous 1-D tensor");
  TORCH_CHECK(rows.numel() == 0 || (rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous()),
              "rows must be a contiguous int64 vector (or empty for all rows)");
}

at::Tensor gemv(const at::Tensor& W, const at::Tensor& x, const at::Tensor& rows) {
  check(W, x, rows);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  const int64_t K = W.size(1);
  TORCH_CHECK(x.size(0) == K, "x has ", x.size(0), " elements, W rows have ", K);
  const int64_t R = rows.numel() ? rows.numel() : W.size(0);
  // A bf16 x is widened once and the result rounded back once: one op per linear for the caller.
  const bool half = x.scalar_type() == at::kBFloat16;
  at::Tensor xf = half ? x.to(at::kFloat) : x;
  at::Tensor y = at::empty({R}, xf.options());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
  const int64_t* idx = rows.numel() ? rows.data_ptr<int64_t>() : nullptr;
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (R + 3) / 4, 16, [&](int64_t b, int64_t e) {
    gemv_rows(w, K, xp, idx, yp, b * 4, std::min(e * 4, R));
  });
  return half ? y.to(at::kBFloat16) : y;
}

at::Tensor gemv_t(const at::Tensor& W, const at::Tensor& a, const at::Tensor& rows) {
  check(W, a, rows);
  TORCH_CHECK(a.scalar_type() == at::kFloat, "a must be fp32");
  const int64_t K = W.size(1);
  const int64_t R = rows.numel() ? rows.numel() : W.size(0);
  TORCH_CHECK(a.size(0) == R, "a has ", a.size(0), " elements for ", R, " rows");
  const uint16_t* w = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
  const int64_t* idx = rows.numel() ? rows.data_ptr<int64_t>() : nullptr;
  const float* ap = a.data_ptr<float>();
  const int threads = std::max<int>(1, std::min<int64_t>(at::get_num_threads(), R / 64));
  std::vector<float> partial(static_cast<size_t>(threads) * K, 0.0f);
  const int64_t chunk = (R + threads - 1) / threads;
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      axpy_rows(w, K, ap, idx, partial.data() + t * K, t * chunk, std::min(R, (t + 1) * chunk));
  });
  at::Tensor y = at::zeros({K}, a.options());
  float* yp = y.data_ptr<float>();
  for (int t = 0; t < threads; ++t)
    for (int64_t i = 0; i < K; ++i) yp[i] += partial[t * K + i];
  return y;
}

}  // namespace

TORCH_LIBRARY(partinfer_cpu, m) {
  m.def("gemv(Tensor W, Tensor x, Tensor rows) -> Tensor", gemv);
  m.def("gemv_t(Tensor W, Tensor a, Tensor rows) -> Tensor", gemv_t);
}
