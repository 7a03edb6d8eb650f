// K-quant rows (common/formats/blocks.py: Q4_K and Q6_K super-blocks of 256) de-quantized for prefill
// and the eager path: the same fp32 operations, in the same order, as the format's Python reference
// (contraction into FMAs is switched off, so the values are equal bit for bit; a test checks).
// Included by partinfer_cpu.cpp inside its anonymous namespace.

constexpr int64_t Q4_K_BYTES = 144, Q6_K_BYTES = 210, QK_K = 256;

__attribute__((optimize("fp-contract=off")))
void dequantize_q4_k_block(const uint8_t* b, float* out) {
  const float d = fp16_to_float(b), dmin = fp16_to_float(b + 2);
  const uint8_t* p = b + 4;  // 12 bytes of 6-bit (scale, min) pairs
  const uint8_t* qs = b + 16;
  for (int s = 0; s < 8; ++s) {
    int sc, m;
    if (s < 4) {
      sc = p[s] & 63;
      m = p[s + 4] & 63;
    } else {
      sc = (p[s + 4] & 15) | ((p[s - 4] >> 6) << 4);
      m = (p[s + 4] >> 4) | ((p[s] >> 6) << 4);
    }
    const float scale = d * static_cast<float>(sc), offset = dmin * static_cast<float>(m);
    const uint8_t* chunk = qs + 32 * (s / 2);
    for (int j = 0; j < 32; ++j) {
      const int q = (s % 2) ? (chunk[j] >> 4) : (chunk[j] & 15);
      out[32 * s + j] = scale * static_cast<float>(q) - offset;
    }
  }
}

__attribute__((optimize("fp-contract=off")))
void dequantize_q6_k_block(const uint8_t* b, float* out) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  const float d = fp16_to_float(b + 208);
  for (int h = 0; h < 2; ++h) {  // halves of 128; quarter t of a half: 32 weights
    for (int t = 0; t < 4; ++t) {
      const uint8_t* low = ql + 64 * h + 32 * (t % 2);
      const int shift = t < 2 ? 0 : 4;
      for (int j = 0; j < 32; ++j) {
        const int i = 128 * h + 32 * t + j;
        const int q = ((low[j] >> shift) & 15) | (((qh[32 * h + j] >> (2 * t)) & 3) << 4);
        out[i] = (d * static_cast<float>(scales[i / 16])) * static_cast<float>(q - 32);
      }
    }
  }
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
        if (block_bytes == Q4_K_BYTES) dequantize_q4_k_block(blk, values.data());
        else dequantize_q6_k_block(blk, values.data());
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
