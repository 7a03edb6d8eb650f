// Batch-1 decode kernels for bf16 weights on x86 CPUs with AVX2 + FMA (no native bf16 arithmetic).
//
// Why: a decode step is a chain of matrix-vector products whose cost is reading the weights once.
// Stock bf16 GEMV in PyTorch reaches 11-18 GB/s on the 2-core development CPU (29.8 GB/s copy), so
// these kernels widen bf16 to fp32 in registers (a 16-bit shift) and stream each weight row once,
// front to back with the next row prefetched in step (see gemv_rows for the measurements), rows
// split across threads (at::parallel_for for the single ops; one OpenMP team for a whole decode step).
//
//   gemv(W [N, K] bf16, x [K] fp32|bf16, rows [R] int64 or None)  -> y [R or N] in x's dtype, y_r = W[rows[r]] . x
//   gemv_t(W [N, K] bf16, a [R] fp32, rows [R] int64 or None)     -> y [K] fp32,       y = sum_r a_r W[rows[r]]
//   rms_norm(x [..., K] bf16, w [K] bf16, eps)                    -> bf16, one op for the eight of the
//       eager form (fp32 math, rounded to bf16 before * w as transformers' Llama RMSNorm does).
//   model_decode(...): every pre-norm layer (norms, attention, gated SiLU FFN, residuals) in one op.
//       An eager decode step is ~60 small ops per layer, and at batch 1 their fixed costs rival the
//       weight streaming itself.
//   argmax(x [B, V] fp32|bf16) -> [B] int64, as torch.argmax(x, -1): the greedy sampler's per-token pick.
//
// `rows` lets the token-wise method read only its chosen neurons' rows in place (no gathered copy).
//
// Compact weights (uint8 rows of Q4_1 or Q8_0 blocks, runtime/quant.py) are taken wherever a bf16
// matrix is, by `gemv` and by `model_decode` (kernels in compact_rows.h, an AVX2 and an AVX-512
// VNNI build chosen once per process: `compact_kernel_path()`); `dequantize` expands them for prefill.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace {

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

constexpr int64_t Q4_1_BYTES = 20, Q8_0_BYTES = 34;  // bytes per block of 32 weights (runtime/quant.py)

inline float fp16_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return _cvtsh_ss(h);
}

// Two consecutive fp16 values (a Q4_1 block's d, m) -> lanes 0 and 1 of a float vector.
inline __m128 fp16_pair(const uint8_t* p) {
  int32_t both;
  std::memcpy(&both, p, sizeof both);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(both));
}

// A GEMV input quantized as compact-row kernels read it: per block of 32, int8 codes q, scale d and
// d * sum(q) (see compact_rows.h). Rounds to nearest even, as torch.round (runtime/quant.py's reference).
struct QuantizedInput {
  std::vector<int8_t> q;
  std::vector<float> d, s, ds;  // ds: (d, s) interleaved, as the Q4_1 kernel reads them
  // Vectorized: every layer quantizes four inputs per decode step on every thread.
  void quantize(const float* x, int64_t n) {
    const int64_t nb = n / 32;
    q.resize(32 * nb);
    d.resize(nb);
    s.resize(nb);
    ds.resize(2 * nb);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + 32 * b;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float scale = _mm_cvtss_f32(m4) / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
      __m256i ints[4];
      for (int i = 0; i < 4; ++i)  // round to nearest even, as std::nearbyint and torch.round
        ints[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)),
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m256i total = _mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3]));
      // int32 -> int8 in order: packs interleave 128-bit lanes, a final permute puts them back.
      const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3]));
      const __m256i ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q.data() + 32 * b), ordered);
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
      d[b] = ds[2 * b] = scale;
      s[b] = ds[2 * b + 1] = scale * static_cast<float>(_mm_cvtsi128_si32(t));
    }
  }
};

// Compact rows: `rows` rows of `cols` weights, each `row_bytes` bytes of Q4_1 (q4) or Q8_0 blocks.
struct CompactMatrix {
  const uint8_t* data = nullptr;
  int64_t rows = 0, cols = 0, row_bytes = 0;
  bool q4 = false;
  const uint8_t* row(int64_t r) const { return data + r * row_bytes; }
};

// Down columns (runtime/quant.py): each of `rows` neurons has `code_bytes` bytes of codes for `cols`
// outputs (Q4_1 nibbles or Q8_0 int8); neuron r is in block blocks[r], whose scales are
// table[b] = d [cols] then, for Q4_1, m [cols] (fp16).
struct ColumnMatrix {
  const uint8_t* codes = nullptr;
  const uint16_t* table = nullptr;
  const int64_t* blocks = nullptr;
  int64_t rows = 0, cols = 0, code_bytes = 0, n_blocks = 0;
  bool q4 = false;
  const uint8_t* row(int64_t r) const { return codes + r * code_bytes; }
  const uint16_t* scales(int64_t b) const { return table + b * (q4 ? 2 : 1) * cols; }
};

namespace avx2 {
#include "compact_rows.h"
}  // namespace avx2

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
namespace vnni {
#define PARTINFER_VNNI 1
#include "compact_rows.h"
#undef PARTINFER_VNNI
}  // namespace vnni
#pragma GCC pop_options

// The compact-row kernels of this CPU, chosen once: VNNI where the CPU has it (PARTINFER_VNNI=0 forces
// the AVX2 ones, which tests use to check both on a VNNI machine).
struct CompactKernels {
  const char* name;
  void (*gemv_rows)(const CompactMatrix&, const QuantizedInput&, const int64_t*, float*, int64_t, int64_t);
  void (*axpy_columns)(const ColumnMatrix&, const float*, const int64_t*, const float*, float*, int64_t, int64_t);
};

const CompactKernels& compact_kernels() {
  static const CompactKernels chosen = [] {
    const char* env = std::getenv("PARTINFER_VNNI");
    const bool allowed = !(env && std::string(env) == "0");
    if (allowed && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl"))
      return CompactKernels{"avx512-vnni", vnni::gemv_rows, vnni::axpy_columns};
    return CompactKernels{"avx2", avx2::gemv_rows, avx2::axpy_columns};
  }();
  return chosen;
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

// A GEMV input every thread reads: fp32, its even/odd halves (bf16 rows, see load_bf16x16) and its
// 8-bit quantization (compact rows).
struct GemvInput {
  std::vector<float> x, even, odd;
  QuantizedInput quant;
  explicit GemvInput(int64_t n) : x(n) {}
  void split() {
    split_even_odd(x.data(), static_cast<int64_t>(x.size()) & ~int64_t(15), even, odd);
    quant.quantize(x.data(), static_cast<int64_t>(x.size()));
  }
};

// A weight matrix as the kernels read it: bf16 [rows, cols], compact rows of `cols` weights, or (a
// down matrix, per neuron) compact columns of `cols` outputs.
struct Matrix {
  const uint16_t* bf16 = nullptr;  // set for bf16 weights
  CompactMatrix compact;  // set for uint8 rows
  ColumnMatrix columns;  // set for uint8 columns (`columns_of`)
  int64_t rows = 0, cols = 0;
};

// W [rows, cols] bf16, or uint8 [rows, cols / 32 * (20 | 34)] (Q4_1 | Q8_0); any other shape is an error.
Matrix matrix_of(const at::Tensor& W, int64_t cols, const char* name) {
  TORCH_CHECK(W.dim() == 2 && W.is_contiguous() && W.device().is_cpu(), name, " must be a contiguous 2-D CPU tensor");
  Matrix m;
  m.rows = W.size(0);
  m.cols = cols;
  if (W.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(W.size(1) == cols, name, " has ", W.size(1), " columns, expected ", cols);
    m.bf16 = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
    return m;
  }
  TORCH_CHECK(W.scalar_type() == at::kByte && cols % 32 == 0, name, " must be bf16, or compact uint8 rows of a multiple of 32 weights");
  const int64_t nb = cols / 32;
  TORCH_CHECK(W.size(1) == nb * Q4_1_BYTES || W.size(1) == nb * Q8_0_BYTES, name, " rows of ", W.size(1),
              " bytes are neither Q4_1 nor Q8_0 for ", cols, " weights");
  m.compact = CompactMatrix{W.data_ptr<uint8_t>(), m.rows, cols, W.size(1), W.size(1) == nb * Q4_1_BYTES};
  return m;
}

// codes [rows, cols / 2 | cols] uint8, table [nb, 2 | 1, cols] fp16, blocks [rows] int64 in [0, nb).
Matrix columns_of(const at::Tensor& codes, const at::Tensor& table, const at::Tensor& blocks, int64_t cols, const char* name) {
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.device().is_cpu() && codes.scalar_type() == at::kByte &&
              cols % 32 == 0, name, " codes must be contiguous 2-D uint8 CPU rows for a multiple of 32 outputs");
  TORCH_CHECK(table.dim() == 3 && table.is_contiguous() && table.scalar_type() == at::kHalf && table.size(2) == cols &&
              (table.size(1) == 1 || table.size(1) == 2), name, " table must be contiguous fp16 [blocks, 1 | 2, ", cols, "]");
  const bool q4 = table.size(1) == 2;
  TORCH_CHECK(codes.size(1) == (q4 ? cols / 2 : cols), name, " rows of ", codes.size(1), " bytes do not match its ",
              q4 ? "Q4_1" : "Q8_0", " table for ", cols, " outputs");
  TORCH_CHECK(blocks.dim() == 1 && blocks.is_contiguous() && blocks.scalar_type() == at::kLong && blocks.numel() == codes.size(0),
              name, " blocks must be a contiguous int64 vector with one entry per row");
  const int64_t* b = blocks.data_ptr<int64_t>();
  for (int64_t i = 0; i < blocks.numel(); ++i) TORCH_CHECK(b[i] >= 0 && b[i] < table.size(0), name, " block ", b[i], " out of range");
  Matrix m;
  m.rows = codes.size(0);
  m.cols = cols;
  m.columns = ColumnMatrix{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(table.data_ptr<at::Half>()), b,
                           m.rows, cols, codes.size(1), table.size(0), q4};
  return m;
}

// y[r] = W[row(r)] . in for r in [r0, r1).
void matrix_gemv(const Matrix& W, const GemvInput& in, const int64_t* rows, float* y, int64_t r0, int64_t r1) {
  if (W.bf16)
    gemv_rows(W.bf16, W.cols, in.x.data(), in.even.data(), in.odd.data(), rows, y, r0, r1);
  else
    compact_kernels().gemv_rows(W.compact, in.quant, rows, y, r0, r1);
}

// The 8-bit scale of each block's activations for Q4_1 down columns: max |a| / 127 over all n rows
// of the block (every thread computes the same from the whole product's a, so a result does not
// depend on how rows are split or ordered). `units` is resized to the block count.
void column_block_units(const Matrix& W, const float* a, const int64_t* rows, int64_t n, std::vector<float>& units) {
  units.assign(W.columns.n_blocks, 0.0f);
  if (W.bf16 || !W.columns.q4) return;
  for (int64_t r = 0; r < n; ++r) {
    float& u = units[W.columns.blocks[rows ? rows[r] : r]];
    u = std::max(u, std::fabs(a[r]));
  }
  for (float& u : units) u /= 127.0f;
}

// partial += sum_{r in [r0, r1)} a[r] W[row(r)], in the layout of W's format (bf16: even | odd | tail
// halves, see axpy_rows; compact columns: natural order, `units` from column_block_units).
// `reduce_partials` sums such partials.
void matrix_axpy(const Matrix& W, const float* a, const int64_t* rows, const std::vector<float>& units, float* partial,
                 int64_t r0, int64_t r1) {
  const int64_t K16 = W.cols & ~int64_t(15);
  if (W.bf16)
    axpy_rows(W.bf16, W.cols, a, rows, partial, partial + K16 / 2, partial + K16, r0, r1);
  else
    compact_kernels().axpy_columns(W.columns, a, rows, units.data(), partial, r0, r1);
}

void reduce_partials(const Matrix& W, const float* partials, int count, float* out) {
  const int64_t K = W.cols, K16 = K & ~int64_t(15);
  std::fill(out, out + K, 0.0f);
  for (int t = 0; t < count; ++t) {
    const float* p = partials + t * K;
    if (!W.bf16) {
      for (int64_t i = 0; i < K; ++i) out[i] += p[i];
      continue;
    }
    for (int64_t j = 0; j < K16 / 2; ++j) {
      out[2 * j] += p[j];
      out[2 * j + 1] += p[K16 / 2 + j];
    }
    for (int64_t i = K16; i < K; ++i) out[i] += p[i];
  }
}

void check_rows(const std::optional<at::Tensor>& rows, int64_t n) {
  TORCH_CHECK(!rows || (rows->dim() == 1 && rows->scalar_type() == at::kLong && rows->is_contiguous()),
              "rows must be a contiguous int64 vector (or None for all rows)");
  if (rows) {
    const int64_t* r = rows->data_ptr<int64_t>();
    for (int64_t i = 0; i < rows->numel(); ++i) TORCH_CHECK(r[i] >= 0 && r[i] < n, "row ", r[i], " out of range");
  }
}

void check(const at::Tensor& W, const at::Tensor& v, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kBFloat16 && W.is_contiguous() && W.device().is_cpu(),
              "W must be a contiguous 2-D bf16 CPU tensor");
  TORCH_CHECK(v.dim() == 1 && v.is_contiguous(), "vector must be a contiguous 1-D tensor");
  check_rows(rows, W.size(0));
}

at::Tensor gemv(const at::Tensor& W, const at::Tensor& x, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a contiguous fp32 or bf16 vector");
  const Matrix M = matrix_of(W, x.size(0), "W");
  check_rows(rows, M.rows);
  const int64_t R = rows ? rows->numel() : M.rows;
  // A bf16 x is widened once and the result rounded back once: one op per linear for the caller.
  const bool half = x.scalar_type() == at::kBFloat16;
  GemvInput in(x.size(0));
  at::Tensor xf = x.to(at::kFloat).contiguous();
  std::copy(xf.data_ptr<float>(), xf.data_ptr<float>() + x.size(0), in.x.begin());
  in.split();
  at::Tensor y = at::empty({R}, xf.options());
  float* yp = y.data_ptr<float>();
  const int64_t* rp = rows ? rows->data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, (R + 3) / 4, 16, [&](int64_t b, int64_t e) { matrix_gemv(M, in, rp, yp, b * 4, std::min(e * 4, R)); });
  return half ? y.to(at::kBFloat16) : y;
}

// Compact rows [..., row_bytes] uint8 of `cols` weights -> [..., cols] in `dtype` (fp32 or bf16), the
// values d * q (+ m) in fp32 as runtime/quant.py computes them: prefill's per-matrix expansion.
at::Tensor dequantize(const at::Tensor& W, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(W.dim() >= 1 && W.is_contiguous() && W.device().is_cpu() && W.scalar_type() == at::kByte,
              "dequantize takes contiguous uint8 CPU rows");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize writes fp32 or bf16");
  const Matrix M = matrix_of(W.reshape({-1, W.size(-1)}), cols, "W");
  std::vector<int64_t> shape(W.sizes().begin(), W.sizes().end());
  shape.back() = cols;
  at::Tensor out = at::empty(shape, W.options().dtype(dtype));
  const CompactMatrix& C = M.compact;
  const int64_t nb = cols / 32;
  float* out_f32 = dtype == at::kFloat ? out.data_ptr<float>() : nullptr;
  at::BFloat16* out_bf16 = dtype == at::kBFloat16 ? out.data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, C.rows, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(cols);
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* w = C.row(r);
      for (int64_t b = 0; b < nb; ++b) {
        float* v = row.data() + 32 * b;
        if (C.q4) {
          const uint8_t* blk = w + b * Q4_1_BYTES;
          const float d = fp16_to_float(blk), m = fp16_to_float(blk + 2);
          for (int i = 0; i < 16; ++i) {
            v[i] = d * static_cast<float>(blk[4 + i] & 0x0F) + m;
            v[i + 16] = d * static_cast<float>(blk[4 + i] >> 4) + m;
          }
        } else {
          const uint8_t* blk = w + b * Q8_0_BYTES;
          const float d = fp16_to_float(blk);
          for (int i = 0; i < 32; ++i) v[i] = d * static_cast<float>(static_cast<int8_t>(blk[2 + i]));
        }
      }
      if (out_f32)
        std::copy(row.begin(), row.end(), out_f32 + r * cols);
      else
        for (int64_t i = 0; i < cols; ++i) out_bf16[r * cols + i] = at::BFloat16(row[i]);
    }
  });
  return out;
}

// Down columns (codes, table, blocks: see columns_of) -> [rows, cols] in `dtype`: d * q (+ m) in fp32,
// as runtime/quant.py's reference computes them.
at::Tensor dequantize_columns(const at::Tensor& codes, const at::Tensor& table, const at::Tensor& blocks, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize_columns writes fp32 or bf16");
  const ColumnMatrix C = columns_of(codes, table, blocks, table.size(-1), "down").columns;
  const int64_t D = C.cols;
  at::Tensor out = at::empty({C.rows, D}, codes.options().dtype(dtype));
  float* out_f32 = dtype == at::kFloat ? out.data_ptr<float>() : nullptr;
  at::BFloat16* out_bf16 = dtype == at::kBFloat16 ? out.data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, C.rows, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> q(D), d(D), m(D, 0.0f), row(D);
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* c = C.row(r);
      const uint16_t* s = C.scales(C.blocks[r]);
      for (int64_t i = 0; i < D; ++i) {
        d[i] = _cvtsh_ss(s[i]);
        if (C.q4) m[i] = _cvtsh_ss(s[D + i]);
      }
      if (C.q4) {
        for (int64_t g = 0; g < D; g += 32)
          for (int t = 0; t < 16; ++t) {
            q[g + t] = static_cast<float>(c[g / 2 + t] & 0x0F);
            q[g + t + 16] = static_cast<float>(c[g / 2 + t] >> 4);
          }
      } else {
        for (int64_t i = 0; i < D; ++i) q[i] = static_cast<float>(static_cast<int8_t>(c[i]));
      }
      for (int64_t i = 0; i < D; ++i) row[i] = d[i] * q[i] + m[i];
      if (out_f32)
        std::copy(row.begin(), row.end(), out_f32 + r * D);
      else
        for (int64_t i = 0; i < D; ++i) out_bf16[r * D + i] = at::BFloat16(row[i]);
    }
  });
  return out;
}

// y [D] = sum_r a[r] W[rows[r]] for down columns, on this thread with the decode's kernel: its test.
at::Tensor down_columns(const at::Tensor& codes, const at::Tensor& table, const at::Tensor& blocks, const at::Tensor& a,
                        const std::optional<at::Tensor>& rows) {
  const Matrix W = columns_of(codes, table, blocks, table.size(-1), "down");
  check_rows(rows, W.rows);
  const int64_t R = rows ? rows->numel() : W.rows;
  TORCH_CHECK(a.dim() == 1 && a.is_contiguous() && a.scalar_type() == at::kFloat && a.size(0) == R,
              "a must be a contiguous fp32 vector with one entry per row");
  at::Tensor y = at::zeros({W.cols}, a.options());
  const int64_t* rp = rows ? rows->data_ptr<int64_t>() : nullptr;
  std::vector<float> units;
  column_block_units(W, a.data_ptr<float>(), rp, R, units);
  matrix_axpy(W, a.data_ptr<float>(), rp, units, y.data_ptr<float>(), 0, R);
  return y;
}

std::string compact_kernel_path() { return compact_kernels().name; }

// y [K] = sum_r a[r] W[rows[r]] (fp32 a), rows split across threads with per-thread partial sums.
void gemv_t_f32(const at::BFloat16* W, int64_t R, int64_t K, const float* a, const int64_t* rows, float* y) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(W);
  const int64_t K16 = K & ~int64_t(15), tail = K - K16;
  const int threads = std::max<int>(1, std::min<int64_t>(at::get_num_threads(), R / 64));
  std::vector<float> partial(static_cast<size_t>(threads) * K, 0.0f);  // per thread: even | odd | tail
  const int64_t chunk = (R + threads - 1) / threads;
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* p = partial.data() + t * K;
      axpy_rows(w, K, a, rows, p, p + K16 / 2, p + K16, t * chunk, std::min(R, (t + 1) * chunk));
    }
  });
  std::fill(y, y + K, 0.0f);
  for (int t = 0; t < threads; ++t) {
    const float* p = partial.data() + t * K;
    for (int64_t j = 0; j < K16 / 2; ++j) {
      y[2 * j] += p[j];
      y[2 * j + 1] += p[K16 / 2 + j];
    }
    for (int64_t i = 0; i < tail; ++i) y[K16 + i] += p[K16 + i];
  }
}

at::Tensor gemv_t(const at::Tensor& W, const at::Tensor& a, const std::optional<at::Tensor>& rows) {
  check(W, a, rows);
  TORCH_CHECK(a.scalar_type() == at::kFloat, "a must be fp32");
  const int64_t R = rows ? rows->numel() : W.size(0);
  TORCH_CHECK(a.size(0) == R, "a has ", a.size(0), " elements for ", R, " rows");
  at::Tensor y = at::empty({W.size(1)}, a.options());
  gemv_t_f32(W.data_ptr<at::BFloat16>(), R, W.size(1), a.data_ptr<float>(), rows ? rows->data_ptr<int64_t>() : nullptr,
             y.data_ptr<float>());
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

// ---- One decode step, run by one OpenMP team --------------------------------------------------
//
// A step is ~6 dependent stages per layer over small matrices (0.7-3.5 MB on the default model).
// Opening a parallel region per matrix costs a fork/join each time and leaves every elementwise
// part (norms, rope, SiLU) to one thread, so the whole step runs in one region: each stage splits
// its rows evenly over the team and ends in a barrier only where the next stage needs all of its
// output. The small vectors every thread needs (the residual, the normed input) are recomputed by
// each thread in its own copy, identically, instead of being shared behind another barrier.
// Measured against a region per matrix (decode tok/s, ten alternating generations in one process):
// partinfer +5 %, dense and token-wise within noise (+1 %, -0.5 %).

// Thread t of a team of nt.
struct Team {
  int t, nt;
  // [begin, end) of this thread's even share of n items.
  std::pair<int64_t, int64_t> share(int64_t n) const { return {n * t / nt, n * (t + 1) / nt}; }
};

inline void team_barrier() {
#pragma omp barrier
}

// y[r] = W[r] . in for this thread's share of W's rows.
void gemv_share(const Matrix& W, const GemvInput& in, float* y, const Team& team) {
  const auto [r0, r1] = team.share(W.rows);
  matrix_gemv(W, in, nullptr, y, r0, r1);
}

// Weights of one decode layer's attention, shapes checked once by `check_attention`.
struct AttentionArgs {
  Matrix qkv_w;  // [(H + 2 Hkv) hd, D]
  Matrix o_w;  // [D, H hd]
  at::Tensor& k_cache;  // [Hkv, S, hd] bf16, this layer, batch 1
  at::Tensor& v_cache;
  const float* cos;  // [hd] at this position
  const float* sin;
  int64_t pos, n_heads, n_kv_heads;
};

void check_attention(const AttentionArgs& a, int64_t D) {
  TORCH_CHECK(a.k_cache.scalar_type() == at::kBFloat16 && a.k_cache.is_contiguous() && a.v_cache.is_contiguous() &&
              a.k_cache.dim() == 3 && a.v_cache.sizes() == a.k_cache.sizes(), "caches must be contiguous bf16 [Hkv, S, hd]");
  const int64_t hd = a.k_cache.size(2);
  TORCH_CHECK(hd % 16 == 0, "head_dim must be a multiple of 16, got ", hd);
  TORCH_CHECK(a.pos >= 0 && a.pos < a.k_cache.size(1), "position ", a.pos, " outside the cache");
  TORCH_CHECK(a.n_kv_heads > 0 && a.n_heads % a.n_kv_heads == 0 && a.k_cache.size(0) == a.n_kv_heads, "bad head counts");
  TORCH_CHECK(a.qkv_w.cols == D && a.o_w.cols == a.n_heads * hd && a.o_w.rows == D, "attention weight shapes");
  TORCH_CHECK(a.qkv_w.rows == (a.n_heads + 2 * a.n_kv_heads) * hd, "qkv weight rows do not match the heads");
}

void rope(float* v, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = v[i], x2 = v[i + half];
    v[i] = x1 * cos[i] - x2 * sin[i];
    v[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
  }
}

// Scratch the team shares within one step; each buffer is written by share and read after a barrier.
struct SharedScratch {
  std::vector<float> qkv, heads, out, gate_up, act, chosen, partial, comp;
};

// One token's scaled-dot-product attention for head hh over cache slots 0..pos, into out [hd].
void attend_head(const AttentionArgs& a, const float* q_in, int64_t hh, float* out) {
  const int64_t hd = a.k_cache.size(2), S = a.k_cache.size(1), half = hd / 2, L = a.pos + 1;
  const int64_t kv = hh / (a.n_heads / a.n_kv_heads);
  std::vector<float> q(q_in, q_in + hd), p(L), qe(half), qo(half), oe(half, 0.0f), oo(half, 0.0f);
  rope(q.data(), a.cos, a.sin, half);
  for (int64_t j = 0; j < half; ++j) {
    qe[j] = q[2 * j];
    qo[j] = q[2 * j + 1];
  }
  const uint16_t* K = reinterpret_cast<const uint16_t*>(a.k_cache.data_ptr<at::BFloat16>() + kv * S * hd);
  const uint16_t* V = reinterpret_cast<const uint16_t*>(a.v_cache.data_ptr<at::BFloat16>() + kv * S * hd);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  float mx = -INFINITY;
  for (int64_t j = 0; j < L; ++j) mx = std::max(mx, p[j] = dot_bf16(qe.data(), qo.data(), K + j * hd, hd) * scale);
  float total = 0.0f;
  for (int64_t j = 0; j < L; ++j) total += (p[j] = std::exp(p[j] - mx));
  for (int64_t j = 0; j < L; ++j) {
    const __m256 w = _mm256_set1_ps(p[j] / total);
    for (int64_t i = 0; i < hd; i += 16) {
      __m256 ve, vo;
      load_bf16x16(V + j * hd + i, ve, vo);
      _mm256_storeu_ps(oe.data() + i / 2, _mm256_fmadd_ps(ve, w, _mm256_loadu_ps(oe.data() + i / 2)));
      _mm256_storeu_ps(oo.data() + i / 2, _mm256_fmadd_ps(vo, w, _mm256_loadu_ps(oo.data() + i / 2)));
    }
  }
  for (int64_t j = 0; j < half; ++j) {
    out[2 * j] = oe[j];
    out[2 * j + 1] = oo[j];
  }
}

// Attention of the normed token h (qkv, rope, cache write at `pos`, causal GQA attention, o
// projection) by the whole team; returns the output [D], shared, readable by every thread.
// heads is this thread's scratch for the o projection's input.
const float* attention_team(const AttentionArgs& a, const GemvInput& h, SharedScratch& s, GemvInput& heads,
                            const Team& team) {
  const int64_t hd = a.k_cache.size(2), S = a.k_cache.size(1), H = a.n_heads, Hkv = a.n_kv_heads;
  gemv_share(a.qkv_w, h, s.qkv.data(), team);
  team_barrier();
  const auto [k0, k1] = team.share(Hkv);  // rope on this thread's k heads, then their cache slots
  at::BFloat16* kc = a.k_cache.data_ptr<at::BFloat16>();
  at::BFloat16* vc = a.v_cache.data_ptr<at::BFloat16>();
  for (int64_t hh = k0; hh < k1; ++hh) {
    float* k = s.qkv.data() + (H + hh) * hd;
    const float* v = s.qkv.data() + (H + Hkv + hh) * hd;
    rope(k, a.cos, a.sin, hd / 2);
    for (int64_t i = 0; i < hd; ++i) {
      kc[(hh * S + a.pos) * hd + i] = at::BFloat16(k[i]);
      vc[(hh * S + a.pos) * hd + i] = at::BFloat16(v[i]);
    }
  }
  team_barrier();
  const auto [h0, h1] = team.share(H);
  for (int64_t hh = h0; hh < h1; ++hh) attend_head(a, s.qkv.data() + hh * hd, hh, s.heads.data() + hh * hd);
  team_barrier();
  std::copy(s.heads.begin(), s.heads.begin() + H * hd, heads.x.begin());
  heads.split();
  gemv_share(a.o_w, heads, s.out.data(), team);
  team_barrier();
  return s.out.data();
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// down @ (silu(gate h) * (up h)) by the whole team (kinds kGated, kInterleaved: bf16); gate_up [2m, D]
// rows g0..g_{m-1}, u0.. (or g0, u0, g1, u1, ... when interleaved), down [D, m]. Each thread computes
// the gate/up rows of its share of the m neurons and their activations. Returns the output [D],
// shared. act: this thread's scratch.
const float* gated_ffn_team(const Matrix& gate_up, const Matrix& down, bool interleaved, const GemvInput& h,
                            SharedScratch& s, GemvInput& act, const Team& team) {
  const int64_t m = gate_up.rows / 2;
  const auto [i0, i1] = team.share(m);
  float* gu = s.gate_up.data();
  if (interleaved) {
    matrix_gemv(gate_up, h, nullptr, gu, 2 * i0, 2 * i1);
    for (int64_t i = i0; i < i1; ++i) s.act[i] = silu(gu[2 * i]) * gu[2 * i + 1];
  } else {
    matrix_gemv(gate_up, h, nullptr, gu, i0, i1);
    matrix_gemv(gate_up, h, nullptr, gu, m + i0, m + i1);
    for (int64_t i = i0; i < i1; ++i) s.act[i] = silu(gu[i]) * gu[m + i];
  }
  team_barrier();
  std::copy(s.act.begin(), s.act.begin() + m, act.x.begin());
  act.split();
  gemv_share(down, act, s.out.data(), team);
  team_barrier();
  return s.out.data();
}

// out = sum_r a[r] down_t[row(r)] over all n rows, by the whole team: this thread adds rows [r0, r1)
// into its own partial sum, and after a barrier every thread sums the partials into its `out`.
// a [n] must be shared; Q4_1 columns take one more barrier first, for block scales computed from all
// n activations (column_block_units). Returns out.data().
const float* down_team(const Matrix& down_t, const float* a, const int64_t* rows, int64_t n, int64_t r0, int64_t r1,
                       SharedScratch& s, std::vector<float>& out, std::vector<float>& units, const Team& team) {
  const int64_t D = down_t.cols;
  float* partial = s.partial.data() + team.t * D;
  std::fill(partial, partial + D, 0.0f);
  if (!down_t.bf16 && down_t.columns.q4) {
    team_barrier();
    column_block_units(down_t, a, rows, n, units);
  }
  matrix_axpy(down_t, a, rows, units, partial, r0, r1);
  team_barrier();
  reduce_partials(down_t, s.partial.data(), team.nt, out.data());
  return out.data();
}

// The FFN of kind kRows by the whole team: gate_up [2m, D] interleaved rows g0, u0, g1, u1, ... and
// down_t [m, D], both per-neuron rows (bf16 or compact). Each thread takes a share of the m neurons
// end to end — gate/up rows, activation, its down rows into its own partial sum — so one barrier
// before the sum is all the FFN needs (and one before the down rows for Q4_1 columns, whose block
// scales take every thread's activations). Returns the output [D] in `out`, this thread's own.
const float* rows_ffn_team(const Matrix& gate_up, const Matrix& down_t, const GemvInput& h, SharedScratch& s,
                           std::vector<float>& out, std::vector<float>& units, const Team& team) {
  const int64_t m = down_t.rows;
  const auto [i0, i1] = team.share(m);
  float* gu = s.gate_up.data();
  matrix_gemv(gate_up, h, nullptr, gu, 2 * i0, 2 * i1);
  for (int64_t i = i0; i < i1; ++i) s.act[i] = silu(gu[2 * i]) * gu[2 * i + 1];
  return down_team(down_t, s.act.data(), nullptr, m, i0, i1, s, out, units, team);
}

// Token-wise FFN (--method tokenwise) by the whole team: gate [k, D], up [k, D], down_t [k, D] of the
// loaded neurons (bf16 or compact rows). Computes silu(gate h) for all k, keeps positions 0..n_base-1
// plus the (n_active - n_base) highest scores |silu(gate h)_i| (times scale[i] when `scale` is given:
// the sentence's mean |up_i| * ||down_i||) among the rest, and reads only those rows of up and down_t.
// Every thread makes the same choice from the shared scores; each then computes its share of the
// chosen rows of up and adds them (scaled) into its own partial sum of down_t's rows, so only the
// gate and the sum need a barrier. Returns the output [D] in `out`, this thread's own.
const float* tokenwise_ffn_team(const Matrix& gate, const Matrix& up, const Matrix& down_t, int64_t n_base,
                                int64_t n_active, const float* scale, const GemvInput& h, SharedScratch& s,
                                std::vector<float>& out, std::vector<float>& units, const Team& team) {
  const int64_t k = gate.rows;
  float* ag = s.act.data();  // silu(gate h) [k]
  float* score = s.gate_up.data();  // [k]
  const auto [i0, i1] = team.share(k);
  matrix_gemv(gate, h, nullptr, ag, i0, i1);
  for (int64_t i = i0; i < i1; ++i) {
    ag[i] = silu(ag[i]);
    score[i] = scale ? std::fabs(ag[i]) * scale[i] : std::fabs(ag[i]);
  }
  team_barrier();
  std::vector<int64_t> rows(k);
  for (int64_t i = 0; i < k; ++i) rows[i] = i;
  // Ties go to the lower row, as in TokenwiseFFN.select (a stable descending sort in Python).
  std::nth_element(rows.begin() + n_base, rows.begin() + n_active, rows.end(),
                   [&](int64_t a, int64_t b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
  rows.resize(n_active);
  std::sort(rows.begin() + n_base, rows.end());  // ascending rows stream better
  const auto [j0, j1] = team.share(n_active);
  float* u = s.chosen.data();  // [n_active] the chosen neurons' activations
  matrix_gemv(up, h, rows.data(), u, j0, j1);
  for (int64_t j = j0; j < j1; ++j) u[j] *= ag[rows[j]];
  return down_team(down_t, u, rows.data(), n_active, j0, j1, s, out, units, team);
}

// A layer's FFN as model_decode sees it. kind 0: gated, w1 = [gate; up] [2n, D], w2 = down [D, n];
// kind 1: the same with w1's gate/up rows interleaved; kind 2: token-wise, w1 = gate, w3 = up,
// w2 = down_t (all [k, D]), scale [k] fp32 or empty (rank by |silu(gate h)| alone); kind 3: rows,
// w1 = interleaved gate/up rows [2m, D], w2 = down_t [m, D]. Kinds 0 and 1 take bf16 weights; kinds
// 2 and 3 also compact rows (Q4_1 or Q8_0), their down_t then compact columns with the layer's
// down_table and the rows' down_block (see columns_of; empty tensors for bf16).
// Mirrors runtime.model.FfnKind and the fields of runtime.model.FfnWeights (tests pin the values).
enum FfnKind : int64_t { kGated = 0, kInterleaved = 1, kTokenwise = 2, kRows = 3 };

struct FfnArgs {
  int64_t kind;
  Matrix w1, w2, w3;
  int64_t n_base, n_active;
  const float* scale;
};

FfnArgs check_ffn(int64_t kind, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3, int64_t n_base,
                  int64_t n_active, const at::Tensor& scale, const at::Tensor& down_table, const at::Tensor& down_block,
                  int64_t D) {
  TORCH_CHECK(kind >= kGated && kind <= kRows, "unknown FFN kind ", kind);
  FfnArgs f{kind, matrix_of(w1, D, "gate_up/gate"), {}, {}, n_base, n_active, nullptr};
  if (kind == kGated || kind == kInterleaved) {
    TORCH_CHECK(f.w1.bf16 != nullptr, "FFN kinds 0 and 1 take bf16 weights");
    f.w2 = matrix_of(w2, f.w1.rows / 2, "down");
    TORCH_CHECK(f.w2.bf16 != nullptr && f.w2.rows == D, "down must be bf16 with ", D, " rows");
    return f;
  }
  if (w2.scalar_type() == at::kBFloat16) {
    f.w2 = matrix_of(w2, D, "down_t");
  } else {
    TORCH_CHECK(f.w1.bf16 == nullptr, "compact down columns go with compact gate/up rows");
    f.w2 = columns_of(w2, down_table, down_block, D, "down_t");
  }
  if (kind == kRows) {
    TORCH_CHECK(f.w1.rows == 2 * f.w2.rows, "gate_up must have two rows per down_t row");
    return f;
  }
  f.w3 = matrix_of(w3, D, "up");
  TORCH_CHECK(f.w2.rows == f.w1.rows && f.w3.rows == f.w1.rows, "token-wise gate/up/down_t rows differ");
  TORCH_CHECK(0 <= n_base && n_base <= n_active && n_active <= f.w1.rows, "bad token-wise counts");
  TORCH_CHECK(scale.numel() == 0 || (scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                                     scale.numel() == f.w1.rows && scale.device().is_cpu()),
              "token-wise score scale must be empty or a contiguous fp32 vector with one entry per loaded neuron");
  f.scale = scale.numel() ? scale.data_ptr<float>() : nullptr;
  return f;
}

// fp32 RMSNorm of x [D] with a bf16 weight, rounded to bf16 before the weight as transformers does.
void rms_norm_row(const float* x, const at::BFloat16* w, int64_t D, double eps, float* out) {
  float ss = 0.0f;
  for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
  const float scale = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
  for (int64_t i = 0; i < D; ++i)
    out[i] = static_cast<float>(at::BFloat16(static_cast<float>(at::BFloat16(x[i] * scale)) * static_cast<float>(w[i])));
}

// res += y, rounded to bf16 as the eager layer rounds its residual.
void add_residual(std::vector<float>& res, const float* y) {
  for (size_t i = 0; i < res.size(); ++i) res[i] = static_cast<float>(at::BFloat16(res[i] + static_cast<float>(at::BFloat16(y[i]))));
}

std::vector<float> to_floats(const at::Tensor& t) {
  at::Tensor f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// cos/sin [2 half] of rope position `pos`, computed as the eager model computes them: the fp32 angle
// pos * inv_freq[i], then cos and sin rounded to bf16 (its cos/sin tensors are in the model dtype).
void rope_table(const float* inv_freq, int64_t half, int64_t pos, std::vector<float>& cos, std::vector<float>& sin) {
  cos.resize(2 * half);
  sin.resize(2 * half);
  for (int64_t i = 0; i < 2 * half; ++i) {
    const float angle = static_cast<float>(pos) * inv_freq[i % half];
    cos[i] = static_cast<float>(at::BFloat16(std::cos(angle)));
    sin[i] = static_cast<float>(at::BFloat16(std::sin(angle)));
  }
}

// Index of the largest element of each row of x [B, V] (fp32 or bf16) -> [B] int64; the first one on
// ties and the first NaN if any, as torch.argmax. Greedy decoding calls it once per token, where
// torch's argmax over a 49k-entry bf16 row took ~180 us on the development CPU (this: a few us).
at::Tensor argmax(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && x.size(1) > 0 &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "argmax takes a contiguous non-empty 2-D fp32 or bf16 CPU tensor");
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  std::vector<float> row(V);
  for (int64_t b = 0; b < B; ++b) {
    if (x.scalar_type() == at::kFloat) {
      std::memcpy(row.data(), x.data_ptr<float>() + b * V, V * sizeof(float));
    } else {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + b * V;
      for (int64_t i = 0; i < V; ++i) row[i] = bf16_to_float(p[i]);
    }
    __m256 best = _mm256_set1_ps(-INFINITY);
    __m256 nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) {
      const __m256 v = _mm256_loadu_ps(row.data() + i);
      best = _mm256_max_ps(best, v);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, best);
    float mx = -INFINITY;
    bool any_nan = _mm256_movemask_ps(nan) != 0;
    for (float l : lanes) mx = std::max(mx, l);
    for (; i < V; ++i) {
      any_nan = any_nan || std::isnan(row[i]);
      mx = std::max(mx, row[i]);
    }
    int64_t idx = 0;
    for (int64_t j = 0; j < V; ++j)
      if (any_nan ? std::isnan(row[j]) : row[j] == mx) {
        idx = j;
        break;
      }
    out.data_ptr<int64_t>()[b] = idx;
  }
  return out;
}

// A layer's compensation (runtime/model.py FeedForward.compensate) by the whole team: y += comp_out @
// (comp_in @ h), comp_in [r, D] and comp_out [D, r] bf16, each product rounded to bf16 as the eager
// linears round it. `y` is this thread's copy of the FFN output; `t` this thread's scratch [r].
void compensate_team(const Matrix& comp_in, const Matrix& comp_out, const GemvInput& h, SharedScratch& s,
                     GemvInput& t, float* y, int64_t D, const Team& team) {
  gemv_share(comp_in, h, s.comp.data(), team);
  team_barrier();
  for (int64_t j = 0; j < comp_in.rows; ++j) t.x[j] = static_cast<float>(at::BFloat16(s.comp[j]));
  t.split();
  team_barrier();  // every thread has read s.comp before it is overwritten below
  gemv_share(comp_out, t, s.comp.data(), team);
  team_barrier();
  for (int64_t i = 0; i < D; ++i)
    y[i] = static_cast<float>(at::BFloat16(static_cast<float>(at::BFloat16(y[i])) + static_cast<float>(at::BFloat16(s.comp[i]))));
}

void check_norm(const at::Tensor& w, int64_t D) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.numel() == D && w.is_contiguous(),
              "norm weights must be contiguous bf16 vectors of the model width");
}

// All layers for one token at rope position `pos`: x [D] bf16 -> [D] bf16 (before the final norm). Per
// layer i: norm1[i], qkv[i], o[i], norm2[i] and the FFN (kind[i], w1[i], w2[i], w3[i], n_base[i],
// n_active[i], scale[i], down_table[i], down_block[i]; see FfnKind); k_cache/v_cache [L, Hkv, S, hd]; inv_freq [hd/2] fp32. One op and one parallel region per decode step: no Python
// between layers, no fork/join between matrices.
at::Tensor model_decode(const at::Tensor& x, at::TensorList norm1, at::TensorList qkv, at::TensorList o,
                        at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& inv_freq, int64_t pos,
                        int64_t n_heads, int64_t n_kv_heads, at::TensorList norm2, at::IntArrayRef kind,
                        at::TensorList w1, at::TensorList w2, at::TensorList w3, at::IntArrayRef n_base,
                        at::IntArrayRef n_active, at::TensorList scale, at::TensorList down_table,
                        at::TensorList down_block, at::TensorList comp_in, at::TensorList comp_out, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 1, "x must be a bf16 vector");
  const int64_t D = x.numel(), L = static_cast<int64_t>(norm1.size());
  TORCH_CHECK(qkv.size() == norm1.size() && o.size() == norm1.size() && norm2.size() == norm1.size() &&
              w1.size() == norm1.size() && w2.size() == norm1.size() && w3.size() == norm1.size() &&
              static_cast<int64_t>(kind.size()) == L && static_cast<int64_t>(n_base.size()) == L &&
              static_cast<int64_t>(n_active.size()) == L && static_cast<int64_t>(scale.size()) == L &&
              static_cast<int64_t>(down_table.size()) == L && static_cast<int64_t>(down_block.size()) == L &&
              static_cast<int64_t>(comp_in.size()) == L && static_cast<int64_t>(comp_out.size()) == L &&
              k_cache.size(0) == L && v_cache.size(0) == L,
              "one entry per layer in every list and cache");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1 && inv_freq.is_contiguous() &&
              2 * inv_freq.numel() == k_cache.size(-1), "inv_freq must be a contiguous fp32 vector of head_dim / 2");
  std::vector<float> c, sn;
  rope_table(inv_freq.data_ptr<float>(), inv_freq.numel(), pos, c, sn);
  std::vector<at::Tensor> ks, vs;
  std::vector<AttentionArgs> attn;
  std::vector<FfnArgs> ffn;
  std::vector<std::pair<Matrix, Matrix>> comp(L);  // empty matrices (0 rows): no compensation
  int64_t comp_rank = 0;
  ks.reserve(L);
  vs.reserve(L);
  const int threads = at::get_num_threads();
  SharedScratch s;
  const int64_t heads_width = n_heads * k_cache.size(-1);  // the o projection's input width
  int64_t ffn_width = 0;  // the largest FFN width (neurons)
  for (int64_t i = 0; i < L; ++i) {
    ks.push_back(k_cache.select(0, i));
    vs.push_back(v_cache.select(0, i));
    attn.push_back(AttentionArgs{matrix_of(qkv[i], D, "qkv weight"), matrix_of(o[i], heads_width, "o weight"), ks[i],
                                 vs[i], c.data(), sn.data(), pos, n_heads, n_kv_heads});
    check_norm(norm1[i], D);
    check_norm(norm2[i], D);
    check_attention(attn[i], D);
    ffn.push_back(check_ffn(kind[i], w1[i], w2[i], w3[i], n_base[i], n_active[i], scale[i], down_table[i], down_block[i], D));
    if (comp_in[i].numel()) {
      comp[i] = {matrix_of(comp_in[i], D, "comp_in"), matrix_of(comp_out[i], comp_in[i].size(0), "comp_out")};
      TORCH_CHECK(comp[i].first.bf16 && comp[i].second.bf16 && comp[i].second.rows == D,
                  "compensation must be bf16 comp_in [r, D] and comp_out [D, r]");
      comp_rank = std::max(comp_rank, comp[i].first.rows);
    }
    s.qkv.resize(std::max<int64_t>(s.qkv.size(), attn[i].qkv_w.rows));
    ffn_width = std::max(ffn_width, kind[i] == kTokenwise ? ffn[i].w1.rows : ffn[i].w1.rows / 2);
  }
  s.heads.resize(heads_width);
  s.out.resize(D);
  s.gate_up.resize(2 * ffn_width);
  s.act.resize(ffn_width);
  s.chosen.resize(ffn_width);
  s.partial.resize(static_cast<size_t>(threads) * D);
  s.comp.resize(std::max(D, comp_rank));
  const std::vector<float> x_in = to_floats(x);
  std::vector<float> result;
#pragma omp parallel num_threads(threads)
  {
    const Team team{omp_get_thread_num(), omp_get_num_threads()};
    std::vector<float> res = x_in, ffn_out(D), compensated(D), units;  // each thread's own copy of the residual
    GemvInput h(D), heads(heads_width), act(ffn_width), comp_t(comp_rank);
    for (int64_t i = 0; i < L; ++i) {
      rms_norm_row(res.data(), norm1[i].data_ptr<at::BFloat16>(), D, eps, h.x.data());
      h.split();
      add_residual(res, attention_team(attn[i], h, s, heads, team));
      rms_norm_row(res.data(), norm2[i].data_ptr<at::BFloat16>(), D, eps, h.x.data());
      h.split();
      const FfnArgs& f = ffn[i];
      const float* y;
      if (f.kind == kTokenwise) {
        y = tokenwise_ffn_team(f.w1, f.w3, f.w2, f.n_base, f.n_active, f.scale, h, s, ffn_out, units, team);
      } else if (f.kind == kRows) {
        y = rows_ffn_team(f.w1, f.w2, h, s, ffn_out, units, team);
      } else {
        act.x.resize(f.w1.rows / 2);
        y = gated_ffn_team(f.w1, f.w2, f.kind == kInterleaved, h, s, act, team);
      }
      if (comp[i].first.rows) {
        std::copy(y, y + D, compensated.begin());
        comp_t.x.resize(comp[i].first.rows);
        compensate_team(comp[i].first, comp[i].second, h, s, comp_t, compensated.data(), D, team);
        y = compensated.data();
      }
      add_residual(res, y);
    }
    if (team.t == 0) result = std::move(res);
  }
  return at::from_blob(result.data(), {D}, at::kFloat).to(at::kBFloat16);
}

}  // namespace

TORCH_LIBRARY(partinfer_cpu, m) {
  m.def("gemv(Tensor W, Tensor x, Tensor? rows=None) -> Tensor", gemv);
  m.def("gemv_t(Tensor W, Tensor a, Tensor? rows=None) -> Tensor", gemv_t);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", rms_norm);
  m.def("argmax(Tensor x) -> Tensor", argmax);
  m.def("dequantize(Tensor W, int cols, ScalarType dtype) -> Tensor", dequantize);
  m.def("dequantize_columns(Tensor codes, Tensor table, Tensor blocks, ScalarType dtype) -> Tensor", dequantize_columns);
  m.def("down_columns(Tensor codes, Tensor table, Tensor blocks, Tensor a, Tensor? rows=None) -> Tensor", down_columns);
  m.def("compact_kernel_path() -> str", compact_kernel_path);
  m.def("model_decode(Tensor x, Tensor[] norm1, Tensor[] qkv, Tensor[] o, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor inv_freq, int pos, int n_heads, int n_kv_heads, Tensor[] norm2, int[] kind, Tensor[] w1, "
        "Tensor[] w2, Tensor[] w3, int[] n_base, int[] n_active, Tensor[] scale, Tensor[] down_table, Tensor[] down_block, "
        "Tensor[] comp_in, Tensor[] comp_out, "
        "float eps) -> Tensor", model_decode);
}
