// Compact weights as the kernels see them: the 8-bit quantized input, compact rows and down columns,
// and the compact-row kernels (compact_rows.h, built for AVX2 and AVX-512 VNNI) chosen once per process.
// Included by partinfer_cpu.cpp inside its anonymous namespace.

constexpr int64_t Q4_1_BYTES = 20, Q8_0_BYTES = 34;  // bytes per block of 32 weights (common/formats/blocks.py; pinned by a test)

inline float fp16_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return _cvtsh_ss(h);
}

// Two consecutive fp16 values (a Q4_1 block's d, m) -> lanes 0 and 1 of a float vector.
inline __m128 fp16_pair(const uint8_t* p) {
  int32_t both;
  std::memcpy(&both, p, sizeof both);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(both));
}

// A GEMV input quantized as compact-row kernels read it: per block of 32, int8 codes q, scale d and
// d * sum(q) (see compact_rows.h). Rounds to nearest even, as torch.round (runtime/quant.py's reference).
struct QuantizedInput {
  std::vector<int8_t> q;
  std::vector<float> d, s, ds;  // ds: (d, s) interleaved, as the Q4_1 kernel reads them
  // Vectorized: every layer quantizes four inputs per decode step on every thread.
  void quantize(const float* x, int64_t n) {
    const int64_t nb = n / 32;
    q.resize(32 * nb);
    d.resize(nb);
    s.resize(nb);
    ds.resize(2 * nb);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + 32 * b;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float scale = _mm_cvtss_f32(m4) / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
      __m256i ints[4];
      for (int i = 0; i < 4; ++i)  // round to nearest even, as std::nearbyint and torch.round
        ints[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)),
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m256i total = _mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3]));
      // int32 -> int8 in order: packs interleave 128-bit lanes, a final permute puts them back.
      const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3]));
      const __m256i ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q.data() + 32 * b), ordered);
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
      d[b] = ds[2 * b] = scale;
      s[b] = ds[2 * b + 1] = scale * static_cast<float>(_mm_cvtsi128_si32(t));
    }
  }
};

inline void prefetch_row(const uint8_t* row, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(row + i), _MM_HINT_T0);
}

// Items per chunk when n items are handed out in chunks: about `per_thread` chunks per thread, each a
// multiple of `grain` items (whole K-quant sub-blocks of neurons stay in one chunk); so there are at most
// per_thread * nt chunks.
inline int64_t chunk_size(int64_t n, int64_t grain, int nt, int per_thread) {
  return std::max<int64_t>(1, (n + per_thread * nt * grain - 1) / (per_thread * nt * grain)) * grain;
}

// f(begin, end, chunk) for the chunks of `size` items of [0, n) that this thread takes from the shared
// counter `next` (each chunk goes to whichever thread asks first); returns the number of chunks.
template <class F>
int64_t take_chunks(std::atomic<int64_t>& next, int64_t n, int64_t size, F&& f) {
  for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c * size < n; c = next.fetch_add(1, std::memory_order_relaxed))
    f(c * size, std::min(n, (c + 1) * size), c);
  return (n + size - 1) / size;
}

// f(begin, end, chunk) for the chunks of [0, n), each handed to whichever thread asks next: on a shared
// VM one vCPU often runs slower for a while, and with even shares the other waited for it (the decode
// step's Team::chunks does the same inside its region). Sums over chunks go into a partial per chunk,
// added in chunk order, so that a result does not depend on which thread ran which chunk.
template <class F>
void parallel_chunks(int64_t n, int64_t grain, int per_thread, F&& f) {
  const int nt = at::get_num_threads();
  const int64_t size = chunk_size(n, grain, nt, per_thread);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) { take_chunks(next, n, size, f); });
}

// How many rows ahead of the one being read a GEMV prefetches: about 4 KiB of short rows (the next row
// alone, 864 bytes of Q4_K for 1,536 weights, arrives too late for memory's latency), the next of rows
// gathered out of order; none for long rows read in order, which the hardware prefetchers stream
// (prefetching a 7 KiB row in one burst halved the speed of Q6_K rows of 8,960 weights).
constexpr int64_t PREFETCH_AHEAD_BYTES = 4096, SHORT_ROW_BYTES = 2048;
inline int64_t rows_ahead(int64_t row_bytes, bool gathered) {
  if (!gathered && row_bytes > SHORT_ROW_BYTES) return 0;
  return std::max<int64_t>(1, PREFETCH_AHEAD_BYTES / row_bytes);
}

// The 8-bit unit of each scale group's activations for column sums in integers: max |a| / 127 over all
// n rows of the group (every thread computes the same from the whole product's a, so a result does not
// depend on how rows are split or ordered); units [n_groups].
void group_units(const int64_t* group_of, int64_t n_groups, const float* a, const int64_t* rows, int64_t n,
                 std::vector<float>& units) {
  units.assign(n_groups, 0.0f);
  for (int64_t r = 0; r < n; ++r) {
    float& u = units[group_of[rows ? rows[r] : r]];
    u = std::max(u, std::fabs(a[r]));
  }
  for (float& u : units) u /= 127.0f;
}

// A share of down columns grouped by the scale group each row's neuron is in (a counting sort): the rows
// r of [r0, r1) whose row(r) = rows[r] (or r) has group g are order[start[g] .. start[g + 1]).
struct RowGroups {
  std::vector<int64_t> start, cursor, order;
  void sort(const int64_t* group_of, int64_t n_groups, const int64_t* rows, int64_t r0, int64_t r1) {
    start.assign(n_groups + 1, 0);
    for (int64_t r = r0; r < r1; ++r) ++start[group_of[rows ? rows[r] : r] + 1];
    for (int64_t g = 0; g < n_groups; ++g) start[g + 1] += start[g];
    cursor.assign(start.begin(), start.end() - 1);
    order.resize(r1 - r0);
    for (int64_t r = r0; r < r1; ++r) order[cursor[group_of[rows ? rows[r] : r]]++] = r;
  }
};

// Compact rows: `rows` rows of `cols` weights, each `row_bytes` bytes of Q4_1 (q4) or Q8_0 blocks.
struct CompactMatrix {
  const uint8_t* data = nullptr;
  int64_t rows = 0, cols = 0, row_bytes = 0;
  bool q4 = false;
  const uint8_t* row(int64_t r) const { return data + r * row_bytes; }
};

// Down columns (runtime/quant.py): each of `rows` neurons has `code_bytes` bytes of codes for `cols`
// outputs (Q4_1 nibbles or Q8_0 int8); neuron r is in block blocks[r], whose scales are
// table[b] = d [cols] then, for Q4_1, m [cols] (fp16).
struct ColumnMatrix {
  const uint8_t* codes = nullptr;
  const uint16_t* table = nullptr;
  const int64_t* blocks = nullptr;
  int64_t rows = 0, cols = 0, code_bytes = 0, n_blocks = 0;
  bool q4 = false;
  const uint8_t* row(int64_t r) const { return codes + r * code_bytes; }
  const uint16_t* scales(int64_t b) const { return table + b * (q4 ? 2 : 1) * cols; }
};

namespace avx2 {
#include "compact_rows.h"
}  // namespace avx2

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
namespace vnni {
#define PARTINFER_VNNI 1
#include "compact_rows.h"
#undef PARTINFER_VNNI
}  // namespace vnni
#pragma GCC pop_options

// The compact-row kernels of this CPU, chosen once: VNNI where the CPU has it (PARTINFER_VNNI=0 forces
// the AVX2 ones, which tests use to check both on a VNNI machine).
struct CompactKernels {
  const char* name;
  void (*gemv_rows)(const CompactMatrix&, const QuantizedInput&, const int64_t*, float*, int64_t, int64_t);
  void (*axpy_columns)(const ColumnMatrix&, const float*, const int64_t*, const float*, float*, int64_t, int64_t);
};

// PARTINFER_VNNI=0: this process runs the AVX2 kernels only, whatever the CPU has (tests check both paths).
bool avx2_forced() {
  const char* env = std::getenv("PARTINFER_VNNI");
  return env && std::string(env) == "0";
}

// Whether this process runs the AVX-512 VNNI kernels: the CPU has them and they are not forced off.
bool vnni_allowed() {
  return !avx2_forced() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw");
}

const CompactKernels& compact_kernels() {
  static const CompactKernels chosen = [] {
    if (vnni_allowed())
      return CompactKernels{"avx512-vnni", vnni::gemv_rows, vnni::axpy_columns};
    return CompactKernels{"avx2", avx2::gemv_rows, avx2::axpy_columns};
  }();
  return chosen;
}

