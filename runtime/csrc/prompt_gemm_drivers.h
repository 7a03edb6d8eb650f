// The prompt products' drivers, the same for both forms: included inside prompt_gemm_vnni.h's and
// prompt_gemm_avx2.h's namespaces (built for that form's instructions), after the form's PANEL,
// MAX_TOKENS, Panel, panel_tokens, OUTPUTS, column_tokens and fill_column_panel.

// y [M, N] = x [M, K] . W^T (+ bias) for Q4_1 or Q4_K rows W (row r at w + r * stride), K a multiple of
// the format's block; x and y fp32 or bf16.
template <class In, class Out>
void gemm(const uint8_t* w, int64_t stride, int64_t N, int64_t K, bool q4_k, const In* x, int64_t M, const float* bias, Out* y) {
  Tokens tokens;
  tokens.quantize(M, K, [&](int64_t t, float* out) { std::copy(x + t * K, x + (t + 1) * K, out); });
  const int64_t panels = (N + PANEL - 1) / PANEL, row_bytes = q4_k ? K / QK_K * Q4_K_BYTES : K / 32 * Q4_1_BYTES;
  parallel_chunks(panels, 1, 4, [&](int64_t p0, int64_t p1, int64_t) {
    Panel panel;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = p * PANEL;
      const int rows = static_cast<int>(std::min<int64_t>(PANEL, N - r0));
      panel.fill(w + r0 * stride, stride, rows, K / 32, q4_k);
      for (int64_t r = r0 + PANEL; r < std::min(N, r0 + 2 * PANEL); ++r) prefetch_row(w + r * stride, row_bytes);  // the next panel's rows
      token_tiles<MAX_TOKENS>(M, [&](auto nt, int64_t t) { panel_tokens<decltype(nt)::value>(panel, tokens, bias, t, y, N, r0, rows); });
    }
  });
}

// y [M, D] = a [M, n] . W for Q4_1 down columns W; a and y fp32 or bf16.
template <class In, class Out>
void columns_gemm(const ColumnMatrix& C, const In* a, int64_t M, Out* y) {
  const ColumnBlocks blocks(C, a, M);
  const int64_t G = blocks.size();
  parallel_chunks(C.cols / OUTPUTS, 1, 2, [&](int64_t p0, int64_t p1, int64_t) {
    std::vector<int32_t> codes((C.rows + 3 * G) / 4 * OUTPUTS + OUTPUTS);  // each block's rows padded to fours
    std::vector<float> scales(G * 2 * OUTPUTS);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t o0 = p * OUTPUTS;
      fill_column_panel(C, blocks, o0, codes.data(), scales.data());
      token_tiles<MAX_TOKENS>(M, [&](auto nt, int64_t t) {
        column_tokens<decltype(nt)::value>(codes, scales, blocks.x, blocks.used, t, y, C.cols, o0);
      });
    }
  });
}
