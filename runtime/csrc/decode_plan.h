// The decode plan: every layer's weights for the one-op decode step, checked once when a sentence's
// plan is made (runtime/decode.py builds one per sentence) and then passed to `model_decode` by handle,
// so a token costs no re-checking of the weights and no per-layer argument lists.
// Included by partinfer_cpu.cpp inside its anonymous namespace.

struct LayerRecord {
  const at::BFloat16* norm1;  // [D]
  const at::BFloat16* norm2;
  Matrix qkv, o;  // [(H + 2 Hkv) hd, D] (or q alone, [H hd, D]), [D, H hd]
  Matrix k, v;  // [Hkv hd, D] each when q, k and v are stored apart (in different formats); else 0 rows
  const float* qkv_bias;  // [(H + 2 Hkv) hd] fp32, or nullptr
  FfnArgs ffn;
  Matrix comp_in, comp_out;  // the layer's compensation, [r, D] and [D, r] bf16; 0 rows: none
};

struct DecodePlan : torch::CustomClassHolder {
  int64_t dim, n_heads, n_kv_heads, head_dim;
  double eps;
  at::Tensor inv_freq;  // [hd / 2] fp32
  std::vector<LayerRecord> layers;
  std::vector<at::Tensor> keep;  // every tensor the records point into, alive as long as the plan
  int64_t qkv_rows = 0, ffn_width = 0, comp_rank = 0;  // the largest of each, for the shared scratch

  // Per layer i: norm1[i], qkv[i], o[i], norm2[i], the FFN record (kind[i], w1[i], w2[i], w3[i],
  // n_base[i], n_active[i], scale[i], down_table[i], down_block[i]: see FfnKind) and its compensation
  // (comp_in[i], comp_out[i]; empty tensors for none), then k[i], v[i] (empty: fused into qkv[i]) and
  // qkv_bias[i] (empty: none).
  DecodePlan(int64_t dim_, int64_t n_heads_, int64_t n_kv_heads_, int64_t head_dim_, double eps_, at::Tensor inv_freq_,
             std::vector<at::Tensor> norm1, std::vector<at::Tensor> qkv, std::vector<at::Tensor> o,
             std::vector<at::Tensor> norm2, std::vector<int64_t> kind, std::vector<at::Tensor> w1,
             std::vector<at::Tensor> w2, std::vector<at::Tensor> w3, std::vector<int64_t> n_base,
             std::vector<int64_t> n_active, std::vector<at::Tensor> scale, std::vector<at::Tensor> down_table,
             std::vector<at::Tensor> down_block, std::vector<at::Tensor> comp_in, std::vector<at::Tensor> comp_out,
             std::vector<at::Tensor> k, std::vector<at::Tensor> v, std::vector<at::Tensor> qkv_bias)
      : dim(dim_), n_heads(n_heads_), n_kv_heads(n_kv_heads_), head_dim(head_dim_), eps(eps_), inv_freq(inv_freq_) {
    const size_t L = norm1.size();
    TORCH_CHECK(qkv.size() == L && o.size() == L && norm2.size() == L && kind.size() == L && w1.size() == L &&
                w2.size() == L && w3.size() == L && n_base.size() == L && n_active.size() == L && scale.size() == L &&
                down_table.size() == L && down_block.size() == L && comp_in.size() == L && comp_out.size() == L &&
                k.size() == L && v.size() == L && qkv_bias.size() == L,
                "one entry per layer in every list");
    TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1 && inv_freq.is_contiguous() &&
                2 * inv_freq.numel() == head_dim, "inv_freq must be a contiguous fp32 vector of head_dim / 2");
    const int64_t D = dim;
    for (size_t i = 0; i < L; ++i) {
      check_norm(norm1[i], D);
      check_norm(norm2[i], D);
      LayerRecord r{norm1[i].data_ptr<at::BFloat16>(), norm2[i].data_ptr<at::BFloat16>(),
                    matrix_of(qkv[i], D, "qkv weight"), matrix_of(o[i], n_heads * head_dim, "o weight"), {}, {}, nullptr,
                    check_ffn(kind[i], w1[i], w2[i], w3[i], n_base[i], n_active[i], scale[i], down_table[i],
                              down_block[i], D),
                    {}, {}};
      if (k[i].numel()) {
        r.k = matrix_of(k[i], D, "k weight");
        r.v = matrix_of(v[i], D, "v weight");
      }
      check_attention_weights(r.qkv, r.k, r.v, r.o, D, n_heads, n_kv_heads, head_dim);
      if (qkv_bias[i].numel()) {
        TORCH_CHECK(qkv_bias[i].scalar_type() == at::kFloat && qkv_bias[i].is_contiguous() &&
                    qkv_bias[i].numel() == (n_heads + 2 * n_kv_heads) * head_dim, "qkv bias must be fp32 [(H + 2 Hkv) hd]");
        r.qkv_bias = qkv_bias[i].data_ptr<float>();
      }
      if (comp_in[i].numel()) {
        r.comp_in = matrix_of(comp_in[i], D, "comp_in");
        r.comp_out = matrix_of(comp_out[i], comp_in[i].size(0), "comp_out");
        TORCH_CHECK(r.comp_in.bf16 && r.comp_out.bf16 && r.comp_out.rows == D,
                    "compensation must be bf16 comp_in [r, D] and comp_out [D, r]");
        comp_rank = std::max(comp_rank, r.comp_in.rows);
      }
      qkv_rows = std::max(qkv_rows, r.qkv.rows + r.k.rows + r.v.rows);
      ffn_width = std::max(ffn_width, kind[i] == kTokenwise ? r.ffn.w1.rows : r.ffn.w1.rows / 2);
      layers.push_back(r);
    }
    for (auto* list : {&norm1, &qkv, &o, &norm2, &w1, &w2, &w3, &scale, &down_table, &down_block, &comp_in, &comp_out,
                       &k, &v, &qkv_bias})
      keep.insert(keep.end(), list->begin(), list->end());
  }

  int64_t n_layers() const { return static_cast<int64_t>(layers.size()); }
};

// All layers for one token at rope position `pos`: x [D] bf16 -> [D] bf16 (before the final norm), with
// the plan's weights; k_cache/v_cache [L, Hkv, S, hd] bf16 (slot `pos` is written). One op and one
// parallel region per decode step: no Python between layers, no fork/join between matrices.
at::Tensor model_decode(const at::Tensor& x, const c10::intrusive_ptr<DecodePlan>& plan, at::Tensor k_cache,
                        at::Tensor v_cache, int64_t pos) {
  const DecodePlan& p = *plan;
  const int64_t D = p.dim, L = p.n_layers();
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 1 && x.numel() == D, "x must be a bf16 vector of the model width");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == L && v_cache.size(0) == L && k_cache.size(-1) == p.head_dim,
              "caches must be [L, Hkv, S, hd] for the plan's layers and head_dim");
  std::vector<float> c, sn;
  rope_table(p.inv_freq.data_ptr<float>(), p.inv_freq.numel(), pos, c, sn);
  std::vector<at::Tensor> ks, vs;
  std::vector<AttentionArgs> attn;
  ks.reserve(L);
  vs.reserve(L);
  attn.reserve(L);
  for (int64_t i = 0; i < L; ++i) {
    ks.push_back(k_cache.select(0, i));
    vs.push_back(v_cache.select(0, i));
    attn.push_back(AttentionArgs{p.layers[i].qkv, p.layers[i].o, p.layers[i].k, p.layers[i].v, p.layers[i].qkv_bias,
                                 ks[i], vs[i], c.data(), sn.data(), pos, p.n_heads, p.n_kv_heads});
    check_attention(attn[i]);
  }
  const int threads = at::get_num_threads();
  const int64_t heads_width = p.n_heads * p.head_dim;  // the o projection's input width
  SharedScratch s;
  s.qkv.resize(p.qkv_rows);
  s.heads.resize(heads_width);
  s.out.resize(D);
  s.gate_up.resize(2 * p.ffn_width);
  s.act.resize(p.ffn_width);
  s.chosen.resize(p.ffn_width);
  s.partial.resize(static_cast<size_t>(Team::CHUNKS_PER_THREAD) * threads * D);  // a partial per down chunk
  s.comp.resize(std::max(D, p.comp_rank));
  const std::vector<float> x_in = to_floats(x);
  std::vector<float> result;
  std::vector<std::atomic<int64_t>> counters(L * CHUNKED_STAGES_PER_LAYER);  // zeroed: the step's chunked stages
#pragma omp parallel num_threads(threads)
  {
    const Team team{omp_get_thread_num(), omp_get_num_threads(), counters.data()};
    std::vector<float> res = x_in, ffn_out(D), compensated(D), units;  // each thread's own copy of the residual
    GemvInput h(D), heads(heads_width), act(p.ffn_width), comp_t(p.comp_rank);
    for (int64_t i = 0; i < L; ++i) {
      const LayerRecord& layer = p.layers[i];
      rms_norm_row(res.data(), layer.norm1, D, p.eps, h.x.data());
      h.split();
      add_residual(res, attention_team(attn[i], h, s, heads, team));
      rms_norm_row(res.data(), layer.norm2, D, p.eps, h.x.data());
      h.split();
      const FfnArgs& f = layer.ffn;
      const float* y;
      if (f.kind == kTokenwise) {
        y = tokenwise_ffn_team(f.w1, f.w3, f.w2, f.n_base, f.n_active, f.scale, h, s, ffn_out, units, team);
      } else if (f.kind == kRows) {
        y = rows_ffn_team(f.w1, f.w2, h, s, ffn_out, units, team);
      } else {
        act.x.resize(f.w1.rows / 2);
        y = gated_ffn_team(f.w1, f.w2, f.kind == kInterleaved, h, s, act, team);
      }
      if (layer.comp_in.rows) {
        std::copy(y, y + D, compensated.begin());
        comp_t.x.resize(layer.comp_in.rows);
        compensate_team(layer.comp_in, layer.comp_out, h, s, comp_t, compensated.data(), D, team);
        y = compensated.data();
      }
      add_residual(res, y);
    }
    if (team.t == 0) result = std::move(res);
  }
  return at::from_blob(result.data(), {D}, at::kFloat).to(at::kBFloat16);
}
