// partinfer's CPU ops: batch-1 decode kernels for bf16 and compact weights on x86 CPUs with AVX2 + FMA.
// One translation unit; each concern is a header included below, in order (each uses only those before it).
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
//   rope(x [B, H, T, hd] bf16, cos, sin [B or 1, 1, T, hd])      -> [B, H, T, hd], one op for the six of
//       the eager `x * cos + rotate_half(x) * sin`, rounded as it rounds.
//   model_decode(x, plan, k_cache, v_cache, pos): every pre-norm layer (norms, attention, gated SiLU FFN,
//       residuals) in one op, with the weights of a `DecodePlan` made and checked once per sentence.
//       An eager decode step is ~60 small ops per layer, and at batch 1 their fixed costs rival the
//       weight streaming itself.
//   argmax(x [B, V] fp32|bf16) -> [B] int64, as torch.argmax(x, -1): the greedy sampler's per-token pick.
//
// `rows` lets the token-wise method read only its chosen neurons' rows in place (no gathered copy).
//
// Compact weights (uint8 rows of Q4_1 or Q8_0 blocks, common/formats/blocks.py) are taken wherever a bf16
// matrix is, by `gemv` and by `model_decode` (kernels in compact_rows.h, an AVX2 and an AVX-512
// VNNI build chosen once per process: `compact_kernel_path()`); `dequantize` expands them into tiles
// for prompts (dequantize.h). K-quant rows (Q4_K, Q6_K) have their own products (k_quant_products.h:
// `gemv_k`, `down_k`, and inside `model_decode`; AVX2, or 512-bit VNNI in k_quant_vnni.h, chosen by the
// same rule) and de-quantizers (k_quants.h). A prompt's Q4_1 and Q4_K rows and Q4_1 down columns run on
// integer GEMMs (prompt_gemm.h: `rows_gemm`, `q4_1_columns_gemm`; AVX2, or AVX-512 VNNI by the same rule).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace {

#include "bf16_rows.h"
#include "compact_input.h"
#include "k_quants.h"
#include "k_quant_products.h"
#include "matrix.h"
#include "single_ops.h"
#include "dequantize.h"
#include "prompt_gemm.h"
#include "decode_team.h"
#include "decode_plan.h"

// Bytes per block of a compact format the kernels take, by the kernel id its Python record names
// (common/formats/blocks.py `BlockFormat.kernel`): a test pins the two.
int64_t kernel_block_bytes(const std::string& kernel) {
  if (kernel == "q4_1") return Q4_1_BYTES;
  if (kernel == "q8_0") return Q8_0_BYTES;
  if (kernel == "q4_k") return Q4_K_BYTES;  // a de-quantizer only (k_quants.h)
  if (kernel == "q6_k") return Q6_K_BYTES;
  TORCH_CHECK(false, "no compiled kernels for ", kernel);
}

}  // namespace

TORCH_LIBRARY(partinfer_cpu, m) {
  m.def("gemv(Tensor W, Tensor x, Tensor? rows=None) -> Tensor", gemv);
  m.def("gemv_t(Tensor W, Tensor a, Tensor? rows=None) -> Tensor", gemv_t);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", rms_norm);
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", rope_heads);
  m.def("argmax(Tensor x) -> Tensor", argmax);
  m.def("dequantize(Tensor W, int cols, ScalarType dtype) -> Tensor", dequantize);
  m.def("dequantize_columns(Tensor codes, Tensor table, Tensor blocks, ScalarType dtype) -> Tensor", dequantize_columns);
  m.def("rows_gemm(Tensor W, Tensor x, str kernel, Tensor? bias=None) -> Tensor", rows_gemm);
  m.def("q4_1_columns_gemm(Tensor codes, Tensor table, Tensor blocks, Tensor a) -> Tensor", q4_1_columns_gemm);
  m.def("down_columns(Tensor codes, Tensor table, Tensor blocks, Tensor a, Tensor? rows=None) -> Tensor", down_columns);
  m.def("compact_kernel_path() -> str", compact_kernel_path);
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double, at::Tensor, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>,
                       std::vector<int64_t>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>>())
      .def("n_layers", &DecodePlan::n_layers);
  m.def("model_decode(Tensor x, __torch__.torch.classes.partinfer_cpu.DecodePlan plan, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int pos) -> Tensor", model_decode);
  m.def("kernel_block_bytes(str kernel) -> int", kernel_block_bytes);
  m.def("dequantize_k(Tensor W, int cols, str kernel, ScalarType dtype) -> Tensor", dequantize_k);
  m.def("dequantize_columns_k(Tensor codes, Tensor table, Tensor ids, str kernel, ScalarType dtype) -> Tensor",
        dequantize_columns_k);
  m.def("gemv_k(Tensor W, Tensor x, str kernel, Tensor? rows=None) -> Tensor", kq::gemv_k);
  m.def("down_k(Tensor codes, Tensor table, Tensor ids, Tensor a, str kernel, Tensor? rows=None) -> Tensor", kq::down_k);
}

