// The per-instruction-set scaffold of the row kernels, first half (distill_isa_end.h is the second).
// A kernel file (distill_kernel_generic.cpp, distill_kernel_avx2.cpp, distill_kernel_avx512.cpp) defines
//   RKD_ISA         the namespace and table name: rkd::cpu::RKD_ISA, RKD_ISA_kernels() (distill_kernel.h)
//   RKD_ISA_TARGET  (vector files only) the GCC/clang target string, e.g. "avx2,fma,f16c"
// includes this file, then, inside `#if RKD_ISA_ENABLED`, its vector-traits classes VF (float) and, for
// RKD_ISA_HAS_F64, VD (double), and finally includes distill_isa_end.h.
//
// With RKD_ISA_TARGET, everything from here to distill_isa_end.h is compiled for that target with a
// pragma, so the package itself needs no -mavx2/-mavx512f (which would let the compiler use those
// instructions anywhere) and still runs on any x86-64: distill_cpu.cpp calls these kernels only when
// the running CPU reports the features. No torch header is included after the pragma, and everything
// compiled for the target lives in rkd::cpu::RKD_ISA, so no inline function shared with other translation
// units is ever emitted with its instructions. Without a target (the portable kernels) nothing changes.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "distill_isa_target.h"
#include "distill_kernel.h"

#if !defined(RKD_ISA_TARGET)
#define RKD_ISA_ENABLED 1
#elif RKD_TARGET_PRAGMAS
#define RKD_ISA_ENABLED 1
RKD_TARGET_PUSH(RKD_ISA_TARGET)
#if !defined(__clang__)
// GCC builds _mm*_mul_ps and _mm*_add_ps from generic vector arithmetic, which -ffp-contract=fast (its
// default) may fuse into FMAs differently in each instantiation of the row kernel: off, so that the
// variants of one call (need_grad or not, streamed or not) round identically and every FMA is written.
#pragma GCC optimize("fp-contract=off")
#endif
#include <immintrin.h>
#else
#define RKD_ISA_ENABLED 0  // a vector target this compiler or machine cannot build: no kernels
#endif
