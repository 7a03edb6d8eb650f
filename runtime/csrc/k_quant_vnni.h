// K-quant products on 512-bit vectors with AVX-512 VNNI, the same sums as k_quant_products.h's AVX2 ones
// (which the layouts and formulas there describe). Included by k_quant_products.h inside namespace kq,
// compiled for avx512f/bw/vl/vnni; used only where the CPU has them (`k_quant_kernels`).
//
// Rows: a 64-byte load of a Q4_K block's codes holds two sub-blocks in its low nibbles and two in its
// high ones, and one of a Q6_K block's low code bytes (ql) holds 128 weights whose top two bits sit in
// one 32-byte load of qh (its high bits, shifted by lane); so a block is four 64-weight products,
// each `vpmaddubsw` (codes x 8-bit inputs) then `vpdpwssd` (x sub-block scales, accumulated), the
// scales spread over the lanes by one `vpermw`. The Q4_K input is stored in that sub-block order
// (Q8KInput::q_pairs), made once per input.
// Down columns: four neurons' 64 codes interleaved byte by byte (two unpacks), so that `vpdpbusd`
// multiplies and sums all four per output into int32; up to four tokens share each unpacked code.
// Measured against the AVX2 kernels: docs/benchmarks.md.

namespace vnni512 {

inline __m512i load64(const void* p) { return _mm512_loadu_si512(p); }

// int16 lanes 0-15 = a, 16-31 = b.
inline __m512i halves16(int16_t a, int16_t b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16(a)), _mm256_set1_epi16(b), 1);
}

// A Q4_K head's 12 bytes of 6-bit scales and mins (p = head + 4; reads 16 bytes, the codes follow) ->
// 16 int16 lanes: scale s in lane s, min s in lane 8 + s (as q4_k_scales, with two byte shuffles).
inline __m256i q4_k_scales_mins(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
  const __m128i top = _mm_shuffle_epi8(v, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));  // -1: 0
  const __m128i bits = _mm_or_si128(
      _mm_and_si128(low, _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0)),
      _mm_and_si128(_mm_srli_epi16(low, 4), _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15)));
  const __m128i high2 = _mm_and_si128(_mm_srli_epi16(top, 2), _mm_setr_epi8(0, 0, 0, 0, 48, 48, 48, 48, 0, 0, 0, 0, 48, 48, 48, 48));
  return _mm256_cvtepu8_epi16(_mm_or_si128(bits, high2));
}

// One block's integer sum, 16 int32 lanes: the four 64-weight products codes[j] (u8) . x[64 j ..] (s8),
// each pair's int16 sums weighted by scale[j]; two chains of two multiply-adds, half the dependent
// latency of one chain of four.
inline __m512i block_sums(const __m512i* codes, const __m512i* scale, const int8_t* x) {
  const __m512i even = _mm512_dpwssd_epi32(_mm512_madd_epi16(_mm512_maddubs_epi16(codes[0], load64(x)), scale[0]),
                                           _mm512_maddubs_epi16(codes[2], load64(x + 128)), scale[2]);
  const __m512i odd = _mm512_dpwssd_epi32(_mm512_madd_epi16(_mm512_maddubs_epi16(codes[1], load64(x + 64)), scale[1]),
                                          _mm512_maddubs_epi16(codes[3], load64(x + 192)), scale[3]);
  return _mm512_add_epi32(even, odd);
}

// A block's product with one input is block_sums (the codes times the input's 8-bit codes, weighted by
// the sub-block scales) times d d_x, less a correction from the input's partial sums: Q4_K's minimums
// (dmin d_x sum_s m_s sum of sub-block s's input codes), Q6_K's offset (32 d d_x sum_s sc_s sum ...).
// Each format's unpacker decodes a block once (`operator()`), then adds its product with each input.
// (Constants set in user-written constructors: an implicit one is not compiled for this file's target.)

// Q4_K: 64-weight product j covers sub-blocks (a, b) = (0, 2), (1, 3), (4, 6), (5, 7) (the nibbles of
// code bytes 0-63, then 64-127); its vpermw index puts sub-block a's scale in lanes 0-15, b's in 16-31.
struct Q4KUnpack {
  static constexpr int64_t BYTES = Q4_K_BYTES;
  using Correction = __m128;  // four lanes per input
  __m512i low4, pick[4];
  __m512i codes[4], scale[4];
  __m128i mins;   // the 8 sub-block minimums, int16
  __m128 d_dmin;  // d, dmin in lanes 0 and 1
  Q4KUnpack() : low4(_mm512_set1_epi8(0x0F)), pick{halves16(0, 2), halves16(1, 3), halves16(4, 6), halves16(5, 7)} {}
  void operator()(const uint8_t* w) {
    const __m256i sm = q4_k_scales_mins(w + 4);
    const __m512i sc16 = _mm512_castsi256_si512(sm);
    mins = _mm256_extracti128_si256(sm, 1);
    const __m512i c0 = load64(w + 16), c1 = load64(w + 80);
    codes[0] = _mm512_and_si512(c0, low4), codes[1] = _mm512_and_si512(_mm512_srli_epi16(c0, 4), low4);
    codes[2] = _mm512_and_si512(c1, low4), codes[3] = _mm512_and_si512(_mm512_srli_epi16(c1, 4), low4);
    for (int j = 0; j < 4; ++j) scale[j] = _mm512_permutexvar_epi16(pick[j], sc16);
    int32_t bits;  // the block's fp16 d and dmin
    std::memcpy(&bits, w, sizeof bits);
    d_dmin = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
  }
  // block b of `in`: acc += its product's sums, corr += its minimums' term
  void add(const Q8KInput& in, int64_t b, __m512& acc, Correction& corr) const {
    const __m512i isum = block_sums(codes, scale, in.q_pairs.data() + QK_K * b);
    const __m128 dd = _mm_mul_ps(d_dmin, _mm_set1_ps(in.d[b]));  // d dx, dmin dx
    acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(dd), _mm512_cvtepi32_ps(isum), acc);
    const __m128i msum = _mm_madd_epi16(mins, _mm_loadu_si128(reinterpret_cast<const __m128i*>(in.sums32.data() + 8 * b)));
    corr = _mm_fmadd_ps(_mm_permute_ps(dd, 0x55), _mm_cvtepi32_ps(msum), corr);
  }
  static Correction zero() { return _mm_setzero_ps(); }
};

// Q6_K: 64-weight product j covers weights 64j .. 64j + 63 in order: low code byte nibbles (ql) with
// two high bits from qh moved to bits 4-5; sub-block scales 4j .. 4j + 3 over its 32 int16 lanes.
struct Q6KUnpack {
  static constexpr int64_t BYTES = Q6_K_BYTES;
  using Correction = __m256;
  __m512i low4, bits45, up, down, pick[4];
  __m512i codes[4], scale[4];
  __m256i sc256;  // the 16 sub-block scales, int16
  float d;
  Q6KUnpack()
      : low4(_mm512_set1_epi8(0x0F)), bits45(_mm512_set1_epi8(0x30)),
        up(_mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1)),     // qh bits 0-1 | 2-3 -> 4-5
        down(_mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1)) {  // qh bits 4-5 | 6-7 -> 4-5
    for (int j = 0; j < 4; ++j)
      pick[j] = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_set_m128i(_mm_set1_epi16(static_cast<int16_t>(4 * j + 1)), _mm_set1_epi16(static_cast<int16_t>(4 * j)))),
          _mm256_set_m128i(_mm_set1_epi16(static_cast<int16_t>(4 * j + 3)), _mm_set1_epi16(static_cast<int16_t>(4 * j + 2))), 1);
  }
  void operator()(const uint8_t* w) {
    sc256 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 192)));
    const __m512i sc16 = _mm512_castsi256_si512(sc256);
    for (int h = 0; h < 2; ++h) {
      const __m512i ql = load64(w + 64 * h);
      const __m512i qh = _mm512_broadcast_i64x4(load32(w + 128 + 32 * h));
      codes[2 * h] = _mm512_ternarylogic_epi32(_mm512_and_si512(ql, low4), _mm512_sllv_epi16(qh, up), bits45, 0xF8);
      codes[2 * h + 1] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low4),
                                                   _mm512_srlv_epi16(qh, down), bits45, 0xF8);  // a | (b & c)
    }
    for (int j = 0; j < 4; ++j) scale[j] = _mm512_permutexvar_epi16(pick[j], sc16);
    d = fp16_to_float(w + 208);
  }
  void add(const Q8KInput& in, int64_t b, __m512& acc, Correction& corr) const {
    const __m512i isum = block_sums(codes, scale, in.q.data() + QK_K * b);
    const float dd = d * in.d[b];
    acc = _mm512_fmadd_ps(_mm512_set1_ps(dd), _mm512_cvtepi32_ps(isum), acc);
    const __m256i ssum = _mm256_madd_epi16(sc256, load32(in.sums16.data() + 16 * b));
    corr = _mm256_fmadd_ps(_mm256_set1_ps(32.0f * dd), _mm256_cvtepi32_ps(ssum), corr);
  }
  static Correction zero() { return _mm256_setzero_ps(); }
};

// The sum of a correction's lanes (four for Q4_K, eight for Q6_K).
inline float lanes_sum(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}
inline float lanes_sum(__m256 v) { return lanes_sum(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1))); }

// One row . NT inputs (out[t] = row . in[t]): a block is unpacked once for all NT tokens of a prompt.
template <class Unpack, int NT>
inline void dots(const uint8_t* w, int64_t nb, const Q8KInput* const* in, float* out) {
  Unpack unpack;
  __m512 acc[NT];
  typename Unpack::Correction corr[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps(), corr[t] = Unpack::zero();
  for (int64_t b = 0; b < nb; ++b, w += Unpack::BYTES) {
    unpack(w);
    for (int t = 0; t < NT; ++t) unpack.add(*in[t], b, acc[t], corr[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = _mm512_reduce_add_ps(acc[t]) - lanes_sum(corr[t]);
}

// Four lanes' sums -> lane r of the result = the sum of v[r]'s lanes (a transposing reduction: three
// adds and shuffles per pair instead of a whole reduction per row).
inline __m128 sums4(const __m256* v) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}
inline __m128 sums4(const __m512* v) {
  __m256 h[4];
  for (int r = 0; r < 4; ++r)
    h[r] = _mm256_add_ps(_mm512_castps512_ps256(v[r]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[r]), 1)));
  return sums4(h);
}
inline __m128 sums4(const __m128* v) { return _mm_hadd_ps(_mm_hadd_ps(v[0], v[1]), _mm_hadd_ps(v[2], v[3])); }

// Decode: four rows . one input (out[r] = w[r] . in), one row after the other (in memory order: taking
// their blocks side by side, four streams, was slower), with the constants set up once and one
// transposing reduction for the four: per row, those of dots<., 1> cost about as much as a block.
// Prefetches row ahead[r] (or none) as row r starts, as rows_dots does one row at a time.
template <class Unpack>
inline void dots4(const uint8_t* const* w, int64_t nb, const Q8KInput& in, float* out, const uint8_t* const* ahead,
                  int64_t row_bytes) {
  Unpack unpack;
  __m512 acc[4];
  typename Unpack::Correction corr[4];
  for (int r = 0; r < 4; ++r) {
    if (ahead[r]) prefetch_row(ahead[r], row_bytes);
    acc[r] = _mm512_setzero_ps(), corr[r] = Unpack::zero();
    for (int64_t b = 0; b < nb; ++b) {
      unpack(w[r] + Unpack::BYTES * b);
      unpack.add(in, b, acc[r], corr[r]);
    }
  }
  _mm_storeu_ps(out, _mm_sub_ps(sums4(acc), sums4(corr)));
}

// y[t * stride + r] = row(r) . in[t] for r in [r0, r1) and t < T (as kq::rows_dots), eight (then four,
// then one) tokens per pass over a row: a block's codes and scales are unpacked once for all of them;
// one token (decode) takes four rows per pass (dots4).
void rows_dots(bool q4_k, const uint8_t* w, int64_t row_bytes, const int64_t* rows, int64_t r0, int64_t r1,
               const Q8KInput* const* in, int64_t T, float* y, int64_t stride) {
  const int64_t nb = row_bytes / (q4_k ? Q4_K_BYTES : Q6_K_BYTES), ahead = rows_ahead(row_bytes, rows != nullptr);
  const auto row_at = [&](int64_t r) { return w + (rows ? rows[r] : r) * row_bytes; };
  float out[8];
  int64_t r = r0;
  if (T == 1) {
    for (; r + 4 <= r1; r += 4) {
      const uint8_t* w4[4];
      const uint8_t* next[4];
      for (int i = 0; i < 4; ++i) {
        w4[i] = row_at(r + i);
        next[i] = ahead && r + i + ahead < r1 ? row_at(r + i + ahead) : nullptr;
      }
      q4_k ? dots4<Q4KUnpack>(w4, nb, *in[0], out, next, row_bytes) : dots4<Q6KUnpack>(w4, nb, *in[0], out, next, row_bytes);
      for (int i = 0; i < 4; ++i) y[r + i] = out[i];
    }
  }
  for (; r < r1; ++r) {
    if (ahead && r + ahead < r1) prefetch_row(row_at(r + ahead), row_bytes);
    const uint8_t* row = row_at(r);
    int64_t t = 0;
    for (; t + 8 <= T; t += 8) {
      q4_k ? dots<Q4KUnpack, 8>(row, nb, in + t, out) : dots<Q6KUnpack, 8>(row, nb, in + t, out);
      for (int i = 0; i < 8; ++i) y[(t + i) * stride + r] = out[i];
    }
    for (; t + 4 <= T; t += 4) {
      q4_k ? dots<Q4KUnpack, 4>(row, nb, in + t, out) : dots<Q6KUnpack, 4>(row, nb, in + t, out);
      for (int i = 0; i < 4; ++i) y[(t + i) * stride + r] = out[i];
    }
    for (; t < T; ++t) {
      q4_k ? dots<Q4KUnpack, 1>(row, nb, in + t, out) : dots<Q6KUnpack, 1>(row, nb, in + t, out);
      y[t * stride + r] = out[0];
    }
  }
}

// 64 codes (0..15 | 0..63) of one neuron's code bytes for one 256-output group, part p of four:
// Q6_K part p = outputs 64p .. 64p + 63 in order; Q4_K part p = 2h + n (n: low or high nibble) =
// outputs 128h + 32n + (0..31) in lanes 0-31 and 128h + 64 + 32n + (0..31) in lanes 32-63.
template <bool Q4K>
inline __m512i column_codes(const uint8_t* codes, int p) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i bytes = load64(codes + 64 * (p / 2));
  const __m512i nib = _mm512_and_si512(p % 2 ? _mm512_srli_epi16(bytes, 4) : bytes, low4);
  if (Q4K) return nib;
  const __m512i qh = _mm512_broadcast_i64x4(load32(codes + 128 + 32 * (p / 2)));
  const __m512i high = p % 2 ? _mm512_srlv_epi16(qh, _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1))
                             : _mm512_sllv_epi16(qh, _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1));
  return _mm512_ternarylogic_epi32(nib, high, _mm512_set1_epi8(0x30), 0xF8);
}

// The first output of the 16 in lanes 16m .. 16m + 15 of part p (see column_codes).
template <bool Q4K>
inline int64_t part_output(int p, int m) {
  if (!Q4K) return 64 * p + 16 * m;
  return 128 * (p / 2) + 32 * (p % 2) + (m < 2 ? 16 * m : 64 + 16 * (m - 2));
}

// 16 outputs' head byte k of one block's heads in the down table (see kq::head_bytes16) -> 16 int32 lanes, 0..255.
inline __m512i head_bytes16(const uint16_t* unit, int64_t d, int k, int64_t r) {
  const __m512i u = _mm512_cvtepu16_epi32(load32(unit + (k / 2) * d + r));
  return _mm512_and_si512(_mm512_srli_epi32(u, 8 * (k % 2)), _mm512_set1_epi32(0xFF));
}

inline __m512 fp16_16(const uint16_t* p) { return _mm512_cvtph_ps(load32(p)); }

// The scale and offset of outputs r .. r + 15 for neurons of sub-block s of a block (its heads at `unit`),
// as k_scale_offset decodes them: w = scale q - offset.
template <bool Q4K>
inline void column_scales(const uint16_t* unit, int64_t d, int s, int64_t r, __m512& scale, __m512& offset) {
  if (Q4K) {
    __m512i sc, m;
    const __m512i six = _mm512_set1_epi32(63), four = _mm512_set1_epi32(15);
    if (s < 4) {
      sc = _mm512_and_si512(head_bytes16(unit, d, 4 + s, r), six);
      m = _mm512_and_si512(head_bytes16(unit, d, 8 + s, r), six);
    } else {
      const __m512i hi = head_bytes16(unit, d, 8 + s, r);
      sc = _mm512_or_si512(_mm512_and_si512(hi, four), _mm512_slli_epi32(_mm512_srli_epi32(head_bytes16(unit, d, s, r), 6), 4));
      m = _mm512_or_si512(_mm512_srli_epi32(hi, 4), _mm512_slli_epi32(_mm512_srli_epi32(head_bytes16(unit, d, 4 + s, r), 6), 4));
    }
    scale = _mm512_mul_ps(fp16_16(unit + r), _mm512_cvtepi32_ps(sc));
    offset = _mm512_mul_ps(fp16_16(unit + d + r), _mm512_cvtepi32_ps(m));
    return;
  }
  const __m512i raw = _mm512_cvtepu16_epi32(load32(unit + (s / 2) * d + r));  // byte s of each head, sign-extended
  const __m512i sc = _mm512_srai_epi32(_mm512_slli_epi32(raw, 24 - 8 * (s % 2)), 24);
  scale = _mm512_mul_ps(fp16_16(unit + 8 * d + r), _mm512_cvtepi32_ps(sc));
  offset = _mm512_mul_ps(scale, _mm512_set1_ps(32.0f));
}

// The column sums of one group of neurons (those of one sub-block, count <= 32) for part p of output
// group og, NT tokens: their codes (codes[k] -> neuron k's bytes of that output group) times their
// 8-bit activations qa[t][k], folded with the group's scales into out[t] (+= scale unit sum - offset a_sum[t]).
template <bool Q4K, int NT>
inline void group_part(const uint8_t* const* codes, const int8_t (*qa)[32], int64_t count, int p, const uint16_t* unit,
                       int64_t d, int s, int64_t o0, const float* units, const float* a_sum, float* const* out) {
  __m512i acc[NT][4];
  for (int t = 0; t < NT; ++t)
    for (int j = 0; j < 4; ++j) acc[t][j] = _mm512_setzero_si512();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t k = 0; k < count; k += 4) {
    __m512i q[4];
    for (int i = 0; i < 4; ++i) q[i] = k + i < count ? column_codes<Q4K>(codes[k + i], p) : zero;
    const __m512i t0 = _mm512_unpacklo_epi8(q[0], q[1]), t1 = _mm512_unpackhi_epi8(q[0], q[1]);
    const __m512i t2 = _mm512_unpacklo_epi8(q[2], q[3]), t3 = _mm512_unpackhi_epi8(q[2], q[3]);
    // per 128-bit lane L (outputs 16L .. 16L + 15 of the part): u_j holds outputs 16L + 4j .. + 3, four neurons each
    const __m512i u[4] = {_mm512_unpacklo_epi16(t0, t2), _mm512_unpackhi_epi16(t0, t2), _mm512_unpacklo_epi16(t1, t3),
                          _mm512_unpackhi_epi16(t1, t3)};
    for (int t = 0; t < NT; ++t) {
      int32_t quad;  // neurons k .. k + 3's activations (zero past count: qa is zero-filled)
      std::memcpy(&quad, qa[t] + k, sizeof quad);
      const __m512i act = _mm512_set1_epi32(quad);
      for (int j = 0; j < 4; ++j) acc[t][j] = _mm512_dpbusd_epi32(acc[t][j], u[j], act);
    }
  }
  for (int t = 0; t < NT; ++t) {
    // lanes back in output order: V_m = 128-bit lane m of acc[0], acc[1], acc[2], acc[3] = outputs 16m .. 16m + 15
    const __m512i lo01 = _mm512_shuffle_i32x4(acc[t][0], acc[t][1], 0x44), lo23 = _mm512_shuffle_i32x4(acc[t][2], acc[t][3], 0x44);
    const __m512i hi01 = _mm512_shuffle_i32x4(acc[t][0], acc[t][1], 0xEE), hi23 = _mm512_shuffle_i32x4(acc[t][2], acc[t][3], 0xEE);
    acc[t][0] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);
    acc[t][1] = _mm512_shuffle_i32x4(lo01, lo23, 0xDD);
    acc[t][2] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);
    acc[t][3] = _mm512_shuffle_i32x4(hi01, hi23, 0xDD);
  }
  for (int m = 0; m < 4; ++m) {
    const int64_t r = o0 + part_output<Q4K>(p, m);
    __m512 scale, offset;
    column_scales<Q4K>(unit, d, s, r, scale, offset);
    for (int t = 0; t < NT; ++t) {
      const __m512 sum = _mm512_mul_ps(_mm512_set1_ps(units[t]), _mm512_cvtepi32_ps(acc[t][m]));
      const __m512 v = _mm512_fmadd_ps(scale, sum, _mm512_loadu_ps(out[t] + r));
      _mm512_storeu_ps(out[t] + r, _mm512_fnmadd_ps(offset, _mm512_set1_ps(a_sum[t]), v));
    }
  }
}

// The same as kq::axpy_columns_k for NT tokens at once: out[t][d] += sum_{r in [r0, r1)} a[t][r] column(row(r)),
// a[t] = a + t * a_stride, units[t] = units + t * W.n_keys.
template <int NT>
void axpy_columns_nt(const KColumns& W, const float* a, int64_t a_stride, const int64_t* rows, const float* units,
                     float* const* out, const RowGroups& groups) {
  const int64_t G = W.n_keys, group = W.group(), halves = W.halves(), d = W.d;
  const int64_t ob = W.q4_k ? 128 : 192;  // code bytes per 256 outputs
  const std::vector<int64_t>&start = groups.start, &order = groups.order;
  const uint8_t* ptr[32];
  const uint8_t* row_of[2][32];  // this group's and the next group's neurons' code rows, found once per group
  alignas(64) int8_t qa[NT][32];
  float unit[NT], a_sum[NT];
  auto find_rows = [&](int64_t g, const uint8_t** out) {
    for (int64_t k = 0; k < start[g + 1] - start[g]; ++k) {
      const int64_t r = order[start[g] + k];
      out[k] = W.row(rows ? rows[r] : r);
    }
  };
  int cur = 0;
  bool found = false;  // row_of[cur] already holds group g's rows (found as the previous group's next)
  for (int64_t g = 0, next = 0; g < G; ++g) {
    if (start[g] == start[g + 1]) continue;
    for (next = std::max(next, g + 1); next < G && start[next] == start[next + 1];) ++next;
    const int64_t count = start[g + 1] - start[g];
    if (!found) find_rows(g, row_of[cur]);
    for (int t = 0; t < NT; ++t) {
      unit[t] = units[t * G + g];
      const float inv = unit[t] != 0.0f ? 1.0f / unit[t] : 0.0f;
      int32_t qa_sum = 0;
      std::memset(qa[t], 0, sizeof qa[t]);
      for (int64_t k = 0; k < count; ++k) {
        qa[t][k] = static_cast<int8_t>(std::nearbyint(a[t * a_stride + order[start[g] + k]] * inv));  // half to even
        qa_sum += qa[t][k];
      }
      a_sum[t] = unit[t] * static_cast<float>(qa_sum);
    }
    const int64_t b = g * group / QK_K;
    const int s = static_cast<int>((g * group % QK_K) / group);
    const uint16_t* head = W.table + b * halves * d;
    // The next group's codes, whole rows, fetched in even shares while this group is summed (one share
    // per 64-output part): sequential lines of few rows, which the prefetchers and fill buffers keep up with.
    const int64_t next_count = next < G ? start[next + 1] - start[next] : 0, line_count = W.code_bytes / 64;
    if (next_count) find_rows(next, row_of[1 - cur]);
    found = next_count > 0;
    const uint8_t* const* fetch_rows = row_of[1 - cur];
    const int64_t slots = d / QK_K * 4, lines = next_count * line_count;
    int64_t slot = 0, fetched = 0, fetch_k = 0, fetch_line = 0;  // lines issued; the next one's neuron and line
    for (int64_t og = 0; og < d / QK_K; ++og) {
      for (int64_t k = 0; k < count; ++k) ptr[k] = row_of[cur][k] + og * ob;
      for (int p = 0; p < 4; ++p) {
        // (counters, not a division per line: an idiv per 64 bytes cost as much as the sums themselves)
        for (const int64_t until = lines * ++slot / slots; fetched < until; ++fetched) {
          _mm_prefetch(reinterpret_cast<const char*>(fetch_rows[fetch_k] + 64 * fetch_line), _MM_HINT_T0);
          if (++fetch_line == line_count) fetch_line = 0, ++fetch_k;
        }
        if (W.q4_k)
          group_part<true, NT>(ptr, qa, count, p, head, d, s, og * QK_K, unit, a_sum, out);
        else
          group_part<false, NT>(ptr, qa, count, p, head, d, s, og * QK_K, unit, a_sum, out);
      }
    }
    cur = 1 - cur;
  }
}

// out + t * out_stride += the column sums of token t < T (see kq::axpy_columns_k), four tokens at a time.
void axpy_columns(const KColumns& W, const float* a, int64_t T, int64_t a_stride, const int64_t* rows, const float* units,
                  float* out, int64_t out_stride, int64_t r0, int64_t r1) {
  thread_local RowGroups groups;
  groups.sort(W.keys, W.n_keys, rows, r0, r1);
  for (int64_t t = 0; t < T;) {
    float* outs[4];
    const int64_t nt = T - t >= 4 ? 4 : 1;
    for (int64_t i = 0; i < nt; ++i) outs[i] = out + (t + i) * out_stride;
    if (nt == 4)
      axpy_columns_nt<4>(W, a + t * a_stride, a_stride, rows, units + t * W.n_keys, outs, groups);
    else
      axpy_columns_nt<1>(W, a + t * a_stride, a_stride, rows, units + t * W.n_keys, outs, groups);
    t += nt;
  }
}

}  // namespace vnni512
