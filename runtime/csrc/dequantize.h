// De-quantizers of compact rows (Q4_1, Q8_0) and down columns into fp32 or bf16: the tiles that a
// many-token call multiplies with a float GEMM (runtime/kernels.py `linear`, runtime/ffn.py
// `column_linear`). Included by partinfer_cpu.cpp inside its anonymous namespace, after matrix.h.
//
// Why vectorized: a 64-token prompt on the default model spent as long here (scalar loops, one bf16
// rounding call per value) as in the GEMMs that use the tiles (docs/design.md §10).

namespace avx2 {
#include "dequantize_kernels.h"
}  // namespace avx2

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
namespace avx512_bf16 {
#define PARTINFER_AVX512_BF16 1
#include "dequantize_kernels.h"
#undef PARTINFER_AVX512_BF16
}  // namespace avx512_bf16
#pragma GCC pop_options

// The de-quantizing loops of this CPU, chosen once: AVX-512 BF16 where the CPU has it (PARTINFER_VNNI=0,
// which forces every AVX2 kernel, forces these too).
struct DequantizeKernels {
  const char* name;
  void (*row_f32)(const uint8_t*, bool, int64_t, float*);
  void (*row_bf16)(const uint8_t*, bool, int64_t, at::BFloat16*);
  void (*column_f32)(const ColumnMatrix&, int64_t, float*);
  void (*column_bf16)(const ColumnMatrix&, int64_t, at::BFloat16*);
};


const DequantizeKernels& dequantize_kernels() {
  static const DequantizeKernels chosen = [] {
    if (!avx2_forced() && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl"))
      return DequantizeKernels{"avx512-bf16", avx512_bf16::dequantize_row<float>, avx512_bf16::dequantize_row<at::BFloat16>,
                               avx512_bf16::dequantize_column<float>, avx512_bf16::dequantize_column<at::BFloat16>};
    return DequantizeKernels{"avx2", avx2::dequantize_row<float>, avx2::dequantize_row<at::BFloat16>,
                             avx2::dequantize_column<float>, avx2::dequantize_column<at::BFloat16>};
  }();
  return chosen;
}

// Compact rows [..., row_bytes] uint8 of `cols` weights -> [..., cols] in `dtype` (fp32 or bf16). The
// rows may also be a 2-D view with a row stride (each row contiguous): every other row of the FFN's
// interleaved gate/up pairs, de-quantized in place into a tile of gate (or up) rows alone.
at::Tensor dequantize(const at::Tensor& W, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(W.dim() >= 1 && W.device().is_cpu() && W.scalar_type() == at::kByte &&
              (W.is_contiguous() || (W.dim() == 2 && W.stride(1) == 1 && W.stride(0) >= W.size(1))),
              "dequantize takes uint8 CPU rows, contiguous or 2-D with contiguous rows");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize writes fp32 or bf16");
  const at::Tensor rows = W.dim() == 2 ? W : W.reshape({-1, W.size(-1)});
  std::vector<int64_t> shape(W.sizes().begin(), W.sizes().end());
  shape.back() = cols;
  at::Tensor out = at::empty(shape, W.options().dtype(dtype));
  if (rows.size(0) == 0) return out;
  const bool q4 = matrix_of(rows.narrow(0, 0, 1), cols, "W").compact.q4;  // one row is contiguous: its format checked
  const uint8_t* data = rows.data_ptr<uint8_t>();
  const int64_t stride = rows.stride(0), nb = cols / 32;
  const DequantizeKernels& K = dequantize_kernels();
  at::parallel_for(0, rows.size(0), 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (dtype == at::kFloat)
        K.row_f32(data + r * stride, q4, nb, out.data_ptr<float>() + r * cols);
      else
        K.row_bf16(data + r * stride, q4, nb, out.data_ptr<at::BFloat16>() + r * cols);
    }
  });
  return out;
}

// Down columns (codes, table, blocks: see columns_of) -> [rows, cols] in `dtype` (fp32 or bf16).
at::Tensor dequantize_columns(const at::Tensor& codes, const at::Tensor& table, const at::Tensor& blocks, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize_columns writes fp32 or bf16");
  const ColumnMatrix C = columns_of(codes, table, blocks, table.size(-1), "down").columns;
  TORCH_CHECK(C.cols % 32 == 0, "down columns have a multiple of 32 outputs");
  at::Tensor out = at::empty({C.rows, C.cols}, codes.options().dtype(dtype));
  const DequantizeKernels& K = dequantize_kernels();
  at::parallel_for(0, C.rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (dtype == at::kFloat)
        K.column_f32(C, r, out.data_ptr<float>() + r * C.cols);
      else
        K.column_bf16(C, r, out.data_ptr<at::BFloat16>() + r * C.cols);
    }
  });
  return out;
}
