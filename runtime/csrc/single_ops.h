// The ops that run one kernel each (gemv, gemv_t, down_columns, rms_norm, rope,
// argmax), parallelised with at::parallel_for. Included by partinfer_cpu.cpp inside its anonymous namespace.

void check_rows(const std::optional<at::Tensor>& rows, int64_t n) {
  TORCH_CHECK(!rows || (rows->dim() == 1 && rows->scalar_type() == at::kLong && rows->is_contiguous()),
              "rows must be a contiguous int64 vector (or None for all rows)");
  if (rows) {
    const int64_t* r = rows->data_ptr<int64_t>();
    for (int64_t i = 0; i < rows->numel(); ++i) TORCH_CHECK(r[i] >= 0 && r[i] < n, "row ", r[i], " out of range");
  }
}

void check(const at::Tensor& W, const at::Tensor& v, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kBFloat16 && W.is_contiguous() && W.device().is_cpu(),
              "W must be a contiguous 2-D bf16 CPU tensor");
  TORCH_CHECK(v.dim() == 1 && v.is_contiguous(), "vector must be a contiguous 1-D tensor");
  check_rows(rows, W.size(0));
}

at::Tensor gemv(const at::Tensor& W, const at::Tensor& x, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a contiguous fp32 or bf16 vector");
  const Matrix M = matrix_of(W, x.size(0), "W");
  check_rows(rows, M.rows);
  const int64_t R = rows ? rows->numel() : M.rows;
  // A bf16 x is widened once and the result rounded back once: one op per linear for the caller.
  const bool half = x.scalar_type() == at::kBFloat16;
  GemvInput in(x.size(0));
  at::Tensor xf = x.to(at::kFloat).contiguous();
  std::copy(xf.data_ptr<float>(), xf.data_ptr<float>() + x.size(0), in.x.begin());
  in.split();
  at::Tensor y = at::empty({R}, xf.options());
  float* yp = y.data_ptr<float>();
  const int64_t* rp = rows ? rows->data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, (R + 3) / 4, 16, [&](int64_t b, int64_t e) { matrix_gemv(M, in, rp, yp, b * 4, std::min(e * 4, R)); });
  return half ? y.to(at::kBFloat16) : y;
}

// y [D] = sum_r a[r] W[rows[r]] for down columns, on this thread with the decode's kernel: its test.
at::Tensor down_columns(const at::Tensor& codes, const at::Tensor& table, const at::Tensor& blocks, const at::Tensor& a,
                        const std::optional<at::Tensor>& rows) {
  const Matrix W = columns_of(codes, table, blocks, table.size(-1), "down");
  check_rows(rows, W.rows);
  const int64_t R = rows ? rows->numel() : W.rows;
  TORCH_CHECK(a.dim() == 1 && a.is_contiguous() && a.scalar_type() == at::kFloat && a.size(0) == R,
              "a must be a contiguous fp32 vector with one entry per row");
  at::Tensor y = at::zeros({W.cols}, a.options());
  const int64_t* rp = rows ? rows->data_ptr<int64_t>() : nullptr;
  std::vector<float> units;
  column_block_units(W, a.data_ptr<float>(), rp, R, units);
  matrix_axpy(W, a.data_ptr<float>(), rp, units, y.data_ptr<float>(), 0, R);
  return y;
}

std::string compact_kernel_path() { return compact_kernels().name; }

// y [K] = sum_r a[r] W[rows[r]] (fp32 a), rows split across threads with per-thread partial sums.
void gemv_t_f32(const at::BFloat16* W, int64_t R, int64_t K, const float* a, const int64_t* rows, float* y) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(W);
  const int64_t K16 = K & ~int64_t(15), tail = K - K16;
  const int threads = std::max<int>(1, std::min<int64_t>(at::get_num_threads(), R / 64));
  std::vector<float> partial(static_cast<size_t>(threads) * K, 0.0f);  // per thread: even | odd | tail
  const int64_t chunk = (R + threads - 1) / threads;
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* p = partial.data() + t * K;
      axpy_rows(w, K, a, rows, p, p + K16 / 2, p + K16, t * chunk, std::min(R, (t + 1) * chunk));
    }
  });
  std::fill(y, y + K, 0.0f);
  for (int t = 0; t < threads; ++t) {
    const float* p = partial.data() + t * K;
    for (int64_t j = 0; j < K16 / 2; ++j) {
      y[2 * j] += p[j];
      y[2 * j + 1] += p[K16 / 2 + j];
    }
    for (int64_t i = 0; i < tail; ++i) y[K16 + i] += p[K16 + i];
  }
}

at::Tensor gemv_t(const at::Tensor& W, const at::Tensor& a, const std::optional<at::Tensor>& rows) {
  check(W, a, rows);
  TORCH_CHECK(a.scalar_type() == at::kFloat, "a must be fp32");
  const int64_t R = rows ? rows->numel() : W.size(0);
  TORCH_CHECK(a.size(0) == R, "a has ", a.size(0), " elements for ", R, " rows");
  at::Tensor y = at::empty({W.size(1)}, a.options());
  gemv_t_f32(W.data_ptr<at::BFloat16>(), R, W.size(1), a.data_ptr<float>(), rows ? rows->data_ptr<int64_t>() : nullptr,
             y.data_ptr<float>());
  return y;
}

// One bf16 row of K: the sum of squares in 16 fp32 partial sums (so the compiler can keep them in
// vector registers), the scale 1/sqrt(mean + eps), then x * scale rounded to bf16 and times w rounded
// again, as transformers' Llama RMSNorm rounds. Partial sums add in another order than torch's mean:
// the scale can differ from the eager form's in its last bit.
void rms_norm_bf16_row(const at::BFloat16* x, const at::BFloat16* w, int64_t K, float eps, at::BFloat16* y) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= K; i += 16)
    for (int j = 0; j < 16; ++j) {
      const float v = static_cast<float>(x[i + j]);
      part[j] += v * v;
    }
  float ss = 0.0f;
  for (; i < K; ++i) ss += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  for (int j = 0; j < 16; ++j) ss += part[j];
  const float scale = 1.0f / std::sqrt(ss / static_cast<float>(K) + eps);
  for (int64_t k = 0; k < K; ++k) {
    const at::BFloat16 normed(static_cast<float>(x[k]) * scale);
    y[k] = at::BFloat16(static_cast<float>(normed) * static_cast<float>(w[k]));
  }
}

// The eager RMSNorm's eight ops (widen, square, mean, add, rsqrt, multiply, round, weight) in one pass
// per row, rows split across threads: a prompt runs two per layer, and eight small ops each cost more
// in fixed overhead than the arithmetic (docs/benchmarks.md, "Compiled RMSNorm and rope").
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && x.is_contiguous() &&
              weight.is_contiguous() && x.device().is_cpu(), "rms_norm takes contiguous bf16 CPU tensors");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K > 0 && weight.numel() == K, "weight has ", weight.numel(), " elements for rows of ", K);
  const int64_t rows = x.numel() / K;
  at::Tensor y = at::empty_like(x);
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = weight.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t grain = std::max<int64_t>(1, 16384 / K);  // a thread takes at least ~32 KB of rows
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_bf16_row(xp + r * K, wp, K, static_cast<float>(eps), yp + r * K);
  });
  return y;
}

// Rope on heads x [B, H, T, hd] (any strides, the last dimension contiguous) with cos, sin [B or 1, 1,
// T, hd] -> contiguous [B, H, T, hd], rounded as the eager form `x * cos + rotate_half(x) * sin` in bf16
// rounds: each product to bf16, then their sum. One pass instead of six ops (two products, two
// slices, a negation, a concatenation and a sum), each with its own output, per layer of a prompt.
at::Tensor rope_heads(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && sin.sizes() == cos.sizes() && x.device().is_cpu(),
              "rope takes x [B, H, T, hd] and cos, sin [B or 1, 1, T, hd]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16,
              "rope takes bf16 tensors");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), hd = x.size(3), half = hd / 2;
  TORCH_CHECK(hd % 2 == 0 && x.stride(3) == 1, "rope needs an even head size in a contiguous last dimension");
  TORCH_CHECK((cos.size(0) == B || cos.size(0) == 1) && cos.size(1) == 1 && cos.size(2) == T && cos.size(3) == hd,
              "cos and sin must be [B or 1, 1, T, hd] for x ", x.sizes());
  const at::Tensor c = cos.contiguous(), sn = sin.contiguous();
  at::Tensor y = at::empty({B, H, T, hd}, x.options());
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* cp = c.data_ptr<at::BFloat16>();
  const at::BFloat16* sp = sn.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2), cb = c.size(0) == 1 ? 0 : T * hd;
  const int64_t grain = std::max<int64_t>(1, 8192 / hd);
  at::parallel_for(0, B * H * T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * T), h = (r / T) % H, t = r % T;
      const at::BFloat16* xr = xp + b * sb + h * sh + t * st;
      const at::BFloat16* cr = cp + b * cb + t * hd;
      const at::BFloat16* sr = sp + b * cb + t * hd;
      at::BFloat16* yr = yp + r * hd;
      for (int64_t i = 0; i < hd; ++i) {
        const float rotated = i < half ? -static_cast<float>(xr[i + half]) : static_cast<float>(xr[i - half]);
        const float a = static_cast<float>(at::BFloat16(static_cast<float>(xr[i]) * static_cast<float>(cr[i])));
        const float s = static_cast<float>(at::BFloat16(rotated * static_cast<float>(sr[i])));
        yr[i] = at::BFloat16(a + s);
      }
    }
  });
  return y;
}

// Index of the largest element of each row of x [B, V] (fp32 or bf16) -> [B] int64; the first one on
// ties and the first NaN if any, as torch.argmax. Greedy decoding calls it once per token, where
// torch's argmax over a 49k-entry bf16 row took ~180 us on the development CPU (this: a few us).
at::Tensor argmax(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && x.size(1) > 0 &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "argmax takes a contiguous non-empty 2-D fp32 or bf16 CPU tensor");
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  std::vector<float> row(V);
  for (int64_t b = 0; b < B; ++b) {
    if (x.scalar_type() == at::kFloat) {
      std::memcpy(row.data(), x.data_ptr<float>() + b * V, V * sizeof(float));
    } else {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + b * V;
      for (int64_t i = 0; i < V; ++i) row[i] = bf16_to_float(p[i]);
    }
    __m256 best = _mm256_set1_ps(-INFINITY);
    __m256 nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) {
      const __m256 v = _mm256_loadu_ps(row.data() + i);
      best = _mm256_max_ps(best, v);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, best);
    float mx = -INFINITY;
    bool any_nan = _mm256_movemask_ps(nan) != 0;
    for (float l : lanes) mx = std::max(mx, l);
    for (; i < V; ++i) {
      any_nan = any_nan || std::isnan(row[i]);
      mx = std::max(mx, row[i]);
    }
    int64_t idx = 0;
    for (int64_t j = 0; j < V; ++j)
      if (any_nan ? std::isnan(row[j]) : row[j] == mx) {
        idx = j;
        break;
      }
    out.data_ptr<int64_t>()[b] = idx;
  }
  return out;
}

