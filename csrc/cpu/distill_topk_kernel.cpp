// The top-k row kernels (distill_topk_rows.h), compiled twice: portable (the baseline target: SSE2 on
// x86-64), and for AVX2 + FMA with a target pragma, as distill_kernel_avx2.cpp does, so the package needs
// no -mavx2 and the binding calls the AVX2 kernel only when the running CPU has it. Torch-free.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "distill_isa_target.h"
#include "distill_topk.h"

// The generic kernel passes 32-byte vectors between inline functions only: no ABI is crossed.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace rkd::cpu::topk_generic {
#include "distill_topk_rows.h"
}  // namespace rkd::cpu::topk_generic

#if RKD_TARGET_PRAGMAS
#define RKD_HAVE_AVX2_TOPK 1
RKD_TARGET_PUSH("avx2,fma")
namespace rkd::cpu::topk_avx2 {
#include "distill_topk_rows.h"
}  // namespace rkd::cpu::topk_avx2
RKD_TARGET_POP()
#endif

namespace rkd::cpu {

TopkRowsFn topk_rows_generic(bool is_double) {
  return is_double ? &topk_generic::topk_rows<double> : &topk_generic::topk_rows<float>;
}

TopkRowsFn topk_rows_avx2() {
#ifdef RKD_HAVE_AVX2_TOPK
  return &topk_avx2::topk_rows<float>;
#else
  return nullptr;
#endif
}

}  // namespace rkd::cpu
