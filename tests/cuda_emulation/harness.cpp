// C entry points over rkd_cuda (distill_kernels.cu, rewritten and compiled for the CPU emulation in
// emu_prelude.h) for ctypes, plus the few CUDA runtime calls the host code makes. "Device" pointers are
// host pointers. The multiprocessor count and occupancy are settable, to exercise the grid shapes.
#include <stdexcept>
#include <string>

#include RKD_KERNEL_SOURCE

namespace {
int g_multiprocessors = 2;
int g_blocks_per_multiprocessor = 1;
}  // namespace

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? g_multiprocessors : 0;
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int, size_t) {
  *blocks = g_blocks_per_multiprocessor;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }

void emu_configure(int multiprocessors, int blocks_per_multiprocessor) {
  g_multiprocessors = multiprocessors;
  g_blocks_per_multiprocessor = blocks_per_multiprocessor;
}

// The shape part of the arguments: contiguous (rows, classes) student and teacher.
static rkd_cuda::FusedArgs shape_args(int dtype, int64_t rows, int64_t classes, const void* student,
                                      const void* teacher) {
  rkd_cuda::FusedArgs args;
  args.dtype = static_cast<rkd_cuda::DType>(dtype);
  args.rows = rows;
  args.classes = classes;
  args.student = student;
  args.student_stride = classes;
  args.teacher = teacher;
  args.teacher_stride = classes;
  return args;
}

// 0 on success; else 1 with the exception's message in `message`.
int emu_fused_forward(int dtype, int64_t rows, int64_t classes, const void* student, const void* teacher,
                      int teacher_is_probs, const int64_t* labels, const float* a, const float* log_c,
                      const float* w, float gamma, float tau, float grad_scale, void* grad, float* loss,
                      float* mass, float* risk, float* error, char* message, int message_size,
                      int64_t ignore_index, const float* scale, float prob_tol) {
  try {
    rkd_cuda::FusedArgs args = shape_args(dtype, rows, classes, student, teacher);
    args.teacher_is_probs = teacher_is_probs != 0;
    args.labels = labels;
    args.a = a;
    args.log_c = log_c;
    args.w = w;
    args.gamma = gamma;
    args.tau = tau;
    args.grad_scale = grad_scale;
    args.ignore_index = ignore_index;
    args.scale = scale;
    args.prob_tol = prob_tol;
    args.grad = grad;
    args.grad_stride = classes;
    args.loss = loss;
    args.mass = mass;
    args.risk = risk;
    args.error = error;
    const size_t bytes = rkd_cuda::fused_forward_workspace_bytes(args);
    std::vector<float4> workspace((bytes + sizeof(float4) - 1) / sizeof(float4));
    std::memset(workspace.data(), 0x7f, workspace.size() * sizeof(float4));  // garbage, as on a GPU
    rkd_cuda::fused_forward(args, bytes ? workspace.data() : nullptr, bytes, nullptr);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(message, message_size, "%s", e.what());
    return 1;
  }
}

int emu_path(int dtype, int64_t rows, int64_t classes, const void* student, char* out, int out_size) {
  try {
    const rkd_cuda::FusedArgs args = shape_args(dtype, rows, classes, student, student);
    std::snprintf(out, out_size, "%s", rkd_cuda::fused_forward_path(args).c_str());
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(out, out_size, "%s", e.what());
    return 1;
  }
}

void emu_scale_rows(int dtype, void* grad, int64_t rows, int64_t cols, const float* go) {
  rkd_cuda::scale_rows(static_cast<rkd_cuda::DType>(dtype), grad, cols, go, rows, cols, nullptr);
}

}  // extern "C"
