// The sparse top-k teacher kernel (rkd::distill_topk on CPU, docs/wide_heads.md): interface between the
// binding (distill_topk.cpp) and the row kernels (distill_topk_kernel.cpp, compiled once portable and once
// for AVX2/FMA from the template in distill_topk_rows.h). Torch-free, like distill_kernel.h.
#pragma once

#include <cstdint>

#include "distill_kernel.h"

namespace rkd::cpu {

// Converts n values between the input dtype and the accumulation type (float): bfloat16 / float16 rows.
using ToAccFn = void (*)(const void* src, float* dst, int64_t n);
using FromAccFn = void (*)(const float* src, void* dst, int64_t n);

// One topk_forward call. Acc is float for float32/bfloat16/float16 inputs and double for float64.
struct TopkArgs {
  const void* student;    // (B, m) input dtype: f
  const int64_t* index;   // (B, k): the teacher's classes K_i
  const void* probs;      // (B, k) Acc: their probabilities p_ij
  const int64_t* labels;  // (B,) or nullptr
  const void* a;          // (B,) Acc
  const void* log_c;      // (round_up(m, kPad),) Acc, zero padded (zeros without costs)
  const void* w;          // (round_up(m, kPad),) Acc, zero padded (ones on [0, m) without weights)
  void* grad;             // (B, m) input dtype, or nullptr
  void* loss;             // (B,) Acc
  ToAccFn to_acc;         // bfloat16 / float16 inputs only
  FromAccFn from_acc;
  int64_t rows;
  int64_t m;
  int64_t k;
  double tau;
  double grad_scale;
  int64_t ignore_index;
  bool uniform;  // topk_tail="uniform": the rest 1 - sum_K p spread over the m - k other classes
  bool need_grad;
  bool half_input;  // the input dtype is bfloat16 / float16 (converted through to_acc / from_acc)
};

// Per-thread scratch and per-block accumulators (Acc, round_up(m, kPad) each; accumulators zero on entry).
struct TopkOut {
  void* scratch;  // kTopkScratch * round_up(m, kPad) Acc
  void* mass;
  void* risk;
  void* hit;
  int64_t bad_row;    // -1, or the first row whose label lies outside [0, m)
  int64_t bad_index;  // -1, or the first row with a top-k index outside [0, m)
};

// Scratch rows per thread: f, exp(u), exp(u / tau), the tail mask, the gradient (non-float inputs).
constexpr int64_t kTopkScratch = 5;

using TopkRowsFn = void (*)(const TopkArgs& args, int64_t begin, int64_t end, TopkOut& out);

// float / double row kernels, portable; always present.
TopkRowsFn topk_rows_generic(bool is_double);
// float row kernel for AVX2 + FMA, or nullptr where the compiler cannot target it (the caller checks the CPU).
TopkRowsFn topk_rows_avx2();

}  // namespace rkd::cpu
