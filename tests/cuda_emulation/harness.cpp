// C entry points over rkd_cuda (distill_kernels.cu, rewritten and compiled for the CPU emulation in
// emu_prelude.h) for ctypes, plus the few CUDA runtime calls the host code makes. "Device" pointers are
// host pointers. The multiprocessor count and occupancy are settable, to exercise the grid shapes, and the
// runtime queries the host code makes are counted (the launch plans are computed and cached once per shape).
#include <stdexcept>
#include <string>

#include RKD_KERNEL_SOURCE

namespace {
int g_multiprocessors = 2;
int g_blocks_per_multiprocessor = 1;
long g_queries = 0;  // device attribute, occupancy and function attribute queries
}  // namespace

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  ++g_queries;
  *value = attr == cudaDevAttrMultiProcessorCount ? g_multiprocessors : 0;
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int, size_t) {
  ++g_queries;
  *blocks = g_blocks_per_multiprocessor;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) {
  ++g_queries;
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }

// Another (fake) device: the cached plans and properties of the previous one are forgotten.
void emu_configure(int multiprocessors, int blocks_per_multiprocessor) {
  g_multiprocessors = multiprocessors;
  g_blocks_per_multiprocessor = blocks_per_multiprocessor;
  rkd_cuda::clear_launch_cache();
}

long emu_queries() { return g_queries; }

// The pure plan function with a fake device (`sms` multiprocessors, `blocks` of any kernel per multiprocessor):
// out = {resident, vec, vectors, threads, team, smem, splits, split_cols, tiles, grid, parts, workspace_bytes}.
int emu_make_plan(int dtype, int64_t rows, int64_t classes, int rows_aligned, int sms, int blocks, int64_t* out,
                  char* message, int message_size) {
  try {
    long calls = 0;
    const rkd_cuda::LaunchPlan plan =
        rkd_cuda::make_plan(static_cast<rkd_cuda::DType>(dtype), rows, classes, rows_aligned != 0, sms,
                            [&](const void*, int, size_t, bool) {
                              ++calls;
                              return blocks;
                            });
    const int64_t fields[] = {plan.resident,        plan.vec,   plan.vectors, plan.threads,
                              static_cast<int64_t>(plan.team), static_cast<int64_t>(plan.smem), plan.splits,
                              plan.split_cols,      plan.tiles, plan.grid,    plan.parts,
                              static_cast<int64_t>(plan.workspace_bytes)};
    std::memcpy(out, fields, sizeof(fields));
    return calls > 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::snprintf(message, message_size, "%s", e.what());
    return 2;
  }
}

// The shape part of the arguments: contiguous (rows, classes) student and teacher.
static rkd_cuda::FusedArgs shape_args(int dtype, int64_t rows, int64_t classes, const void* student,
                                      const void* teacher) {
  rkd_cuda::FusedArgs args;
  args.dtype = static_cast<rkd_cuda::DType>(dtype);
  args.rows = rows;
  args.classes = classes;
  args.student = student;
  args.teacher = teacher;
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
    args.loss = loss;
    args.mass = mass;
    args.risk = risk;
    args.error = error;
    const rkd_cuda::LaunchPlan plan = rkd_cuda::plan_fused_forward(args);
    const size_t bytes = plan.workspace_bytes;
    std::vector<float4> workspace((bytes + sizeof(float4) - 1) / sizeof(float4));
    std::memset(workspace.data(), 0x7f, workspace.size() * sizeof(float4));  // garbage, as on a GPU
    rkd_cuda::fused_forward(args, plan, bytes ? workspace.data() : nullptr, bytes, nullptr);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(message, message_size, "%s", e.what());
    return 1;
  }
}

// fused_forward of a labels-only call with the plan of another call (`plan_rows` rows, the student at
// `plan_student`): 0 if it ran, else 1 with the refusal in `message`.
int emu_foreign_plan(int dtype, int64_t rows, int64_t classes, const void* student, const int64_t* labels,
                     const float* a, float* loss, float* mass, float* risk, float* error, int64_t plan_rows,
                     const void* plan_student, char* message, int message_size) {
  try {
    rkd_cuda::FusedArgs args = shape_args(dtype, rows, classes, student, nullptr);
    args.labels = labels;
    args.a = a;
    args.loss = loss;
    args.mass = mass;
    args.risk = risk;
    args.error = error;
    rkd_cuda::FusedArgs other = args;
    other.rows = plan_rows;
    other.student = plan_student;
    const rkd_cuda::LaunchPlan plan = rkd_cuda::plan_fused_forward(other);
    std::vector<float4> workspace((plan.workspace_bytes + sizeof(float4) - 1) / sizeof(float4) + 1);
    rkd_cuda::fused_forward(args, plan, workspace.data(), workspace.size() * sizeof(float4), nullptr);
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
  rkd_cuda::scale_rows(static_cast<rkd_cuda::DType>(dtype), grad, go, rows, cols, nullptr);
}

}  // extern "C"
