// A CPU model of the CUDA execution model, just enough to run csrc/cuda/distill_kernels.cu on a machine
// without a GPU (tests/test_cuda_emulated.py). Force-included before the kernel source, which the test
// first rewrites: `kernel<<<grid, block, smem, stream>>>(args)` becomes
// `rkd_emu::launch(grid, block, smem, stream, kernel, args)`, `extern __shared__ T x[];` becomes a pointer
// to the block's dynamic shared memory, and empty `asm volatile` optimisation barriers are dropped.
//
// Model: every CUDA thread of a block is a fiber (ucontext) on the calling thread, switched only at
// barriers, so a run is deterministic; the blocks of a launch run one after another. __syncthreads and
// __syncwarp are barriers; warp shuffles exchange values through per-warp slots between two warp barriers
// (so all 32 lanes must take part, as with a full mask on the GPU). `__shared__` variables are function
// statics (one copy, used by the running block); dynamic shared memory is refilled with garbage for every
// block. __expf is exp2f(x * log2 e) with the product rounded to float, which is how the GPU evaluates it.
// Asynchronous copies (__pipeline_memcpy_async) take effect only when __pipeline_wait_prior retires their
// group, and read the source then: a missing wait or a source overwritten too early shows up as wrong data.
// Not modelled: the memory model (races that no barrier orders), register and shared-memory limits, timing.
#pragma once

#define __shared__ static
#define _CUDA_PIPELINE_PRIMITIVES_H_  // the emulation's __pipeline_* below replace the toolkit's
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <vector>

#define __launch_bounds__(...)

namespace rkd_emu {

struct Copy {
  void* dst;
  const void* src;
  size_t bytes;
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  dim3 index;
  int linear = 0;
  bool done = false;
  std::vector<Copy> open_group;           // asynchronous copies not yet committed
  std::deque<std::vector<Copy>> pending;  // committed groups, oldest first
};

// A barrier of `count` fibers: the last to arrive starts a new generation; the others yield until then.
struct Barrier {
  int count = 0;
  int arrived = 0;
  long generation = 0;
};

struct Block {
  dim3 grid, block, index;
  Barrier barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> slots;  // shuffle exchange, one per thread
  std::vector<char> dynamic_smem;
};

struct Scheduler {
  ucontext_t main;
  Fiber* current = nullptr;
  Block* block = nullptr;
  std::function<void()> body;
};

inline Scheduler scheduler;

inline Fiber& self() { return *scheduler.current; }
inline int warp() { return self().linear / 32; }

inline void yield() { swapcontext(&self().context, &scheduler.main); }

inline void wait(Barrier& b) {
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  const long generation = b.generation;
  while (b.generation == generation) yield();
}

inline void fiber_main() {
  scheduler.body();
  self().done = true;
  yield();
}

template <typename V>
V exchange(V value, int source_lane) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
  Block& b = *scheduler.block;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(V));
  b.slots[self().linear] = bits;
  wait(b.warp_barriers[warp()]);
  const uint64_t got = b.slots[warp() * 32 + (source_lane & 31)];
  wait(b.warp_barriers[warp()]);
  V out;
  std::memcpy(&out, &got, sizeof(V));
  return out;
}

template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, Kernel kernel, Args... args) {
  constexpr size_t kStackBytes = 256 * 1024;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads % 32 != 0 || threads > 1024) {
    std::fprintf(stderr, "rkd_emu: unsupported block of %d threads\n", threads);
    std::abort();
  }
  const long blocks = static_cast<long>(grid.x) * grid.y * grid.z;
  std::vector<Fiber> fibers(threads);
  for (auto& fiber : fibers) fiber.stack.resize(kStackBytes);
  Block b;
  b.grid = grid;
  b.block = block;
  scheduler.block = &b;
  scheduler.body = [&] { kernel(args...); };
  for (long i = 0; i < blocks; ++i) {
    b.index = dim3(i % grid.x, (i / grid.x) % grid.y, i / (static_cast<long>(grid.x) * grid.y));
    b.barrier = Barrier{threads, 0, 0};
    b.warp_barriers.assign(threads / 32, Barrier{32, 0, 0});
    b.slots.assign(threads, 0);
    b.dynamic_smem.assign(smem + 16, static_cast<char>(0x5a));  // garbage: kernels initialise what they use
    for (int t = 0; t < threads; ++t) {
      Fiber& fiber = fibers[t];
      fiber.linear = t;
      fiber.index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      fiber.done = false;
      fiber.open_group.clear();
      fiber.pending.clear();
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.data();
      fiber.context.uc_stack.ss_size = fiber.stack.size();
      fiber.context.uc_link = nullptr;
      makecontext(&fiber.context, fiber_main, 0);
    }
    for (int finished = 0; finished < threads;) {  // round robin until every thread has returned
      finished = 0;
      for (auto& fiber : fibers) {
        if (!fiber.done) {
          scheduler.current = &fiber;
          swapcontext(&scheduler.main, &fiber.context);
        }
        finished += fiber.done ? 1 : 0;
      }
    }
  }
  scheduler.current = nullptr;
  scheduler.block = nullptr;
}

}  // namespace rkd_emu

#define threadIdx (rkd_emu::self().index)
#define blockIdx (rkd_emu::scheduler.block->index)
#define blockDim (rkd_emu::scheduler.block->block)
#define gridDim (rkd_emu::scheduler.block->grid)

inline void __syncthreads() { rkd_emu::wait(rkd_emu::scheduler.block->barrier); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  rkd_emu::wait(rkd_emu::scheduler.block->warp_barriers[rkd_emu::warp()]);
}
template <typename V>
V __shfl_xor_sync(unsigned, V value, int lane_mask) {
  return rkd_emu::exchange(value, (rkd_emu::self().linear % 32) ^ lane_mask);
}
template <typename V>
V __shfl_sync(unsigned, V value, int source_lane) {
  return rkd_emu::exchange(value, source_lane);
}
inline float __expf(float x) { return std::exp2(static_cast<float>(x * 1.4426950408889634f)); }
template <typename V>
V __ldg(const V* p) {
  return *p;
}
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes, size_t = 0) {
  rkd_emu::self().open_group.push_back({dst, src, bytes});
}
inline void __pipeline_commit() {
  rkd_emu::Fiber& f = rkd_emu::self();
  f.pending.push_back(std::move(f.open_group));
  f.open_group.clear();
}
inline void __pipeline_wait_prior(size_t prior) {
  rkd_emu::Fiber& f = rkd_emu::self();
  while (f.pending.size() > prior) {
    for (const rkd_emu::Copy& c : f.pending.front()) std::memcpy(c.dst, c.src, c.bytes);
    f.pending.pop_front();
  }
}
using std::isfinite;
