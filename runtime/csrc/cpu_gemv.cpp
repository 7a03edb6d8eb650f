// Batch-1 decode kernels for bf16 weights on x86 CPUs with AVX2 + FMA (no native bf16 arithmetic).
//
// Why: a decode step is a chain of matrix-vector products whose cost is reading the weights once.
// Stock bf16 GEMV in PyTorch reaches 11-18 GB/s on the 2-core development CPU (29.8 GB/s copy), so
// these kernels widen bf16 to fp32 in registers (a 16-bit shift) and stream each weight row once,
// four rows at a time, rows split across threads with at::parallel_for.
//
//   gemv(W [N, K] bf16, x [K] fp32|bf16, rows [R] int64 or None)  -> y [R or N] in x's dtype, y_r = W[rows[r]] . x
//   gemv_t(W [N, K] bf16, a [R] fp32, rows [R] int64 or None)     -> y [K] fp32,       y = sum_r a_r W[rows[r]]
//   rms_norm(x [..., K] bf16, w [K] bf16, eps)                    -> bf16, one op for the eight of the
//       eager form (fp32 math, rounded to bf16 before * w as transformers' Llama RMSNorm does).
//   attention_decode(...) / ffn_decode(...): one decode token through a whole attention or gated
//       SiLU FFN sublayer in one op (fp32 inside, bf16 in the KV cache and at the output): an eager
//       decode step is otherwise ~60 small ops per layer, and at batch 1 their fixed costs rival the
//       weight streaming itself.
//
// `rows` lets the token-wise method read only its chosen neurons' rows in place (no gathered copy).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <optional>
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

void check(const at::Tensor& W, const at::Tensor& v, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kBFloat16 && W.is_contiguous() && W.device().is_cpu(),
              "W must be a contiguous 2-D bf16 CPU tensor");
  TORCH_CHECK(v.dim() == 1 && v.is_contiguous(), "vector must be a contiguous 1-D tensor");
  TORCH_CHECK(!rows || (rows->dim() == 1 && rows->scalar_type() == at::kLong && rows->is_contiguous()),
              "rows must be a contiguous int64 vector (or None for all rows)");
}

at::Tensor gemv(const at::Tensor& W, const at::Tensor& x, const std::optional<at::Tensor>& rows) {
  check(W, x, rows);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  const int64_t K = W.size(1);
  TORCH_CHECK(x.size(0) == K, "x has ", x.size(0), " elements, W rows have ", K);
  const int64_t R = rows ? rows->numel() : W.size(0);
  // A bf16 x is widened once and the result rounded back once: one op per linear for the caller.
  const bool half = x.scalar_type() == at::kBFloat16;
  at::Tensor xf = half ? x.to(at::kFloat) : x;
  at::Tensor y = at::empty({R}, xf.options());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
  const int64_t* idx = rows ? rows->data_ptr<int64_t>() : nullptr;
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (R + 3) / 4, 16, [&](int64_t b, int64_t e) {
    gemv_rows(w, K, xp, idx, yp, b * 4, std::min(e * 4, R));
  });
  return half ? y.to(at::kBFloat16) : y;
}

at::Tensor gemv_t(const at::Tensor& W, const at::Tensor& a, const std::optional<at::Tensor>& rows) {
  check(W, a, rows);
  TORCH_CHECK(a.scalar_type() == at::kFloat, "a must be fp32");
  const int64_t K = W.size(1);
  const int64_t R = rows ? rows->numel() : W.size(0);
  TORCH_CHECK(a.size(0) == R, "a has ", a.size(0), " elements for ", R, " rows");
  const uint16_t* w = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
  const int64_t* idx = rows ? rows->data_ptr<int64_t>() : nullptr;
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

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && x.is_contiguous() &&
              weight.is_contiguous() && x.device().is_cpu(), "rms_norm takes contiguous bf16 CPU tensors");
  const int64_t K = x.size(-1);
  TORCH_CHECK(weight.numel() == K, "weight has ", weight.numel(), " elements for rows of ", K);
  const int64_t rows = x.numel() / K;
  at::Tensor y = at::empty_like(x);
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = weight.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  for (int64_t r = 0; r < rows; ++r) {
    const at::BFloat16* xr = xp + r * K;
    float ss = 0.0f;
    for (int64_t i = 0; i < K; ++i) ss += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(K) + static_cast<float>(eps));
    for (int64_t i = 0; i < K; ++i) {
      const at::BFloat16 normed(static_cast<float>(xr[i]) * scale);
      yp[r * K + i] = at::BFloat16(static_cast<float>(normed) * static_cast<float>(wp[i]));
    }
  }
  return y;
}

// y [R] fp32 = W[rows] @ x for fp32 x, parallel over rows.
void gemv_f32(const at::Tensor& W, const float* x, float* y) {
  const int64_t R = W.size(0), K = W.size(1);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
  at::parallel_for(0, (R + 3) / 4, 16, [&](int64_t b, int64_t e) {
    gemv_rows(w, K, x, nullptr, y, b * 4, std::min(e * 4, R));
  });
}

void check_weight(const at::Tensor& W, int64_t cols, const char* name) {
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kBFloat16 && W.is_contiguous() && W.size(1) == cols,
              name, " must be a contiguous bf16 matrix with ", cols, " columns");
}

// x [D] bf16 (normed), qkv_w [(H + 2 Hkv) hd, D], o_w [D, H hd], k_cache/v_cache [Hkv, S, hd] bf16
// (this layer, batch 1), cos/sin [hd] for this position; writes slot `pos` of the caches and attends
// causally over slots 0..pos. Returns [D] bf16.
at::Tensor attention_decode(const at::Tensor& x, const at::Tensor& qkv_w, const at::Tensor& o_w, at::Tensor k_cache,
                            at::Tensor v_cache, const at::Tensor& cos, const at::Tensor& sin, int64_t pos,
                            int64_t n_heads, int64_t n_kv_heads) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16");
  TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.dim() == 3, "caches must be contiguous bf16 [Hkv, S, hd]");
  const int64_t D = x.numel(), hd = k_cache.size(2), S = k_cache.size(1), half = hd / 2;
  TORCH_CHECK(pos >= 0 && pos < S, "position ", pos, " outside the cache of ", S);
  check_weight(qkv_w, D, "qkv weight");
  check_weight(o_w, n_heads * hd, "o weight");
  TORCH_CHECK(qkv_w.size(0) == (n_heads + 2 * n_kv_heads) * hd, "qkv weight rows do not match the heads");
  at::Tensor xf = x.to(at::kFloat), cf = cos.to(at::kFloat).contiguous(), sf = sin.to(at::kFloat).contiguous();
  std::vector<float> qkv(qkv_w.size(0));
  gemv_f32(qkv_w, xf.data_ptr<float>(), qkv.data());
  const float* c = cf.data_ptr<float>();
  const float* sn = sf.data_ptr<float>();
  for (int64_t h = 0; h < n_heads + n_kv_heads; ++h) {  // rope on q and k heads
    float* v = qkv.data() + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * c[i] - b * sn[i];
      v[i + half] = b * c[i + half] + a * sn[i + half];
    }
  }
  at::BFloat16* kc = k_cache.data_ptr<at::BFloat16>();
  at::BFloat16* vc = v_cache.data_ptr<at::BFloat16>();
  for (int64_t h = 0; h < n_kv_heads; ++h)
    for (int64_t i = 0; i < hd; ++i) {
      kc[(h * S + pos) * hd + i] = at::BFloat16(qkv[(n_heads + h) * hd + i]);
      vc[(h * S + pos) * hd + i] = at::BFloat16(qkv[(n_heads + n_kv_heads + h) * hd + i]);
    }
  std::vector<float> out(n_heads * hd, 0.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t group = n_heads / n_kv_heads;
  at::parallel_for(0, n_heads, 1, [&](int64_t b, int64_t e) {
    std::vector<float> p(pos + 1);
    for (int64_t h = b; h < e; ++h) {
      const float* q = qkv.data() + h * hd;
      const at::BFloat16* K = kc + (h / group) * S * hd;
      const at::BFloat16* V = vc + (h / group) * S * hd;
      float mx = -INFINITY;
      for (int64_t j = 0; j <= pos; ++j) {
        float dot = 0.0f;
        for (int64_t i = 0; i < hd; ++i) dot += q[i] * static_cast<float>(K[j * hd + i]);
        p[j] = dot * scale;
        mx = std::max(mx, p[j]);
      }
      float total = 0.0f;
      for (int64_t j = 0; j <= pos; ++j) total += (p[j] = std::exp(p[j] - mx));
      float* o = out.data() + h * hd;
      for (int64_t j = 0; j <= pos; ++j) {
        const float w = p[j] / total;
        for (int64_t i = 0; i < hd; ++i) o[i] += w * static_cast<float>(V[j * hd + i]);
      }
    }
  });
  at::Tensor y = at::empty({D}, xf.options());
  gemv_f32(o_w, out.data(), y.data_ptr<float>());
  return y.to(at::kBFloat16);
}

// x [D] bf16 (normed), gate_up [2m, D] (rows g0..g_{m-1}, u0.. when !interleaved; g0, u0, g1, u1, ... when
// interleaved), down [D, m]: y = down @ (silu(gate x) * (up x)), [D] bf16.
at::Tensor ffn_decode(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, bool interleaved) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16");
  const int64_t D = x.numel(), m = gate_up.size(0) / 2;
  check_weight(gate_up, D, "gate_up");
  check_weight(down, m, "down");
  at::Tensor xf = x.to(at::kFloat);
  std::vector<float> h(2 * m), a(m);
  gemv_f32(gate_up, xf.data_ptr<float>(), h.data());
  for (int64_t i = 0; i < m; ++i) {
    const float g = interleaved ? h[2 * i] : h[i], u = interleaved ? h[2 * i + 1] : h[m + i];
    a[i] = g / (1.0f + std::exp(-g)) * u;
  }
  at::Tensor y = at::empty({D}, xf.options());
  gemv_f32(down, a.data(), y.data_ptr<float>());
  return y.to(at::kBFloat16);
}

}  // namespace

TORCH_LIBRARY(partinfer_cpu, m) {
  m.def("gemv(Tensor W, Tensor x, Tensor? rows=None) -> Tensor", gemv);
  m.def("gemv_t(Tensor W, Tensor a, Tensor? rows=None) -> Tensor", gemv_t);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", rms_norm);
  m.def("attention_decode(Tensor x, Tensor qkv_w, Tensor o_w, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cos, "
        "Tensor sin, int pos, int n_heads, int n_kv_heads) -> Tensor", attention_decode);
  m.def("ffn_decode(Tensor x, Tensor gate_up, Tensor down, bool interleaved) -> Tensor", ffn_decode);
}
