// AVX2 + FMA + F16C row kernels (float32, bfloat16, float16 inputs; float32 arithmetic), compiled for
// that target by the scaffold of distill_isa_begin.h and called only where the running CPU has it.
#define RKD_ISA avx2
#define RKD_ISA_TARGET "avx2,fma,f16c"
#define RKD_ISA_HAS_F64 0
#include "distill_isa_begin.h"

#if RKD_ISA_ENABLED
namespace rkd::cpu::avx2 {

struct VecAvx2 {
  using T = float;
  using V = __m256;
  static constexpr int W = 8;

  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, V a) { _mm256_storeu_ps(p, a); }
  static inline V set1(float x) { return _mm256_set1_ps(x); }
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  static inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static inline V max(V a, V b) { return _mm256_max_ps(a, b); }
  static inline V gt_select(V a, V b, V x, V y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
  static inline V fma_if_pos(V c, V x, V acc) {
    const V keep = _mm256_cmp_ps(c, _mm256_setzero_ps(), _CMP_GT_OQ);
    return _mm256_fmadd_ps(c, _mm256_and_ps(keep, x), acc);
  }

  // Same algorithm and constants as generic::exp2_lane (see distill_kernel.h); NaN propagates through
  // the arithmetic. exp2: the final mask zeroes y < kExp2Lo, including -inf. exp2_clamped: y is first
  // raised to kExp2Clamp (so -inf and underflow give 2^-125; a NaN stays NaN: max returns its second
  // operand when one is NaN), one instruction instead of two.
  static inline V exp2_core(V y) {
    const V magic = _mm256_set1_ps(kExp2Magic);
    const V t = _mm256_add_ps(y, magic);
    const V r = _mm256_sub_ps(y, _mm256_sub_ps(t, magic));
    V p = _mm256_fmadd_ps(_mm256_set1_ps(kExp2C5), r, _mm256_set1_ps(kExp2C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExp2C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExp2C2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExp2C1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const V scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
    return _mm256_mul_ps(p, scale);
  }
  static inline V exp2(V y) {
    const V under = _mm256_cmp_ps(y, _mm256_set1_ps(kExp2Lo), _CMP_LT_OQ);
    return _mm256_andnot_ps(under, exp2_core(y));
  }
  static inline V exp2_clamped(V y) { return exp2_core(_mm256_max_ps(_mm256_set1_ps(kExp2Clamp), y)); }
  // c != 0 ? c*x : 0, NaN c giving NaN (x zeroed where c == 0, so an infinite x there gives 0, not NaN).
  static inline V mul_if_nonzero(V c, V x) {
    return _mm256_mul_ps(c, _mm256_and_ps(_mm256_cmp_ps(c, _mm256_setzero_ps(), _CMP_NEQ_UQ), x));
  }

  static inline float hsum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline float hmax(V a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // Lanes < k (0 <= k) set, as a 32-bit mask per lane.
  static inline __m256i first_mask(int64_t k) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k < W ? k : W)), lane);
  }
  static inline V first_lanes(V x, int64_t k, float v) {
    return _mm256_blendv_ps(_mm256_set1_ps(v), x, _mm256_castsi256_ps(first_mask(k)));
  }
  // v in lane k (0 <= k < W), 0 elsewhere: no store to memory (a vector loaded right after scalar stores
  // waits for them to reach the cache).
  static inline V one_lane(int64_t k, float v) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 at = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_set1_epi32(static_cast<int>(k)), lane));
    return _mm256_and_ps(at, _mm256_set1_ps(v));
  }
  static inline int64_t first_eq(const float* p, int64_t n, float v) {
    const V vv = _mm256_set1_ps(v);
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const int bits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j), vv, _CMP_EQ_OQ));
      if (bits != 0) return j + __builtin_ctz(static_cast<unsigned>(bits));
    }
    for (; j < n; ++j) {
      if (p[j] == v) return j;
    }
    return 0;
  }

  static inline V load_in(const float* p) { return _mm256_loadu_ps(p); }
  static inline V load_in(const bf16_t* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  static inline V load_in(const fp16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline void store_out(float* p, V a) { _mm256_storeu_ps(p, a); }
  // Round to nearest even, NaN -> 0x7FC0 (what c10::BFloat16 does).
  static inline __m128i to_bf16(V a) {
    const __m256i b = _mm256_castps_si256(a);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
  static inline __m128i to_fp16(V a) { return _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline void store_out(bf16_t* p, V a) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(a)); }
  static inline void store_out(fp16_t* p, V a) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_fp16(a)); }
  template <class Out>
  static constexpr int64_t stream_align() {
    return W * static_cast<int64_t>(sizeof(Out));
  }
  static inline void store_out_stream(float* p, V a) { _mm256_stream_ps(p, a); }
  static inline void store_out_stream(bf16_t* p, V a) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16(a)); }
  static inline void store_out_stream(fp16_t* p, V a) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_fp16(a)); }
  static inline void stream_fence() { _mm_sfence(); }
  // float rows: a masked load and piecewise stores (no lane outside [0, count) is touched, none faults).
  // count < W floats: 4, 2 and 1 at a time (a masked 256-bit store is microcoded and slow on some AMD cores).
  static inline void store_out_partial(float* p, V a, int64_t count) {
    __m128 part = _mm256_castps256_ps128(a);
    if (count >= 4) {
      _mm_storeu_ps(p, part);
      part = _mm256_extractf128_ps(a, 1);
      p += 4;
      count -= 4;
    }
    if (count >= 2) {
      _mm_storel_pi(reinterpret_cast<__m64*>(p), part);
      part = _mm_movehl_ps(part, part);
      p += 2;
      count -= 2;
    }
    if (count >= 1) _mm_store_ss(p, part);
  }
  static inline V load_in_partial(const float* p, int64_t count, float pad) {
    const __m256i k = first_mask(count);
    return _mm256_blendv_ps(_mm256_set1_ps(pad), _mm256_maskload_ps(p, k), _mm256_castsi256_ps(k));
  }
  template <class Out>
  static inline void store_out_partial(Out* p, V a, int64_t count) {
    Out tmp[W];
    store_out(tmp, a);
    std::memcpy(p, tmp, static_cast<size_t>(count) * sizeof(Out));
  }
  template <class In>
  static inline V load_in_partial(const In* p, int64_t count, float pad) {
    In tmp[W];
    std::memset(tmp, 0, sizeof(tmp));
    std::memcpy(tmp, p, static_cast<size_t>(count) * sizeof(In));
    return first_lanes(load_in(tmp), count, pad);
  }
  // count < W values at p, aligned as for store_out_stream: the first 4 values (16 bytes of float, 8 of
  // bf16/fp16) are streamed when count >= 4, the rest stored plainly, as in the AVX-512 kernel.
  static inline void store_out_partial_stream(float* p, V a, int64_t count) {
    if (count >= 4) {
      _mm_stream_ps(p, _mm256_castps256_ps128(a));
      if (count > 4) store_out_partial(p + 4, _mm256_permute2f128_ps(a, a, 0x01), count - 4);
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
  static inline void stream_half_partial(uint16_t* p, __m128i h, int64_t count) {
    uint16_t tmp[W];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp), h);
    int64_t k = 0;
    if (count >= 4) {
      _mm_stream_si64(reinterpret_cast<long long*>(p), _mm_cvtsi128_si64(h));
      k = 4;
    }
    std::memcpy(p + k, tmp + k, static_cast<size_t>(count - k) * sizeof(uint16_t));
  }
};

using VF = VecAvx2;

}  // namespace rkd::cpu::avx2
#endif  // RKD_ISA_ENABLED

#include "distill_isa_end.h"
