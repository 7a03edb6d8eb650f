// K-quant rows (common/formats/blocks.py: Q4_K and Q6_K super-blocks of 256) de-quantized for prefill
// and the eager path: the same fp32 operations, in the same order, as the format's Python reference
// (contraction into FMAs is switched off, so the values are equal bit for bit; a test checks).
// Included by partinfer_cpu.cpp inside its anonymous namespace.

constexpr int64_t Q4_K_BYTES = 144, Q6_K_BYTES = 210, QK_K = 256;

// The 256 codes of one K-quant block's code bytes -> q[256] (Q4_K: 0..15, Q6_K: 0..63), as the
// format's `unpack`. Rows hold them so per block; down columns per neuron, along d.
void unpack_k_codes(const uint8_t* codes, bool q4_k, int* q) {
  if (q4_k) {
    for (int s = 0; s < 8; ++s)
      for (int j = 0; j < 32; ++j) q[32 * s + j] = (s % 2) ? (codes[32 * (s / 2) + j] >> 4) : (codes[32 * (s / 2) + j] & 15);
    return;
  }
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < 4; ++t)
      for (int j = 0; j < 32; ++j)
        q[128 * h + 32 * t + j] = ((codes[64 * h + 32 * (t % 2) + j] >> (t < 2 ? 0 : 4)) & 15) |
                                  (((codes[128 + 32 * h + j] >> (2 * t)) & 3) << 4);
}

// A block's head (Q4_K: d, dmin, 12 bytes of 6-bit scale/min pairs; Q6_K: 16 int8 scales, then d) ->
// the scale and offset of the weight at position `pos`: w = scale·q − offset (Q6_K: q − 32, offset 0).
// The same fp32 products as the Python reference, FMA contraction off.
__attribute__((optimize("fp-contract=off")))
void k_scale_offset(const uint8_t* head, bool q4_k, int pos, float& scale, float& offset) {
  if (!q4_k) {
    scale = fp16_to_float(head + 16) * static_cast<float>(static_cast<int8_t>(head[pos / 16]));
    offset = 0.0f;
    return;
  }
  const uint8_t* p = head + 4;
  const int s = pos / 32;
  int sc, m;
  if (s < 4) {
    sc = p[s] & 63;
    m = p[s + 4] & 63;
  } else {
    sc = (p[s + 4] & 15) | ((p[s - 4] >> 6) << 4);
    m = (p[s + 4] >> 4) | ((p[s] >> 6) << 4);
  }
  scale = fp16_to_float(head) * static_cast<float>(sc);
  offset = fp16_to_float(head + 2) * static_cast<float>(m);
}

// One weight from its code and its scale and offset (k_scale_offset), in the reference's order.
__attribute__((optimize("fp-contract=off")))
inline float k_value(bool q4_k, float scale, float offset, int q) {
  return q4_k ? scale * static_cast<float>(q) - offset : scale * static_cast<float>(q - 32);
}

// One block -> out[256]; scales are constant over each 16 weights (Q6_K's sub-blocks, half a Q4_K one).
__attribute__((optimize("fp-contract=off")))
void dequantize_k_block(const uint8_t* b, bool q4_k, float* out) {
  int q[QK_K];
  const uint8_t* head = q4_k ? b : b + 192;  // Q4_K: head first; Q6_K: ql | qh, then the head
  unpack_k_codes(q4_k ? b + 16 : b, q4_k, q);
  for (int i0 = 0; i0 < QK_K; i0 += 16) {
    float scale, offset;
    k_scale_offset(head, q4_k, i0, scale, offset);
    for (int i = i0; i < i0 + 16; ++i) out[i] = k_value(q4_k, scale, offset, q[i]);
  }
}

// Down columns in a K-quant: codes [k, d / 256 * code_bytes] of the neurons `ids` [k] (original ids),
// table [n / 256, head_bytes / 2, d] (each block head kept as 2-byte units, pack_format "down columns")
// -> [k, d] in `dtype`, the same values as runtime/quant.py's reference.
__attribute__((optimize("fp-contract=off")))
at::Tensor dequantize_columns_k(const at::Tensor& codes, const at::Tensor& table, const at::Tensor& ids,
                                const std::string& kernel, at::ScalarType dtype) {
  TORCH_CHECK(kernel == "q4_k" || kernel == "q6_k", "no K-quant de-quantizer for ", kernel);
  const bool q4_k = kernel == "q4_k";
  const int64_t code_bytes = q4_k ? 128 : 192, halves = q4_k ? 8 : 9;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2, "codes: contiguous uint8 [k, bytes]");
  TORCH_CHECK(table.scalar_type() == at::kHalf && table.is_contiguous() && table.dim() == 3 && table.size(1) == halves,
              "table: contiguous fp16 [n / 256, ", halves, ", d]");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.numel() == codes.size(0), "ids: int64 [k]");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize_columns_k gives fp32 or bf16");
  const int64_t k = codes.size(0), d = table.size(2), nb = table.size(0);
  TORCH_CHECK(d % QK_K == 0 && codes.size(1) == d / QK_K * code_bytes, "codes do not hold d = ", d, " outputs");
  const int64_t* idp = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) TORCH_CHECK(idp[i] >= 0 && idp[i] / QK_K < nb, "neuron id ", idp[i], " outside the table");
  at::Tensor out = at::empty({k, d}, codes.options().dtype(dtype));
  const uint8_t* tab = reinterpret_cast<const uint8_t*>(table.data_ptr<at::Half>());
  at::parallel_for(0, k, 8, [&](int64_t n0, int64_t n1) {
    std::vector<int> q(QK_K);
    std::vector<float> row(d);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t b = idp[n] / QK_K, pos = idp[n] % QK_K;
      const uint8_t* unit = tab + b * halves * d * 2;  // unit u of output r: bytes unit + 2 (u d + r)
      auto head_byte = [&](int64_t j, int64_t r) { return unit[2 * ((j / 2) * d + r) + j % 2]; };
      for (int64_t g = 0; g < d / QK_K; ++g) {
        unpack_k_codes(codes.data_ptr<uint8_t>() + n * codes.size(1) + g * code_bytes, q4_k, q.data());
        for (int64_t o = 0; o < QK_K; ++o) {
          const int64_t r = g * QK_K + o;
          uint8_t head[18];  // row r's head of the neuron's block
          for (int64_t j = 0; j < 2 * halves; ++j) head[j] = head_byte(j, r);
          float scale, offset;
          k_scale_offset(head, q4_k, static_cast<int>(pos), scale, offset);
          row[r] = k_value(q4_k, scale, offset, q[o]);
        }
      }
      if (dtype == at::kFloat) {
        std::copy(row.begin(), row.end(), out.data_ptr<float>() + n * d);
      } else {
        at::BFloat16* o = out.data_ptr<at::BFloat16>() + n * d;
        for (int64_t r = 0; r < d; ++r) o[r] = at::BFloat16(row[r]);
      }
    }
  });
  return out;
}

// Compact rows [..., cols / 256 * block_bytes] uint8 in the K-quant `kernel` ("q4_k" | "q6_k") -> [..., cols]
// in `dtype` (fp32 or bf16).
at::Tensor dequantize_k(const at::Tensor& W, int64_t cols, const std::string& kernel, at::ScalarType dtype) {
  TORCH_CHECK(kernel == "q4_k" || kernel == "q6_k", "no K-quant de-quantizer for ", kernel);
  const int64_t block_bytes = kernel == "q4_k" ? Q4_K_BYTES : Q6_K_BYTES;
  TORCH_CHECK(W.scalar_type() == at::kByte && W.is_contiguous() && W.device().is_cpu() && cols % QK_K == 0 &&
              W.size(-1) == cols / QK_K * block_bytes, "K-quant rows must be contiguous uint8 of ", block_bytes,
              " bytes per 256 weights");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize_k gives fp32 or bf16");
  std::vector<int64_t> shape(W.sizes().begin(), W.sizes().end());
  shape.back() = cols;
  at::Tensor out = at::empty(shape, W.options().dtype(dtype));
  const int64_t rows = W.numel() / W.size(-1), nb = cols / QK_K;
  const uint8_t* w = W.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> values(QK_K);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = w + (r * nb + b) * block_bytes;
        dequantize_k_block(blk, block_bytes == Q4_K_BYTES, values.data());
        if (dtype == at::kFloat) {
          std::copy(values.begin(), values.end(), out.data_ptr<float>() + r * cols + b * QK_K);
        } else {
          at::BFloat16* o = out.data_ptr<at::BFloat16>() + r * cols + b * QK_K;
          for (int64_t j = 0; j < QK_K; ++j) o[j] = at::BFloat16(values[j]);
        }
      }
    }
  });
  return out;
}
