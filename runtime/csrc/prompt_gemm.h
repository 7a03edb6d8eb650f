// A prompt's products with 4-bit rows (Q4_1, Q4_K) and Q4_1 down columns in integers, on AVX-512 VNNI
// (here) or AVX2 (prompt_gemm_avx2.h), chosen once per process as the decode kernels are:
// y [M, N] = x [M, K] . W^T (runtime/kernels.py `linear`, runtime/ffn.py `column_linear` for a prompt).
// Included by partinfer_cpu.cpp inside its anonymous namespace, after compact_input.h and k_quants.h.
// What both forms share (the quantized tokens, the down columns' blocks) comes first, built for AVX2.
//
// Why: de-quantizing a prompt's weights into bf16 tiles for the float GEMM cost a third as much as
// the GEMM itself, and bf16 multiply-adds are 32 per 512-bit instruction where VNNI's u8 x s8 ones
// are 64. Each thread takes panels of 16 rows: the panel's 4-bit codes are moved once into VNNI order
// (a 64-byte vector holds 4 consecutive weights of each of the 16 rows, one row per 32-bit lane), then
// every token's dot products with those rows are `vpdpbusd`s against the token's 8-bit codes broadcast
// four at a time; a block's integer sums are scaled once per block, as the GEMV does:
//   y[t][r] = sum_b d_w[r][b] d_x[t][b] sum(q_w q_x) + m_w[r][b] (d_x sum q_x)[t][b].
// A Q4_K sub-block (32 weights) is such a block too: d_w = d sc, m_w = -dmin m from its 6-bit pair.
// x is quantized per 32 as the decode's GEMV quantizes it (QuantizedInput), so a prompt's last token
// and the decode steps after it see the same 8-bit inputs.

// f(std::integral_constant<int, NT>, t0) over [0, M) in passes of MAX tokens, then 4, then 1.
template <int MAX, class F>
void token_tiles(int64_t M, F&& f) {
  int64_t t = 0;
  for (; t + MAX <= M; t += MAX) f(std::integral_constant<int, MAX>{}, t);
  for (; t + 4 <= M; t += 4) f(std::integral_constant<int, 4>{}, t);
  for (; t < M; ++t) f(std::integral_constant<int, 1>{}, t);
}

// The prompt's tokens as the panels read them: 8-bit codes [M, K], and per block b the scales d[b][t]
// and d * sum(q) s[b][t], a block's tokens side by side. `row(t, out)` writes token t's K inputs as
// fp32 (bf16 widened, or a down product's activations put in block order), quantized per 32 as the
// GEMV's input is.
struct Tokens {
  int64_t M = 0, K = 0, nb = 0;
  std::vector<int8_t> q;
  std::vector<float> d, s;
  template <class Row>
  void quantize(int64_t m, int64_t k, Row&& row) {
    M = m, K = k, nb = k / 32;
    q.resize(M * K);
    d.resize(nb * M);
    s.resize(nb * M);
    at::parallel_for(0, M, 8, [&](int64_t t0, int64_t t1) {
      QuantizedInput one;
      std::vector<float> values(K);
      for (int64_t t = t0; t < t1; ++t) {
        row(t, values.data());
        one.quantize(values.data(), K);
        std::copy(one.q.begin(), one.q.end(), q.begin() + t * K);
        for (int64_t b = 0; b < nb; ++b) d[b * M + t] = one.d[b], s[b * M + t] = one.s[b];
      }
    });
  }
};

// A down product's neurons by block, only the blocks that hold neurons: block g (table block
// block_of[g]) has rows used.order[used.start[g] .. used.start[g + 1]); and the tokens' activations
// with block g's rows at [32 g, 32 g + count) of every token's row, zeros after, quantized per 32: a
// block's unit is then max |a| / 127 over its own rows, and u * sum(codes) is the minimum's term.
struct ColumnBlocks {
  RowGroups used;
  std::vector<int64_t> block_of;
  Tokens x;
  template <class In>
  ColumnBlocks(const ColumnMatrix& C, const In* a, int64_t M) {
    RowGroups groups;
    groups.sort(C.blocks, C.n_blocks, nullptr, 0, C.rows);
    used.start.push_back(0);
    for (int64_t b = 0; b < C.n_blocks; ++b)
      if (groups.start[b + 1] > groups.start[b]) {
        for (int64_t i = groups.start[b]; i < groups.start[b + 1]; ++i) used.order.push_back(groups.order[i]);
        used.start.push_back(static_cast<int64_t>(used.order.size()));
        block_of.push_back(b);
      }
    const int64_t G = size();
    x.quantize(M, 32 * G, [&](int64_t t, float* out) {
      std::fill(out, out + 32 * G, 0.0f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = used.start[g]; i < used.start[g + 1]; ++i)
          out[32 * g + i - used.start[g]] = static_cast<float>(a[t * C.rows + used.order[i]]);
    });
  }
  int64_t size() const { return static_cast<int64_t>(block_of.size()); }
};

#include "prompt_gemm_vnni.h"
#include "prompt_gemm_avx2.h"

// Whether this process runs the VNNI form of the prompt products (else the AVX2 one): the decode
// kernels' rule, decided once.
bool prompt_gemm_vnni_chosen() {
  static const bool chosen = vnni_allowed();
  return chosen;
}

// Compact 4-bit rows W [N, row_bytes] (`kernel` "q4_1" or "q4_k"; contiguous, or 2-D with a row stride)
// times x [M, K] fp32 or bf16 (+ an fp32 bias [N]) -> [M, N] in x's dtype.
at::Tensor rows_gemm(const at::Tensor& W, const at::Tensor& x, const std::string& kernel, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(kernel == "q4_1" || kernel == "q4_k", "rows_gemm takes q4_1 or q4_k rows, not ", kernel);
  TORCH_CHECK(W.dim() == 2 && W.device().is_cpu() && W.scalar_type() == at::kByte && W.stride(1) == 1 &&
              W.stride(0) >= W.size(1), "rows_gemm takes 2-D uint8 CPU rows, each contiguous");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a contiguous 2-D fp32 or bf16 tensor");
  const bool q4_k = kernel == "q4_k";
  const int64_t K = x.size(1), N = W.size(0), M = x.size(0), block = q4_k ? QK_K : 32;
  TORCH_CHECK(K % block == 0 && W.size(1) == K / block * (q4_k ? Q4_K_BYTES : Q4_1_BYTES), "W rows of ", W.size(1),
              " bytes are not ", kernel, " for ", K, " weights");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == N),
              "bias must be a contiguous fp32 vector of ", N);
  at::Tensor y = at::empty({M, N}, x.options());
  if (!M || !N) return y;
  const uint8_t* w = W.data_ptr<uint8_t>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  auto run = [&](auto* in, auto* out) {
    if (prompt_gemm_vnni_chosen())
      prompt_gemm_vnni::gemm(w, W.stride(0), N, K, q4_k, in, M, b, out);
    else
      prompt_gemm_avx2::gemm(w, W.stride(0), N, K, q4_k, in, M, b, out);
  };
  if (x.scalar_type() == at::kFloat)
    run(x.data_ptr<float>(), y.data_ptr<float>());
  else
    run(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
  return y;
}

// a [M, n] fp32 or bf16 times Q4_1 down columns (codes [n, D / 2], table [blocks, 2, D], blocks [n]: see
// columns_of) -> [M, D] in a's dtype, in integers.
at::Tensor q4_1_columns_gemm(const at::Tensor& codes, const at::Tensor& table, const at::Tensor& blocks, const at::Tensor& a) {
  const ColumnMatrix C = columns_of(codes, table, blocks, table.size(-1), "down").columns;
  TORCH_CHECK(C.q4 && C.cols % 16 == 0, "q4_1_columns_gemm takes Q4_1 columns of a multiple of 16 outputs");
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16) &&
              a.size(1) == C.rows, "a must be a contiguous fp32 or bf16 [tokens, ", C.rows, "] tensor");
  at::Tensor y = at::empty({a.size(0), C.cols}, a.options());
  if (!a.size(0)) return y;
  auto run = [&](auto* in, auto* out) {
    if (prompt_gemm_vnni_chosen())
      prompt_gemm_vnni::columns_gemm(C, in, a.size(0), out);
    else
      prompt_gemm_avx2::columns_gemm(C, in, a.size(0), out);
  };
  if (a.scalar_type() == at::kFloat)
    run(a.data_ptr<float>(), y.data_ptr<float>());
  else
    run(a.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
  return y;
}
