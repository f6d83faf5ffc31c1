// Torch glue of the rkd CUDA kernels: argument checks, output and workspace allocation, the current CUDA
// stream, and the Python binding `rkd_engine._C_cuda` (fused_forward, scale_rows_).
// The kernels themselves (distill_kernels.cu) know nothing of torch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

#include "distill_kernels.h"

namespace {

using at::Tensor;

// The stream kernels are enqueued on: the current CUDA stream of the tensors' device (the same stream
// as at::cuda::getCurrentCUDAStream(), which ATen/cuda/CUDAContext.h re-exports).
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

rkd_cuda::DType kernel_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return rkd_cuda::DType::kFloat32;
    case at::kHalf:
      return rkd_cuda::DType::kFloat16;
    case at::kBFloat16:
      return rkd_cuda::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16 for the CUDA backend, got ",
                       t.scalar_type());
  }
}

void check_on(const Tensor& t, const Tensor& student, const char* name) {
  TORCH_CHECK_VALUE(t.device() == student.device(), name, " must be on ", student.device(), " like the student, got ",
                    t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_vector(const Tensor& t, int64_t n, at::ScalarType dtype, const Tensor& student, const char* name) {
  check_on(t, student, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, ",), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fused_forward(
    const Tensor& student, const std::optional<Tensor>& teacher, const std::optional<Tensor>& labels, const Tensor& a,
    const std::optional<Tensor>& log_c, const std::optional<Tensor>& w, double gamma, double tau,
    bool teacher_is_probs, double grad_scale, bool need_grad, double prob_tol, const std::optional<Tensor>& grad_out,
    int64_t ignore_index, const std::optional<Tensor>& scale) {
  TORCH_CHECK_VALUE(student.is_cuda(), "student must be a CUDA tensor, got one on ", student.device());
  TORCH_CHECK_VALUE(student.dim() == 2, "student must have shape (B, m), got ", student.sizes());
  TORCH_CHECK_VALUE(student.is_contiguous(), "student must be contiguous");
  const rkd_cuda::DType dtype = kernel_dtype(student, "student");
  const int64_t rows = student.size(0);
  const int64_t m = student.size(1);
  TORCH_CHECK_VALUE(m >= 1 && m <= rkd_cuda::kMaxClasses, "the CUDA backend takes 1 <= m <= ", rkd_cuda::kMaxClasses,
                    " classes, got m = ", m);
  TORCH_CHECK_VALUE(gamma > 0.0 && tau > 0.0, "gamma and tau must be > 0, got gamma = ", gamma, ", tau = ", tau);
  if (teacher) {
    check_on(*teacher, student, "teacher");
    TORCH_CHECK_VALUE(teacher->sizes() == student.sizes(), "teacher must have the student's shape ", student.sizes(),
                      ", got ", teacher->sizes());
    TORCH_CHECK_TYPE(teacher->scalar_type() == student.scalar_type(), "teacher must have the student's dtype ",
                     student.scalar_type(), ", got ", teacher->scalar_type());
  }
  if (labels) check_vector(*labels, rows, at::kLong, student, "labels");
  TORCH_CHECK_VALUE(teacher || labels, "fused_forward needs a teacher or labels");
  check_vector(a, rows, at::kFloat, student, "a");
  if (log_c) check_vector(*log_c, m, at::kFloat, student, "log_c");
  if (w) check_vector(*w, m, at::kFloat, student, "w");
  if (scale) {
    check_on(*scale, student, "scale");
    TORCH_CHECK_VALUE(scale->numel() == 1, "scale must hold one value, got shape ", scale->sizes());
    TORCH_CHECK_TYPE(scale->scalar_type() == at::kFloat, "scale must be float32, got ", scale->scalar_type());
  }

  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc = student.options().dtype(at::kFloat);
  Tensor loss = at::empty({rows}, acc);
  Tensor mass = at::empty({m}, acc);
  Tensor risk = at::empty({m}, acc);
  Tensor error = at::empty({m}, acc);
  Tensor grad;
  if (!need_grad) {
    grad = at::empty({0}, student.options());
  } else if (grad_out) {
    check_on(*grad_out, student, "grad_out");
    TORCH_CHECK_VALUE(grad_out->sizes() == student.sizes(), "grad_out must have the student's shape ",
                      student.sizes(), ", got ", grad_out->sizes());
    TORCH_CHECK_TYPE(grad_out->scalar_type() == student.scalar_type(), "grad_out must have the student's dtype ",
                     student.scalar_type(), ", got ", grad_out->scalar_type());
    grad = *grad_out;
  } else {
    grad = at::empty_like(student);
  }

  rkd_cuda::FusedArgs args;
  args.dtype = dtype;
  args.rows = rows;
  args.classes = m;
  args.device = static_cast<int>(student.get_device());
  args.student = student.data_ptr();
  args.teacher = teacher ? teacher->data_ptr() : nullptr;
  args.teacher_is_probs = teacher_is_probs;
  args.labels = labels ? labels->data_ptr<int64_t>() : nullptr;
  args.a = a.data_ptr<float>();
  args.log_c = log_c ? log_c->data_ptr<float>() : nullptr;
  args.w = w ? w->data_ptr<float>() : nullptr;
  args.gamma = static_cast<float>(gamma);
  args.tau = static_cast<float>(tau);
  args.grad_scale = static_cast<float>(grad_scale);
  args.scale = scale ? scale->data_ptr<float>() : nullptr;
  args.ignore_index = ignore_index;
  args.prob_tol = static_cast<float>(prob_tol);
  args.grad = need_grad ? grad.data_ptr() : nullptr;
  args.loss = loss.data_ptr<float>();
  args.mass = mass.data_ptr<float>();
  args.risk = risk.data_ptr<float>();
  args.error = error.data_ptr<float>();

  // The plan is looked up once per call (computed on the first call of its shape only): it sizes the workspace.
  const rkd_cuda::LaunchPlan plan = rkd_cuda::plan_fused_forward(args);
  const size_t bytes = plan.workspace_bytes;
  Tensor workspace = at::empty({static_cast<int64_t>((bytes + 3) / 4)}, acc);
  rkd_cuda::fused_forward(args, plan, bytes > 0 ? workspace.data_ptr() : nullptr, bytes, current_stream());
  return {loss, grad, mass, risk, error};
}

void scale_rows_(const Tensor& grad, const Tensor& go) {
  TORCH_CHECK_VALUE(grad.is_cuda(), "grad must be a CUDA tensor, got one on ", grad.device());
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.is_contiguous(), "grad must be a contiguous (B, m) tensor, got ",
                    grad.sizes());
  const rkd_cuda::DType dtype = kernel_dtype(grad, "grad");
  check_vector(go, grad.size(0), at::kFloat, grad, "go");
  const c10::cuda::CUDAGuard guard(grad.device());
  rkd_cuda::scale_rows(dtype, grad.data_ptr(), go.data_ptr<float>(), grad.size(0), grad.size(1), current_stream());
}

// The plan depends on the dtype, B, m and the rows' alignment only (a teacher and a gradient like the student).
std::string fused_forward_path(const Tensor& student) {
  TORCH_CHECK_VALUE(student.is_cuda() && student.dim() == 2 && student.is_contiguous(),
                    "student must be a contiguous (B, m) CUDA tensor");
  const c10::cuda::CUDAGuard guard(student.device());
  rkd_cuda::FusedArgs args;
  args.dtype = kernel_dtype(student, "student");
  args.rows = student.size(0);
  args.classes = student.size(1);
  args.device = static_cast<int>(student.get_device());
  args.student = student.data_ptr();
  args.teacher = student.data_ptr();
  args.grad = student.data_ptr();
  return rkd_cuda::fused_forward_path(args);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "rkd CUDA kernels (sm_90): the fused distillation loss, and the row scaling";
  module.attr("MAX_CLASSES") = rkd_cuda::kMaxClasses;
  module.def("fused_forward", &fused_forward, "Loss per row, grad_scale * dloss/df and mass, risk, error",
             pybind11::arg("student"), pybind11::arg("teacher"), pybind11::arg("labels"), pybind11::arg("a"),
             pybind11::arg("log_c"), pybind11::arg("w"), pybind11::arg("gamma"), pybind11::arg("tau"),
             pybind11::arg("teacher_is_probs"), pybind11::arg("grad_scale"), pybind11::arg("need_grad"),
             pybind11::arg("prob_tol"), pybind11::arg("grad_out") = pybind11::none(), pybind11::arg("ignore_index") = -100,
             pybind11::arg("scale") = pybind11::none());
  module.def("scale_rows_", &scale_rows_, "grad[i, :] *= go[i] in place, skipping rows where go[i] == 1",
             pybind11::arg("grad"), pybind11::arg("go"));
  module.def("fused_forward_path", &fused_forward_path,
             "The code path and launch shape fused_forward takes for a student like this one",
             pybind11::arg("student"));
}
