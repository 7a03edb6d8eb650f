// One decode step's stages, run by one OpenMP team: attention, the FFN kinds, compensation.
// Included by partinfer_cpu.cpp inside its anonymous namespace.

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

// Thread t of a team of nt. The matrix stages hand their rows out in chunks, to whichever thread asks
// next, instead of one fixed share each: on a shared VM one vCPU often runs slower for a while, and
// with even shares the other waited for it at every barrier (~10 % of a 1.5B model's decode step in
// libgomp's barrier). Every thread runs the same stages in the same order, so its own stage count
// names the same shared counter as the others' without a barrier.
struct Team {
  int t, nt;
  std::atomic<int64_t>* counters;  // one per chunked stage of the step, zeroed before it
  mutable int64_t stage = 0;  // the next chunked stage of this thread
  // [begin, end) of this thread's even share of n items.
  std::pair<int64_t, int64_t> share(int64_t n) const { return {n * t / nt, n * (t + 1) / nt}; }
  // f(begin, end, chunk) for each chunk of [0, n) this thread takes (chunk_size, CHUNKS_PER_THREAD);
  // returns the stage's number of chunks.
  template <class F>
  int64_t chunks(int64_t n, int64_t grain, F&& f) const {
    return take_chunks(counters[stage++], n, chunk_size(n, grain, nt, CHUNKS_PER_THREAD), f);
  }
  static constexpr int CHUNKS_PER_THREAD = 4;
};
constexpr int64_t CHUNKED_STAGES_PER_LAYER = 12;  // at most: q, k, v, o, gate, up, down, two of compensation

inline void team_barrier() {
#pragma omp barrier
}

// y[r] = W[r] . in (+ bias[r] when given) for the rows of W this thread takes.
void gemv_share(const Matrix& W, const GemvInput& in, float* y, const Team& team, const float* bias = nullptr) {
  team.chunks(W.rows, 16, [&](int64_t r0, int64_t r1, int64_t) {
    matrix_gemv(W, in, nullptr, y, r0, r1);
    if (bias)
      for (int64_t r = r0; r < r1; ++r) y[r] += bias[r];
  });
}

// One decode layer's attention for one token: the plan's weights (checked once by
// `check_attention_weights`) and this token's cache slices and rope tables (`check_attention`).
struct AttentionArgs {
  Matrix qkv_w;  // [(H + 2 Hkv) hd, D], or q alone [H hd, D] when k_w and v_w are given (formats that differ)
  Matrix o_w;  // [D, H hd]
  Matrix k_w, v_w;  // [Hkv hd, D] each, or 0 rows: fused into qkv_w
  const float* qkv_bias;  // [(H + 2 Hkv) hd] fp32 (Qwen2), or nullptr
  at::Tensor& k_cache;  // [Hkv, S, hd] bf16, this layer, batch 1
  at::Tensor& v_cache;
  const float* cos;  // [hd] at this position
  const float* sin;
  int64_t pos, n_heads, n_kv_heads;
};

// The weights' side of a layer's attention: checked once, when a decode plan is made.
void check_attention_weights(const Matrix& qkv_w, const Matrix& k_w, const Matrix& v_w, const Matrix& o_w, int64_t D,
                             int64_t n_heads, int64_t n_kv_heads, int64_t hd) {
  TORCH_CHECK(hd % 16 == 0, "head_dim must be a multiple of 16, got ", hd);
  TORCH_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0, "bad head counts");
  TORCH_CHECK(qkv_w.cols == D && o_w.cols == n_heads * hd && o_w.rows == D, "attention weight shapes");
  if (k_w.rows == 0) {
    TORCH_CHECK(v_w.rows == 0 && qkv_w.rows == (n_heads + 2 * n_kv_heads) * hd, "qkv weight rows do not match the heads");
    return;
  }
  TORCH_CHECK(qkv_w.rows == n_heads * hd && k_w.rows == n_kv_heads * hd && v_w.rows == n_kv_heads * hd &&
              k_w.cols == D && v_w.cols == D, "q, k, v weight rows do not match the heads");
}

// The token's side: the caches and the position, checked on every call (a few integer compares).
void check_attention(const AttentionArgs& a) {
  TORCH_CHECK(a.k_cache.scalar_type() == at::kBFloat16 && a.k_cache.is_contiguous() && a.v_cache.is_contiguous() &&
              a.k_cache.dim() == 3 && a.v_cache.sizes() == a.k_cache.sizes(), "caches must be contiguous bf16 [Hkv, S, hd]");
  TORCH_CHECK(a.pos >= 0 && a.pos < a.k_cache.size(1), "position ", a.pos, " outside the cache");
  TORCH_CHECK(a.k_cache.size(0) == a.n_kv_heads, "the cache's heads do not match the plan's");
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
  const float* bias = a.qkv_bias;
  gemv_share(a.qkv_w, h, s.qkv.data(), team, bias);  // q, k, v fused, or q alone
  if (a.k_w.rows) {
    gemv_share(a.k_w, h, s.qkv.data() + H * hd, team, bias ? bias + H * hd : nullptr);
    gemv_share(a.v_w, h, s.qkv.data() + (H + Hkv) * hd, team, bias ? bias + (H + Hkv) * hd : nullptr);
  }
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

// down @ (silu(gate h) * (up h)) by the whole team (kinds kGated, kInterleaved: bf16, or K-quant rows
// along the input, down's blocks along the neurons as the source stores them); gate_up [2m, D]
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

// out = sum_r a[r] down_t[row(r)] over all n rows, by the whole team: each chunk of rows a thread takes is
// summed into a partial of its own, and after a barrier every thread adds the partials, in chunk order,
// into its `out`.
// a [n] is shared and written by the team's chunks: a barrier first (Q4_1 and K-quant columns then
// take block scales computed from all n activations, column_block_units). Returns out.data().
const float* down_team(const Matrix& down_t, const float* a, const int64_t* rows, int64_t n, SharedScratch& s,
                       std::vector<float>& out, std::vector<float>& units, const Team& team) {
  const int64_t D = down_t.cols;
  team_barrier();  // a holds every thread's chunks
  if (!down_t.bf16 && (down_t.columns.q4 || down_t.k_columns.codes))  // 8-bit activations: units from all n
    column_block_units(down_t, a, rows, n, units);
  // each chunk's sum in a partial of its own, added in chunk order: the same result whoever ran it
  const int64_t chunks = team.chunks(n, 32, [&](int64_t r0, int64_t r1, int64_t c) {
    float* partial = s.partial.data() + c * D;
    std::fill(partial, partial + D, 0.0f);
    matrix_axpy(down_t, a, rows, units, partial, r0, r1);
  });
  team_barrier();
  reduce_partials(down_t, s.partial.data(), static_cast<int>(chunks), out.data());
  return out.data();
}

// The FFN of kind kRows by the whole team: gate_up [2m, D] interleaved rows g0, u0, g1, u1, ... and
// down_t [m, D], both per-neuron rows (bf16 or compact). The threads take chunks of the m neurons'
// gate/up rows and activations, then (after a barrier) chunks of their down rows into partial sums,
// summed after another. Returns the output [D] in `out`, this thread's own.
const float* rows_ffn_team(const Matrix& gate_up, const Matrix& down_t, const GemvInput& h, SharedScratch& s,
                           std::vector<float>& out, std::vector<float>& units, const Team& team) {
  const int64_t m = down_t.rows;
  float* gu = s.gate_up.data();
  team.chunks(m, 32, [&](int64_t i0, int64_t i1, int64_t) {
    matrix_gemv(gate_up, h, nullptr, gu, 2 * i0, 2 * i1);
    for (int64_t i = i0; i < i1; ++i) s.act[i] = silu(gu[2 * i]) * gu[2 * i + 1];
  });
  return down_team(down_t, s.act.data(), nullptr, m, s, out, units, team);
}

// Token-wise FFN (--method tokenwise) by the whole team: gate [k, D], up [k, D], down_t [k, D] of the
// loaded neurons (bf16 or compact rows). Computes silu(gate h) for all k, keeps positions 0..n_base-1
// plus the (n_active - n_base) highest scores |silu(gate h)_i| (times scale[i] when `scale` is given:
// the sentence's mean |up_i| * ||down_i||) among the rest, and reads only those rows of up and down_t.
// Every thread makes the same choice from the shared scores; the threads then take chunks of the
// chosen rows of up, and after a barrier chunks of their down_t rows (scaled) into partial sums.
// Returns the output [D] in `out`, this thread's own.
const float* tokenwise_ffn_team(const Matrix& gate, const Matrix& up, const Matrix& down_t, int64_t n_base,
                                int64_t n_active, const float* scale, const GemvInput& h, SharedScratch& s,
                                std::vector<float>& out, std::vector<float>& units, const Team& team) {
  const int64_t k = gate.rows;
  float* ag = s.act.data();  // silu(gate h) [k]
  float* score = s.gate_up.data();  // [k]
  team.chunks(k, 16, [&](int64_t i0, int64_t i1, int64_t) {
    matrix_gemv(gate, h, nullptr, ag, i0, i1);
    for (int64_t i = i0; i < i1; ++i) {
      ag[i] = silu(ag[i]);
      score[i] = scale ? std::fabs(ag[i]) * scale[i] : std::fabs(ag[i]);
    }
  });
  team_barrier();
  std::vector<int64_t> rows(k);
  for (int64_t i = 0; i < k; ++i) rows[i] = i;
  // Ties go to the lower row, as in TokenwiseFFN.select (a stable descending sort in Python).
  std::nth_element(rows.begin() + n_base, rows.begin() + n_active, rows.end(),
                   [&](int64_t a, int64_t b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
  rows.resize(n_active);
  std::sort(rows.begin() + n_base, rows.end());  // ascending rows stream better
  float* u = s.chosen.data();  // [n_active] the chosen neurons' activations
  team.chunks(n_active, 16, [&](int64_t j0, int64_t j1, int64_t) {
    matrix_gemv(up, h, rows.data(), u, j0, j1);
    for (int64_t j = j0; j < j1; ++j) u[j] *= ag[rows[j]];
  });
  return down_team(down_t, u, rows.data(), n_active, s, out, units, team);
}

// A layer's FFN as model_decode sees it. kind 0: gated, w1 = [gate; up] [2n, D], w2 = down [D, n];
// kind 1: the same with w1's gate/up rows interleaved; kind 2: token-wise, w1 = gate, w3 = up,
// w2 = down_t (all [k, D]), scale [k] fp32 or empty (rank by |silu(gate h)| alone); kind 3: rows,
// w1 = interleaved gate/up rows [2m, D], w2 = down_t [m, D]. Kinds 0 and 1 take bf16 weights, or
// (kind 1) K-quant rows for both, down [D, m] rows of blocks along the neurons (a dense layer: m a
// multiple of 256, the width the activations' 8-bit blocks need); kinds 2 and 3 also compact rows,
// their down_t then compact columns with the layer's down_table and the rows' down_block (see
// columns_of; empty tensors for bf16).
// Mirrors runtime/decode_contract.py's FfnKind and the fields of its FfnWeights (tests pin the values).
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
    const bool k_rows = kind == kInterleaved && f.w1.k_rows != nullptr;
    TORCH_CHECK(f.w1.bf16 != nullptr || k_rows, "FFN kind 0 takes bf16 weights, kind 1 bf16 or K-quant rows");
    f.w2 = matrix_of(w2, f.w1.rows / 2, "down");
    TORCH_CHECK(f.w2.rows == D && (k_rows ? f.w2.k_rows != nullptr : f.w2.bf16 != nullptr),
                "down must be ", D, " rows in the format family of gate_up (bf16, or K-quant rows)");
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

