// The target pragma of the vector kernel files, shared by distill_isa_begin.h and distill_topk_kernel.cpp:
// code between RKD_TARGET_PUSH("avx2,fma") and RKD_TARGET_POP() is compiled for that target, so the package
// needs no -mavx2 (which would let the compiler use AVX2 anywhere) and still runs on any x86-64.
// RKD_TARGET_PRAGMAS is 1 where this compiler and machine support them (GCC or clang on x86-64), else 0.
#pragma once

#define RKD_PRAGMA_(x) _Pragma(#x)
#define RKD_PRAGMA(x) RKD_PRAGMA_(x)

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define RKD_TARGET_PRAGMAS 1
#if defined(__clang__)
#define RKD_TARGET_PUSH(isa) RKD_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define RKD_TARGET_POP() _Pragma("clang attribute pop")
#else
#define RKD_TARGET_PUSH(isa) _Pragma("GCC push_options") RKD_PRAGMA(GCC target(isa))
#define RKD_TARGET_POP() _Pragma("GCC pop_options")
#endif
#else
#define RKD_TARGET_PRAGMAS 0
#endif
