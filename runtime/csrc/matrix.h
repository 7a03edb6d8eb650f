// A weight matrix as every kernel reads it (bf16 rows, compact rows, compact down columns), checked once
// when made (`matrix_of`, `columns_of`), and the GEMV / transposed sums over it.
// Included by partinfer_cpu.cpp inside its anonymous namespace.

// A GEMV input every thread reads: fp32, its even/odd halves (bf16 rows, see load_bf16x16) and its
// 8-bit quantizations (compact rows: per 32; K-quant rows: per 256, when the width holds whole blocks).
struct GemvInput {
  std::vector<float> x, even, odd;
  QuantizedInput quant;
  kq::Q8KInput quant_k;
  explicit GemvInput(int64_t n) : x(n) {}
  void split() {
    const int64_t n = static_cast<int64_t>(x.size());
    split_even_odd(x.data(), n & ~int64_t(15), even, odd);
    quant.quantize(x.data(), n);
    if (n % QK_K == 0) quant_k.quantize(x.data(), n);
  }
};

// A weight matrix as the kernels read it: bf16 [rows, cols], compact rows of `cols` weights, or (a
// down matrix, per neuron) compact columns of `cols` outputs.
struct Matrix {
  const uint16_t* bf16 = nullptr;  // set for bf16 weights
  CompactMatrix compact;  // set for uint8 rows of Q4_1 or Q8_0 blocks
  const uint8_t* k_rows = nullptr;  // set for uint8 rows of Q4_K or Q6_K blocks
  int64_t k_row_bytes = 0;
  bool k_q4 = false;
  ColumnMatrix columns;  // set for Q4_1 or Q8_0 columns (`columns_of`)
  kq::KColumns k_columns;  // set for Q4_K or Q6_K columns
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
  // Bytes per weight tell the four formats apart (0.5625 Q4_K, 0.625 Q4_1, 0.8203 Q6_K, 1.0625 Q8_0);
  // the Python side passes only formats it names as having these kernels (runtime/ffn.py, decode_kernels).
  if (cols % QK_K == 0 && (W.size(1) == cols / QK_K * Q4_K_BYTES || W.size(1) == cols / QK_K * Q6_K_BYTES)) {
    m.k_rows = W.data_ptr<uint8_t>();
    m.k_row_bytes = W.size(1);
    m.k_q4 = W.size(1) == cols / QK_K * Q4_K_BYTES;
    return m;
  }
  const int64_t nb = cols / 32;
  TORCH_CHECK(W.size(1) == nb * Q4_1_BYTES || W.size(1) == nb * Q8_0_BYTES, name, " rows of ", W.size(1),
              " bytes are neither Q4_1 nor Q8_0 for ", cols, " weights");
  m.compact = CompactMatrix{W.data_ptr<uint8_t>(), m.rows, cols, W.size(1), W.size(1) == nb * Q4_1_BYTES};
  return m;
}

// codes [rows, cols / 2 | cols] uint8, table [nb, 2 | 1, cols] fp16, blocks [rows] int64 in [0, nb); or
// K-quant columns: table [nb, 8 | 9, cols] and blocks the rows' sub-blocks (kq::k_columns_of).
Matrix columns_of(const at::Tensor& codes, const at::Tensor& table, const at::Tensor& blocks, int64_t cols, const char* name) {
  if (table.dim() == 3 && (table.size(1) == 8 || table.size(1) == 9)) {
    Matrix m;
    m.k_columns = kq::k_columns_of(codes, table, blocks, name);
    TORCH_CHECK(m.k_columns.d == cols, name, " table holds ", m.k_columns.d, " outputs, expected ", cols);
    m.rows = codes.size(0);
    m.cols = cols;
    return m;
  }
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
  if (W.bf16) {
    gemv_rows(W.bf16, W.cols, in.x.data(), in.even.data(), in.odd.data(), rows, y, r0, r1);
  } else if (W.k_rows) {
    const kq::Q8KInput* input = &in.quant_k;
    kq::k_quant_kernels().rows_dots(W.k_q4, W.k_rows, W.k_row_bytes, rows, r0, r1, &input, 1, y, 0);
  } else {
    compact_kernels().gemv_rows(W.compact, in.quant, rows, y, r0, r1);
  }
}

// The 8-bit scale of each scale group's activations for the column sums in integers (Q4_1 blocks,
// K-quant sub-blocks, each holding its block's unit: `kq::k_column_units`); zeros for the others.
// `units` is resized to the group count.
void column_block_units(const Matrix& W, const float* a, const int64_t* rows, int64_t n, std::vector<float>& units) {
  if (W.k_columns.codes)  // per K-quant sub-block
    return kq::k_column_units(W.k_columns, a, rows, n, units);
  if (W.bf16 || !W.columns.q4) return units.assign(W.columns.n_blocks, 0.0f);
  group_units(W.columns.blocks, W.columns.n_blocks, a, rows, n, units);
}

// partial += sum_{r in [r0, r1)} a[r] W[row(r)], in the layout of W's format (bf16: even | odd | tail
// halves, see axpy_rows; compact columns: natural order, `units` from column_block_units).
// `reduce_partials` sums such partials.
void matrix_axpy(const Matrix& W, const float* a, const int64_t* rows, const std::vector<float>& units, float* partial,
                 int64_t r0, int64_t r1) {
  const int64_t K16 = W.cols & ~int64_t(15);
  if (W.bf16)
    axpy_rows(W.bf16, W.cols, a, rows, partial, partial + K16 / 2, partial + K16, r0, r1);
  else if (W.k_columns.codes)
    kq::k_quant_kernels().axpy_columns(W.k_columns, a, 1, 0, rows, units.data(), partial, 0, r0, r1);
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

