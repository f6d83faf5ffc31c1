// Helpers shared by the CPU bindings of the dense (distill_cpu.cpp) and top-k (distill_topk.cpp) fused
// losses: the checks of 1-D tensor arguments, the thread and block counts of one call, the padded copies
// of log c and w, and the in-order merge of the per-block accumulators. Not for the per-ISA kernel files
// (no torch header goes there).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

namespace rkd::cpu {

// `t` must be a contiguous CPU `dtype` tensor of shape (len,); `where` names the entry point in the error.
inline void check_vector(const at::Tensor& t, const char* where, const char* name, int64_t len,
                         at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), where, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, where, ": ", name, " must have shape (", len, ",), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, where, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), where, ": ", name, " must be contiguous");
}

// Less work than this many logits is done by the calling thread alone: waking another costs more.
// A row of the fused kernel costs about as much as kRowWork logits besides its own.
constexpr int64_t kMinParallelWork = 65536;
constexpr int64_t kRowWork = 128;

// Threads for `rows` rows of `m` classes: at most ATen's, one a row, one per kMinParallelWork of work.
inline int64_t num_threads(int64_t rows, int64_t m) {
  return std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), rows,
                                                 rows * (m + kRowWork) / kMinParallelWork}));
}

// Blocks of rows, each with its own per-class accumulators: enough blocks for the threads to balance
// their load (threads claim blocks as they finish, which matters on a shared machine), few enough
// that the accumulators stay small. Results do not depend on which thread ran a block.
inline int64_t num_blocks(int64_t rows, int64_t m_pad, int64_t threads, int64_t elem) {
  constexpr int64_t kBlocksPerThread = 4;
  constexpr int64_t kMinRowsPerBlock = 16;
  constexpr int64_t kAccumulatorBytes = int64_t(8) << 20;
  const int64_t by_memory = std::max<int64_t>(1, kAccumulatorBytes / (3 * m_pad * elem));
  const int64_t by_rows = std::max<int64_t>(1, rows / kMinRowsPerBlock);
  const int64_t wanted = std::max<int64_t>(threads, std::min(kBlocksPerThread * threads, by_memory));
  return std::max<int64_t>(1, std::min(wanted, by_rows));
}

// dst[0:m] = v (or `fill` where v is absent), dst[m:m_pad] = 0.
template <class T>
void copy_padded(T* dst, const std::optional<at::Tensor>& v, int64_t m, int64_t m_pad, T fill) {
  if (v.has_value()) {
    std::memcpy(dst, v->data_ptr(), static_cast<size_t>(m) * sizeof(T));
  } else {
    std::fill(dst, dst + m, fill);
  }
  std::fill(dst + m, dst + m_pad, T(0));
}

// mass = sum_b mass_b, risk = sum_b risk_b, error = mass - sum_b hit_b, summing blocks in order.
template <class T>
void merge_blocks(const T* stats, int64_t blocks, int64_t m, int64_t m_pad, T* mass, T* risk, T* error) {
  at::parallel_for(0, m, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      T ms = 0, rs = 0, hs = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        const T* st = stats + b * 3 * m_pad;
        ms += st[j];
        rs += st[m_pad + j];
        hs += st[2 * m_pad + j];
      }
      mass[j] = ms;
      risk[j] = rs;
      error[j] = ms - hs;
    }
  });
}

}  // namespace rkd::cpu
