// A prompt's product with Q4_1 rows in integers, on AVX-512 VNNI: y [M, N] = x [M, K] . W^T, W compact
// Q4_1 rows (runtime/kernels.py `linear` for many tokens). Included by partinfer_cpu.cpp inside its
// anonymous namespace, after compact_input.h.
//
// Why: de-quantizing a prompt's weights into bf16 tiles for the float GEMM cost a third as much as
// the GEMM itself, and bf16 multiply-adds are 32 per 512-bit instruction where VNNI's u8 x s8 ones
// are 64. Each thread takes panels of 16 rows: the panel's 4-bit codes are moved once into VNNI order
// (a 64-byte vector holds 4 consecutive weights of each of the 16 rows, one row per 32-bit lane), then
// every token's dot products with those rows are `vpdpbusd`s against the token's 8-bit codes broadcast
// four at a time; a block's integer sums are scaled once per block, as the GEMV does:
//   y[t][r] = sum_b d_w[r][b] d_x[t][b] sum(q_w q_x) + m_w[r][b] (d_x sum q_x)[t][b].
// x is quantized per 32 as the decode's GEMV quantizes it (QuantizedInput), so a prompt's last token
// and the decode steps after it see the same 8-bit inputs.

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
namespace q4_1_gemm_vnni {

constexpr int PANEL = 16;  // rows per panel: one per 32-bit lane
constexpr int MAX_TOKENS = 8;  // tokens per pass over a panel: 8 int + 8 float accumulators in registers

// A panel of up to 16 rows in VNNI order: per block, 8 vectors (4 weights of each row, 32 weights in
// all), and the rows' scales and mins as floats.
// (Plain arrays, read with unaligned loads: a std::vector of 512-bit vectors is not 64-byte aligned here.)
struct Panel {
  std::vector<int32_t> codes;  // [nb * 8][16]
  std::vector<float> d, m;     // [nb][16]
  __m512i code(int64_t i) const { return _mm512_loadu_si512(codes.data() + 16 * i); }
  __m512 scale(int64_t b) const { return _mm512_loadu_ps(d.data() + 16 * b); }
  __m512 min(int64_t b) const { return _mm512_loadu_ps(m.data() + 16 * b); }
  void fill(const uint8_t* w, int64_t stride, int rows, int64_t nb) {
    codes.resize(nb * 8 * 16);
    d.resize(nb * 16);
    m.resize(nb * 16);
    const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1);
    const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(static_cast<int32_t>(stride)));
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = w + b * Q4_1_BYTES;
      const __m512i heads = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offsets, blk, 1);  // (d, m) fp16 pairs
      _mm512_storeu_ps(d.data() + 16 * b, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(heads)));
      _mm512_storeu_ps(m.data() + 16 * b, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(heads, 16))));
      for (int g = 0; g < 4; ++g) {  // bytes 4g..4g+3 of the codes: weights 4g.. (low nibbles), 16 + 4g.. (high)
        const __m512i q = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offsets, blk + 4 + 4 * g, 1);
        _mm512_storeu_si512(codes.data() + 16 * (b * 8 + g), _mm512_and_si512(q, low));
        _mm512_storeu_si512(codes.data() + 16 * (b * 8 + 4 + g), _mm512_and_si512(_mm512_srli_epi16(q, 4), low));
      }
    }
  }
};

// The prompt's tokens as the panels read them: 8-bit codes [M, K], and per block b the scales d[b][t]
// and d * sum(q) s[b][t], a block's tokens side by side.
struct Tokens {
  int64_t M = 0, K = 0, nb = 0;
  std::vector<int8_t> q;
  std::vector<float> d, s;
  void quantize(const float* x, int64_t m, int64_t k) {
    M = m, K = k, nb = k / 32;
    q.resize(M * K);
    d.resize(nb * M);
    s.resize(nb * M);
    at::parallel_for(0, M, 16, [&](int64_t t0, int64_t t1) {
      QuantizedInput one;
      for (int64_t t = t0; t < t1; ++t) {
        one.quantize(x + t * K, K);
        std::copy(one.q.begin(), one.q.end(), q.begin() + t * K);
        for (int64_t b = 0; b < nb; ++b) d[b * M + t] = one.d[b], s[b * M + t] = one.s[b];
      }
    });
  }
};

// y rows [t0, t0 + NT) of columns [r0, r0 + rows) from one panel.
template <int NT>
void panel_tokens(const Panel& p, const Tokens& x, int64_t t0, float* y, int64_t ldy, int64_t r0, int rows) {
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  const int8_t* q = x.q.data() + t0 * x.K;
  for (int64_t b = 0; b < x.nb; ++b, q += 32) {
    __m512i sums[NT];
    for (int t = 0; t < NT; ++t) sums[t] = _mm512_setzero_si512();
    for (int g = 0; g < 8; ++g) {
      const __m512i w = p.code(b * 8 + g);
      for (int t = 0; t < NT; ++t) {
        int32_t four;
        std::memcpy(&four, q + t * x.K + 4 * g, 4);
        sums[t] = _mm512_dpbusd_epi32(sums[t], w, _mm512_set1_epi32(four));
      }
    }
    const __m512 scale = p.scale(b), min = p.min(b);
    const float* d = x.d.data() + b * x.M + t0;
    const float* s = x.s.data() + b * x.M + t0;
    for (int t = 0; t < NT; ++t) {
      const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(sums[t]), _mm512_set1_ps(d[t]));
      acc[t] = _mm512_fmadd_ps(min, _mm512_set1_ps(s[t]), _mm512_fmadd_ps(scaled, scale, acc[t]));
    }
  }
  const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1);
  for (int t = 0; t < NT; ++t) _mm512_mask_storeu_ps(y + (t0 + t) * ldy + r0, live, acc[t]);
}

// y [M, N] fp32 = x [M, K] . W^T for Q4_1 rows W (row r at w + r * stride), K a multiple of 32.
void gemm(const uint8_t* w, int64_t stride, int64_t N, int64_t K, const float* x, int64_t M, float* y) {
  Tokens tokens;
  tokens.quantize(x, M, K);
  const int64_t panels = (N + PANEL - 1) / PANEL, row_bytes = K / 32 * Q4_1_BYTES;
  parallel_chunks(panels, 1, 4, [&](int64_t p0, int64_t p1, int64_t) {
    Panel panel;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = p * PANEL;
      const int rows = static_cast<int>(std::min<int64_t>(PANEL, N - r0));
      panel.fill(w + r0 * stride, stride, rows, K / 32);
      for (int64_t r = r0 + PANEL; r < std::min(N, r0 + 2 * PANEL); ++r) prefetch_row(w + r * stride, row_bytes);  // the next panel's rows
      int64_t t = 0;
      for (; t + 8 <= M; t += 8) panel_tokens<8>(panel, tokens, t, y, N, r0, rows);
      for (; t + 4 <= M; t += 4) panel_tokens<4>(panel, tokens, t, y, N, r0, rows);
      for (; t < M; ++t) panel_tokens<1>(panel, tokens, t, y, N, r0, rows);
    }
  });
}

}  // namespace q4_1_gemm_vnni
#pragma GCC pop_options

// Compact Q4_1 rows W [N, row_bytes] (contiguous, or 2-D with a row stride) times x [M, K] fp32 ->
// [M, N] fp32, on AVX-512 VNNI (`q4_1_gemm_available`).
bool q4_1_gemm_available() { return vnni_allowed(); }

at::Tensor q4_1_gemm(const at::Tensor& W, const at::Tensor& x) {
  TORCH_CHECK(q4_1_gemm_available(), "q4_1_gemm needs AVX-512 VNNI");
  TORCH_CHECK(W.dim() == 2 && W.device().is_cpu() && W.scalar_type() == at::kByte && W.stride(1) == 1 &&
              W.stride(0) >= W.size(1), "q4_1_gemm takes 2-D uint8 CPU rows, each contiguous");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x must be a contiguous 2-D fp32 tensor");
  const int64_t K = x.size(1), N = W.size(0), M = x.size(0);
  TORCH_CHECK(K % 32 == 0 && W.size(1) == K / 32 * Q4_1_BYTES, "W rows of ", W.size(1), " bytes are not Q4_1 for ", K, " weights");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M && N) q4_1_gemm_vnni::gemm(W.data_ptr<uint8_t>(), W.stride(0), N, K, x.data_ptr<float>(), M, y.data_ptr<float>());
  return y;
}
