// The de-quantizing loops of dequantize.h, included twice: inside `namespace avx2`, and compiled for
// AVX-512 BF16 inside `namespace avx512_bf16` (PARTINFER_AVX512_BF16 defined), where sixteen values are one
// 512-bit vector and a bf16 output is rounded by one `vcvtneps2bf16` (AVX2: five integer operations per
// eight values).
//
// Values equal the formats' references bit for bit: d * q is exact in fp32 (an fp16 scale times a code
// of at most 8 bits), so the fused multiply-add rounds once, as the reference's multiply then add does;
// bf16 outputs are rounded to nearest, ties to even, as at::BFloat16 rounds.

#ifdef PARTINFER_AVX512_BF16
using Floats16 = __m512;  // 16 fp32 values
inline Floats16 splat(float v) { return _mm512_set1_ps(v); }
inline Floats16 u8_floats(__m128i c) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c)); }
inline Floats16 s8_floats(__m128i c) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)); }
inline Floats16 fp16_floats(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline Floats16 mul(Floats16 a, Floats16 b) { return _mm512_mul_ps(a, b); }
inline Floats16 fmadd(Floats16 a, Floats16 b, Floats16 c) { return _mm512_fmadd_ps(a, b, c); }
inline void store16(float* out, Floats16 v) { _mm512_storeu_ps(out, v); }
inline void store16(at::BFloat16* out, Floats16 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
#else
struct Floats16 {  // 16 fp32 values as two 256-bit halves
  __m256 lo, hi;
};
inline Floats16 splat(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline Floats16 u8_floats(__m128i c) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)))};
}
inline Floats16 s8_floats(__m128i c) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8)))};
}
inline Floats16 fp16_floats(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline Floats16 mul(Floats16 a, Floats16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline Floats16 fmadd(Floats16 a, Floats16 b, Floats16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline void store16(float* out, Floats16 v) {
  _mm256_storeu_ps(out, v.lo);
  _mm256_storeu_ps(out + 8, v.hi);
}
// Rounded to nearest, ties to even, in integer lanes (no NaN in de-quantized weights).
inline __m128i bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}
inline void store16(at::BFloat16* out, Floats16 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), bf16_bits(v.lo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 8), bf16_bits(v.hi));
}
#endif

// 32 Q4_1 codes (16 bytes, low nibbles first) -> their 0..15 values: low nibbles [0, 16), high [16, 32).
inline void q4_nibbles(const uint8_t* p, __m128i& lo, __m128i& hi) {
  const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  lo = _mm_and_si128(codes, _mm_set1_epi8(0x0F));
  hi = _mm_and_si128(_mm_srli_epi16(codes, 4), _mm_set1_epi8(0x0F));
}

inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// One row of nb blocks of 32 weights -> out [32 nb].
template <class T>
void dequantize_row(const uint8_t* w, bool q4, int64_t nb, T* out) {
  for (int64_t b = 0; b < nb; ++b, out += 32) {
    if (q4) {
      const uint8_t* blk = w + b * Q4_1_BYTES;
      const Floats16 d = splat(fp16_to_float(blk)), m = splat(fp16_to_float(blk + 2));
      __m128i lo, hi;
      q4_nibbles(blk + 4, lo, hi);
      store16(out, fmadd(d, u8_floats(lo), m));
      store16(out + 16, fmadd(d, u8_floats(hi), m));
    } else {
      const uint8_t* blk = w + b * Q8_0_BYTES;
      const Floats16 d = splat(fp16_to_float(blk));
      store16(out, mul(d, s8_floats(load16(blk + 2))));
      store16(out + 16, mul(d, s8_floats(load16(blk + 18))));
    }
  }
}

// One neuron's down column (`cols` outputs, a multiple of 32) -> out [cols]: output i is d[i] q + m[i]
// with the fp16 scales (and, for Q4_1, mins) of the neuron's block.
template <bool q4, class T>
void column_of(const ColumnMatrix& C, int64_t r, T* out) {
  const uint8_t* c = C.row(r);
  const uint16_t* d = C.scales(C.blocks[r]);
  const uint16_t* m = d + C.cols;  // read for Q4_1 only
  for (int64_t g = 0; g < C.cols; g += 32) {
    if (q4) {
      __m128i lo, hi;
      q4_nibbles(c + g / 2, lo, hi);
      store16(out + g, fmadd(fp16_floats(d + g), u8_floats(lo), fp16_floats(m + g)));
      store16(out + g + 16, fmadd(fp16_floats(d + g + 16), u8_floats(hi), fp16_floats(m + g + 16)));
    } else {
      store16(out + g, mul(fp16_floats(d + g), s8_floats(load16(c + g))));
      store16(out + g + 16, mul(fp16_floats(d + g + 16), s8_floats(load16(c + g + 16))));
    }
  }
}

template <class T>
void dequantize_column(const ColumnMatrix& C, int64_t r, T* out) {
  C.q4 ? column_of<true>(C, r, out) : column_of<false>(C, r, out);
}
