// AVX-512 (F, DQ, BW, VL) + FMA + F16C row kernels (float32, bfloat16, float16 inputs; float32 arithmetic),
// compiled for that target by the scaffold of distill_isa_begin.h and called only where the running CPU
// (and OS) reports avx512f, avx512dq, avx512bw, avx512vl, fma and f16c.
//
// 16 lanes per vector; compares and blends use mask registers, the partial last vector of a row is
// stored with a masked store. The arithmetic is operation for operation that of the AVX2 and generic
// kernels (same exponential), so the three paths agree to rounding of the horizontal sums.
#define RKD_ISA avx512
#define RKD_ISA_TARGET "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c"
#define RKD_ISA_HAS_F64 0
#include "distill_isa_begin.h"

#if RKD_ISA_ENABLED
namespace rkd::cpu::avx512 {

struct VecAvx512 {
  using T = float;
  using V = __m512;
  static constexpr int W = 16;

  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, V a) { _mm512_storeu_ps(p, a); }
  static inline V set1(float x) { return _mm512_set1_ps(x); }
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static inline V max(V a, V b) { return _mm512_max_ps(a, b); }
  static inline V gt_select(V a, V b, V x, V y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), y, x);
  }
  // acc + c*x where c > 0, acc elsewhere (one masked FMA; a NaN c leaves acc, as in the generic kernel).
  static inline V fma_if_pos(V c, V x, V acc) {
    const __mmask16 keep = _mm512_cmp_ps_mask(c, _mm512_setzero_ps(), _CMP_GT_OQ);
    return _mm512_mask3_fmadd_ps(c, x, acc, keep);
  }

  // Same algorithm and constants as generic::exp2_lane (see distill_kernel.h); NaN propagates through
  // the arithmetic. exp2: lanes with y < kExp2Lo (including -inf) are zeroed by a zero-masking move (NaN
  // is kept: the unordered compare selects it). exp2_clamped: y is first raised to kExp2Clamp (a NaN stays
  // NaN: max returns its second operand when one is NaN).
  // n = round(y) (to nearest even, as the magic-number addition of the other paths), r = y - n and
  // p * 2^n by vscalefps: the same values as generic::exp2_lane (2^n is a normal number there), in two
  // instructions fewer.
  static inline V exp2_poly(V r) {
    V p = _mm512_fmadd_ps(_mm512_set1_ps(kExp2C5), r, _mm512_set1_ps(kExp2C4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp2C3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp2C2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp2C1));
    return _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  }
  static inline V exp2(V y) {
    const __mmask16 keep = _mm512_cmp_ps_mask(y, _mm512_set1_ps(kExp2Lo), _CMP_NLT_UQ);
    const V n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_maskz_scalef_ps(keep, exp2_poly(_mm512_sub_ps(y, n)), n);
  }
  static inline V exp2_clamped(V y) {
    y = _mm512_max_ps(_mm512_set1_ps(kExp2Clamp), y);
    const V n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(exp2_poly(_mm512_sub_ps(y, n)), n);
  }
  // c != 0 ? c*x : 0, NaN c giving NaN (one zero-masking multiply).
  static inline V mul_if_nonzero(V c, V x) {
    return _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(c, _mm512_setzero_ps(), _CMP_NEQ_UQ), c, x);
  }

  static inline float hsum(V a) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline float hmax(V a) {
    const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // Lanes < k (0 <= k) of x, the others v.
  static inline __mmask16 first_mask(int64_t k) {
    return k >= W ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << k) - 1u);
  }
  static inline V one_lane(int64_t k, float v) {
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(1u << k), _mm512_set1_ps(v));
  }
  static inline V first_lanes(V x, int64_t k, float v) {
    return _mm512_mask_blend_ps(first_mask(k), _mm512_set1_ps(v), x);
  }
  static inline int64_t first_eq(const float* p, int64_t n, float v) {
    const V vv = _mm512_set1_ps(v);
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const unsigned bits = _mm512_cmp_ps_mask(_mm512_loadu_ps(p + j), vv, _CMP_EQ_OQ);
      if (bits != 0) return j + __builtin_ctz(bits);
    }
    if (j < n) {
      const unsigned bits =
          _mm512_mask_cmp_ps_mask(first_mask(n - j), _mm512_maskz_loadu_ps(first_mask(n - j), p + j), vv, _CMP_EQ_OQ);
      if (bits != 0) return j + __builtin_ctz(bits);
    }
    return 0;
  }

  static inline V load_in(const float* p) { return _mm512_loadu_ps(p); }
  static inline V load_in(const bf16_t* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  static inline V load_in(const fp16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // count < W values (masked loads: nothing past them is touched), the other lanes pad.
  static inline V load_in_partial(const float* p, int64_t count, float pad) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(pad), first_mask(count), p);
  }
  static inline V load_in_partial(const bf16_t* p, int64_t count, float pad) {
    const __mmask16 k = first_mask(count);
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
    return _mm512_mask_blend_ps(k, _mm512_set1_ps(pad), _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
  }
  static inline V load_in_partial(const fp16_t* p, int64_t count, float pad) {
    const __mmask16 k = first_mask(count);
    return _mm512_mask_blend_ps(k, _mm512_set1_ps(pad), _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)));
  }
  // Round to nearest even, NaN -> 0x7FC0 (what c10::BFloat16 does; the avx512_bf16 instruction would
  // keep NaN payloads and flush subnormals, so it is not used).
  static inline __m256i to_bf16(V a) {
    const __m512i b = _mm512_castps_si512(a);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
  static inline __m256i to_fp16(V a) { return _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline void store_out(float* p, V a) { _mm512_storeu_ps(p, a); }
  static inline void store_out(bf16_t* p, V a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(a)); }
  static inline void store_out(fp16_t* p, V a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_fp16(a)); }
  // Non-temporal stores need 32-byte alignment only (see stream_align): a float vector is written as
  // two 32-byte halves, so rows of an odd multiple of 8 floats (m = 1000) still stream.
  template <class Out>
  static constexpr int64_t stream_align() {
    return 32;
  }
  static inline void store_out_stream(float* p, V a) {
    _mm256_stream_ps(p, _mm512_castps512_ps256(a));
    _mm256_stream_ps(p + 8, _mm512_extractf32x8_ps(a, 1));
  }
  static inline void store_out_stream(bf16_t* p, V a) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16(a));
  }
  static inline void store_out_stream(fp16_t* p, V a) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_fp16(a));
  }
  static inline void stream_fence() { _mm_sfence(); }
  static inline void store_out_partial(float* p, V a, int64_t count) {
    _mm512_mask_storeu_ps(p, first_mask(count), a);
  }
  static inline void store_out_partial(bf16_t* p, V a, int64_t count) {
    _mm256_mask_storeu_epi16(p, first_mask(count), to_bf16(a));
  }
  static inline void store_out_partial(fp16_t* p, V a, int64_t count) {
    _mm256_mask_storeu_epi16(p, first_mask(count), to_fp16(a));
  }
  // p is aligned as for store_out_stream: the first 8 values (32 bytes of float, 16 of bf16/fp16) are
  // streamed when count >= 8, the rest stored with a mask.
  static inline void store_out_partial_stream(float* p, V a, int64_t count) {
    if (count >= 8) {
      _mm256_stream_ps(p, _mm512_castps512_ps256(a));
      if (count > 8) {
        _mm256_mask_storeu_ps(p + 8, static_cast<__mmask8>(first_mask(count - 8)), _mm512_extractf32x8_ps(a, 1));
      }
    } else {
      store_out_partial(p, a, count);
    }
  }
  static inline void store_out_partial_stream(bf16_t* p, V a, int64_t count) {
    stream_half_partial(reinterpret_cast<uint16_t*>(p), to_bf16(a), count);
  }
  static inline void store_out_partial_stream(fp16_t* p, V a, int64_t count) {
    stream_half_partial(reinterpret_cast<uint16_t*>(p), to_fp16(a), count);
  }
  static inline void stream_half_partial(uint16_t* p, __m256i h, int64_t count) {
    if (count >= 8) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(h));
      if (count > 8) {
        _mm_mask_storeu_epi16(p + 8, static_cast<__mmask8>(first_mask(count - 8)), _mm256_extracti128_si256(h, 1));
      }
    } else {
      _mm256_mask_storeu_epi16(p, first_mask(count), h);
    }
  }
};

using VF = VecAvx512;

}  // namespace rkd::cpu::avx512
#endif  // RKD_ISA_ENABLED

#include "distill_isa_end.h"
