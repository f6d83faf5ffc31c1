// Portable row kernels: plain C++ lane loops that the compiler may vectorise for the baseline target
// (SSE2 on x86-64, NEON on AArch64). They serve every dtype and are the reference for the AVX2 path:
// the float exponential below is the same algorithm, operation for operation.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#define RKD_ISA generic
#define RKD_ISA_HAS_F64 1
#include "distill_isa_begin.h"

#if RKD_ISA_ENABLED
namespace rkd::cpu::generic {

// 2^y for float (see kExp2Magic in distill_kernel.h): y < kExp2Lo gives exactly 0 (-inf too), NaN stays
// NaN. Requires y <= 127: every argument in this kernel is <= 0 up to rounding (a value minus its row
// maximum, times a positive scale).
inline float exp2_core_lane(float y) {
  const float t = y + kExp2Magic;
  const float n = t - kExp2Magic;
  const float r = y - n;
  float p = kExp2C5 * r + kExp2C4;
  p = p * r + kExp2C3;
  p = p * r + kExp2C2;
  p = p * r + kExp2C1;
  p = p * r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits <<= 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline float exp2_lane(float y) { return y < kExp2Lo ? 0.0f : exp2_core_lane(y); }

// exp2 for y raised to kExp2Clamp first (-inf and underflow give 2^-125 ~ 2.4e-38; NaN stays NaN).
inline float exp2_clamped_lane(float y) { return exp2_core_lane(y < kExp2Clamp ? kExp2Clamp : y); }

inline double exp2_lane(double y) { return std::exp2(y); }
inline double exp2_clamped_lane(double y) { return std::exp2(y); }

template <class T_, int N>
struct VecGeneric {
  using T = T_;
  static constexpr int W = N;
  struct V {
    T v[N];
  };

  static inline V load(const T* p) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = p[l];
    return r;
  }
  static inline void store(T* p, const V& a) {
    for (int l = 0; l < N; ++l) p[l] = a.v[l];
  }
  static inline V set1(T x) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = x;
    return r;
  }
  static inline V zero() { return set1(T(0)); }
  static inline V add(const V& a, const V& b) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = a.v[l] + b.v[l];
    return r;
  }
  static inline V sub(const V& a, const V& b) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = a.v[l] - b.v[l];
    return r;
  }
  static inline V mul(const V& a, const V& b) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = a.v[l] * b.v[l];
    return r;
  }
  static inline V fmadd(const V& a, const V& b, const V& c) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = a.v[l] * b.v[l] + c.v[l];
    return r;
  }
  static inline V fnmadd(const V& a, const V& b, const V& c) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = c.v[l] - a.v[l] * b.v[l];
    return r;
  }
  static inline V max(const V& a, const V& b) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = b.v[l] > a.v[l] ? b.v[l] : a.v[l];
    return r;
  }
  static inline V gt_select(const V& a, const V& b, const V& x, const V& y) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = a.v[l] > b.v[l] ? x.v[l] : y.v[l];
    return r;
  }
  static inline V fma_if_pos(const V& c, const V& x, const V& acc) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = acc.v[l] + (c.v[l] > T(0) ? c.v[l] * x.v[l] : T(0));
    return r;
  }
  static inline V mul_if_nonzero(const V& c, const V& x) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = c.v[l] != T(0) ? c.v[l] * x.v[l] : T(0);
    return r;
  }
  static inline V exp2(const V& a) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = exp2_lane(a.v[l]);
    return r;
  }
  static inline V exp2_clamped(const V& a) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = exp2_clamped_lane(a.v[l]);
    return r;
  }
  static inline T hsum(const V& a) {
    T s = 0;
    for (int l = 0; l < N; ++l) s += a.v[l];
    return s;
  }
  static inline T hmax(const V& a) {
    T s = a.v[0];
    for (int l = 1; l < N; ++l) s = a.v[l] > s ? a.v[l] : s;
    return s;
  }
  static inline V one_lane(int64_t k, T v) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = l == k ? v : T(0);
    return r;
  }
  static inline V first_lanes(const V& x, int64_t k, T v) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = l < k ? x.v[l] : v;
    return r;
  }
  static inline int64_t first_eq(const T* p, int64_t n, T v) {
    for (int64_t k = 0; k < n; ++k) {
      if (p[k] == v) return k;
    }
    return 0;
  }

  static inline T to_t(float x) { return static_cast<T>(x); }
  static inline T to_t(double x) { return static_cast<T>(x); }
  static inline T to_t(bf16_t x) {
    return static_cast<T>(c10::BFloat16(x.bits, c10::BFloat16::from_bits()));
  }
  static inline T to_t(fp16_t x) { return static_cast<T>(c10::detail::fp16_ieee_to_fp32_value(x.bits)); }
  static inline void from_t(T x, float* p) { *p = static_cast<float>(x); }
  static inline void from_t(T x, double* p) { *p = static_cast<double>(x); }
  static inline void from_t(T x, bf16_t* p) { p->bits = c10::detail::round_to_nearest_even(static_cast<float>(x)); }
  static inline void from_t(T x, fp16_t* p) { p->bits = c10::detail::fp16_ieee_from_fp32_value(static_cast<float>(x)); }

  template <class In>
  static inline V load_in(const In* p) {
    V r;
    for (int l = 0; l < N; ++l) r.v[l] = to_t(p[l]);
    return r;
  }
  template <class Out>
  static inline void store_out(Out* p, const V& a) {
    for (int l = 0; l < N; ++l) from_t(a.v[l], p + l);
  }
  template <class Out>
  static constexpr int64_t stream_align() {
    return N * static_cast<int64_t>(sizeof(Out));
  }
  template <class Out>
  static inline void store_out_stream(Out* p, const V& a) {
    store_out(p, a);
  }
  static inline void stream_fence() {}
  template <class Out>
  static inline void store_out_partial(Out* p, const V& a, int64_t count) {
    for (int64_t l = 0; l < count; ++l) from_t(a.v[l], p + l);
  }
  template <class In>
  static inline V load_in_partial(const In* p, int64_t count, T pad) {
    In tmp[N];
    std::memset(tmp, 0, sizeof(tmp));
    std::memcpy(tmp, p, static_cast<size_t>(count) * sizeof(In));
    return first_lanes(load_in(tmp), count, pad);
  }
  template <class Out>
  static inline void store_out_partial_stream(Out* p, const V& a, int64_t count) {
    store_out_partial(p, a, count);
  }
};

using VF = VecGeneric<float, 8>;
using VD = VecGeneric<double, 4>;

}  // namespace rkd::cpu::generic
#endif  // RKD_ISA_ENABLED

#include "distill_isa_end.h"
