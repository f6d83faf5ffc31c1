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

// Inputs and outputs of one fused forward. Row strides count elements; pointers are device pointers.
struct FusedArgs {
  DType dtype = DType::kFloat32;
  int64_t rows = 0;     // B >= 0
  int64_t classes = 0;  // m, 1 <= m <= kMaxClasses

  const void* student = nullptr;  // f: (B, m), row stride student_stride
  int64_t student_stride = 0;
  const void* teacher = nullptr;  // g: (B, m) or nullptr (no teacher: a must be 0)
  int64_t teacher_stride = 0;
  bool teacher_is_probs = false;  // g holds p itself (gamma unused)
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

  void* grad = nullptr;  // (B, m) output in the student dtype, or nullptr (no gradient). May equal student.
  int64_t grad_stride = 0;
  float* loss = nullptr;   // (B,) output
  float* mass = nullptr;   // (m,) output
  float* risk = nullptr;   // (m,) output
  float* error = nullptr;  // (m,) output
};

// Bytes of device workspace fused_forward needs for these arguments on the current device (may be 0).
// Throws std::invalid_argument for sizes the kernels do not take (m < 1, m > kMaxClasses, B too large).
size_t fused_forward_workspace_bytes(const FusedArgs& args);

// Loss per row, grad = grad_scale * dloss/df (written once, in the student dtype) and the per-class
// statistics mass, risk, error, all enqueued on `stream` (no host synchronisation). `workspace` must hold
// fused_forward_workspace_bytes(args) bytes, 16-byte aligned, on the current device.
void fused_forward(const FusedArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// In place grad[i, :] *= go[i] for the rows where go[i] != 1 (rows with go[i] == 1 are neither read nor
// written; the test runs on the device). grad: (rows, cols) in `dtype`, row stride `stride`; go: (rows,).
void scale_rows(DType dtype, void* grad, int64_t stride, const float* go, int64_t rows, int64_t cols,
                cudaStream_t stream);

// Which code path and launch shape fused_forward takes for `args` on the current device, in words
// (for benchmarks and bug reports).
std::string fused_forward_path(const FusedArgs& args);

}  // namespace rkd_cuda
