// Host interface of the rkd CUDA kernels (distill_kernels.cu). Plain C++ and the CUDA runtime only: no
// torch, so the kernels compile with nvcc alone (CI checks that on a machine without a GPU).
//
// Symbols follow docs/README.md: B rows, m classes, student scores f (B x m), teacher g (B x m), labels y,
// teacher weight a (B,), class costs c (m,) given as log c, class weights w (m,). See the .cu file.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace rkd_cuda {

// Widest row the kernels accept (m). Wider rows raise std::invalid_argument.
inline constexpr int64_t kMaxClasses = 262144;

// Element type of the student, the teacher and the gradient. Everything else is float32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Inputs and outputs of one fused forward. Pointers are device pointers; the (B, m) arrays are contiguous
// (row stride m), the only layout any caller has: rkd_engine's backend makes them so before the call.
struct FusedArgs {
  DType dtype = DType::kFloat32;
  int64_t rows = 0;     // B >= 0
  int64_t classes = 0;  // m, 1 <= m <= kMaxClasses
  int device = -1;      // the current CUDA device, where the pointers live; -1: ask the runtime (cudaGetDevice)

  const void* student = nullptr;    // f: (B, m)
  const void* teacher = nullptr;    // g: (B, m) or nullptr (no teacher: a must be 0)
  bool teacher_is_probs = false;    // g holds p itself (gamma unused)
  const int64_t* labels = nullptr;  // y: (B,) in [0, m), or nullptr (no labels: a must be 1)
  const float* a = nullptr;         // (B,) weight of the teacher in q = (1 - a) e_y + a p
  const float* log_c = nullptr;     // (m,) or nullptr (c = 1)
  const float* w = nullptr;         // (m,) or nullptr (w = 1)
  float gamma = 1.0f;               // teacher temperature, > 0
  float tau = 1.0f;                 // student temperature, > 0
  float grad_scale = 1.0f;
  const float* scale = nullptr;  // () device scalar multiplying the gradient too, or nullptr
  int64_t ignore_index = -100;   // rows whose label equals it contribute nothing (loss 0, zero gradient row)
  // Teacher probabilities: a row with a negative entry or a sum off 1 by more than this gets a NaN loss (as
  // does a teacher-logit row with a NaN or +inf, or -inf everywhere), whatever its a: the call's status.
  float prob_tol = 0.0f;

  void* grad = nullptr;    // (B, m) output in the student dtype, or nullptr (no gradient). May equal student.
  float* loss = nullptr;   // (B,) output
  float* mass = nullptr;   // (m,) output
  float* risk = nullptr;   // (m,) output
  float* error = nullptr;  // (m,) output
};

// How fused_forward runs a call: the code path, block sizes, grids and workspace layout (all chosen in one
// function of the .cu, make_plan). It depends on the device (its multiprocessors and the kernels' occupancy
// there), the dtype, B, m and whether the rows are 16-byte aligned, and on nothing else.
struct LaunchPlan {
  int device = 0;
  DType dtype = DType::kFloat32;
  int64_t rows = 0, classes = 0;
  bool resident = true;  // the resident path (m <= 4,096), else the streaming one
  int vec = 1;           // elements per vector: 16 bytes, or 1 when rows are not 16-byte aligned
  // resident
  int vectors = 1;  // V, vectors per thread and row
  int threads = 0;  // per block
  int team = 0;     // threads per row: a warp, or the block
  size_t smem = 0;  // dynamic shared memory per block
  // streaming
  int64_t splits = 1;      // pass 1: column ranges per row
  int64_t split_cols = 0;  // columns per range
  int64_t tiles = 0;       // pass 2: column tiles
  // both
  int64_t grid = 0;   // resident blocks, or streaming row groups
  int64_t parts = 0;  // partial statistics rows the column sum adds
  size_t stats_bytes = 0, states_offset = 0, scalars_offset = 0;
  size_t workspace_bytes = 0;  // device workspace fused_forward needs (may be 0)
};

// The launch plan of `args` on its device. Computed once per (device, dtype, B, m, alignment) and cached
// (thread-safe): the device's properties and the kernels' occupancy are queried from the runtime on the
// first call that needs them only, so a training loop's calls compute and query nothing.
// Throws std::invalid_argument for sizes the kernels do not take (m < 1, m > kMaxClasses, B too large).
LaunchPlan plan_fused_forward(const FusedArgs& args);

// Forgets every cached plan and device property (tests that fake a device; after a device reset).
void clear_launch_cache();

// Loss per row, grad = grad_scale * dloss/df (written once, in the student dtype) and the per-class
// statistics mass, risk, error, all enqueued on `stream` (no host synchronisation). `plan` is
// plan_fused_forward(args); `workspace` must hold plan.workspace_bytes bytes, 16-byte aligned, on the
// current device.
void fused_forward(const FusedArgs& args, const LaunchPlan& plan, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream);

// In place grad[i, :] *= go[i] for the rows where go[i] != 1 (rows with go[i] == 1 are neither read nor
// written; the test runs on the device). grad: contiguous (rows, cols) in `dtype`; go: (rows,).
void scale_rows(DType dtype, void* grad, const float* go, int64_t rows, int64_t cols, cudaStream_t stream);

// Which code path and launch shape fused_forward takes for `args` on the current device, in words
// (for benchmarks and bug reports).
std::string fused_forward_path(const FusedArgs& args);

}  // namespace rkd_cuda
