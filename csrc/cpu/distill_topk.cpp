// rkd_engine._C.topk_forward: the fused loss with a sparse top-k teacher on CPU (docs/wide_heads.md), the
// rows of distill_topk_rows.h run in blocks over threads. Each row reads its k teacher entries and the
// student row; no dense (B, m) or (rows, m) teacher is formed. Per-class accumulators belong to a block
// of rows and are merged in order, so results do not depend on scheduling.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "distill_blocks.h"
#include "distill_topk.h"
#include "distill_topk_bind.h"

namespace rkd::cpu {
namespace {

template <class H>
void half_to_float(const void* src, float* dst, int64_t n) {
  const H* s = static_cast<const H*>(src);
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(s[j]);
}

template <class H>
void float_to_half(const float* src, void* dst, int64_t n) {
  H* d = static_cast<H*>(dst);
  for (int64_t j = 0; j < n; ++j) d[j] = static_cast<H>(src[j]);
}

bool topk_use_avx2() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  static const bool use = [] {
    const char* env = std::getenv("RKD_CPU_ISA");
    if (env != nullptr && std::string(env) == "generic") return false;
    __builtin_cpu_init();
    return topk_rows_avx2() != nullptr && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return use;
#else
  return false;
#endif
}

constexpr const char* kWhere = "rkd_engine._C.topk_forward";

// The binding's checks of one call: devices, shapes, dtypes and scalars (value checks are the caller's).
void check_topk_inputs(const at::Tensor& student, const at::Tensor& index, const at::Tensor& probs,
                       const std::optional<at::Tensor>& labels, const at::Tensor& a,
                       const std::optional<at::Tensor>& log_c, const std::optional<at::Tensor>& w, double tau,
                       double grad_scale) {
  TORCH_CHECK(student.device().is_cpu() && student.dim() == 2 && student.is_contiguous(),
              "rkd_engine._C.topk_forward: student scores must be a contiguous CPU (B, m) tensor, got ",
              student.sizes());
  const at::ScalarType st = student.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble,
              "rkd_engine._C.topk_forward: student scores must be float32, bfloat16, float16 or float64, got ", st);
  const int64_t rows = student.size(0), m = student.size(1);
  TORCH_CHECK(m >= 1, "rkd_engine._C.topk_forward: need at least one class");
  const at::ScalarType acc = st == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(index.device().is_cpu() && index.dim() == 2 && index.size(0) == rows && index.is_contiguous() &&
                  index.scalar_type() == at::kLong,
              "rkd_engine._C.topk_forward: indices must be a contiguous CPU int64 (", rows, ", k) tensor, got ",
              index.scalar_type(), " ", index.sizes());
  const int64_t k = index.size(1);
  TORCH_CHECK(k >= 1 && k <= m, "rkd_engine._C.topk_forward: need 1 <= k <= m, got k = ", k);
  TORCH_CHECK(probs.device().is_cpu() && probs.sizes() == index.sizes() && probs.scalar_type() == acc &&
                  probs.is_contiguous(),
              "rkd_engine._C.topk_forward: probs must be a contiguous CPU ", acc, " tensor of shape ", index.sizes(),
              ", got ", probs.scalar_type(), " ", probs.sizes());
  if (labels.has_value()) check_vector(*labels, kWhere, "labels", rows, at::kLong);
  check_vector(a, kWhere, "a", rows, acc);
  if (log_c.has_value()) check_vector(*log_c, kWhere, "log_c", m, acc);
  if (w.has_value()) check_vector(*w, kWhere, "w", m, acc);
  TORCH_CHECK(std::isfinite(tau) && tau > 0, "rkd_engine._C.topk_forward: tau must be finite and > 0, got ", tau);
  TORCH_CHECK(std::isfinite(grad_scale), "rkd_engine._C.topk_forward: grad_scale must be finite, got ", grad_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_forward(
    const at::Tensor& student, const at::Tensor& index, const at::Tensor& probs,
    const std::optional<at::Tensor>& labels, const at::Tensor& a, const std::optional<at::Tensor>& log_c,
    const std::optional<at::Tensor>& w, double tau, bool uniform, double grad_scale, bool need_grad,
    const std::optional<at::Tensor>& grad_out, int64_t ignore_index) {
  check_topk_inputs(student, index, probs, labels, a, log_c, w, tau, grad_scale);
  const at::ScalarType st = student.scalar_type();
  const int64_t rows = student.size(0), m = student.size(1), k = index.size(1);
  const bool is_double = st == at::kDouble;
  const at::ScalarType acc = is_double ? at::kDouble : at::kFloat;
  const auto acc_opts = student.options().dtype(acc);
  at::Tensor grad = at::empty({0}, student.options());
  if (need_grad) {
    if (grad_out.has_value()) {
      TORCH_CHECK(grad_out->sizes() == student.sizes() && grad_out->scalar_type() == st && grad_out->is_contiguous(),
                  "rkd_engine._C.topk_forward: grad_out must be a contiguous tensor like the student scores");
      grad = *grad_out;
    } else {
      grad = at::empty_like(student);
    }
  }
  at::Tensor loss = at::empty({rows}, acc_opts);
  at::Tensor mass = at::zeros({m}, acc_opts), risk = at::zeros({m}, acc_opts), error = at::zeros({m}, acc_opts);
  if (rows == 0) return {loss, grad, mass, risk, error};

  const int64_t m_pad = round_up(m, kPad);
  const int64_t elem = is_double ? 8 : 4;
  // Threads and blocks as the dense kernel's (distill_blocks.h).
  const int64_t threads = num_threads(rows, m);
  const int64_t blocks = num_blocks(rows, m_pad, threads, elem);
  const int64_t scratch_len = kTopkScratch * m_pad;
  at::Tensor workspace = at::empty({2 * m_pad + blocks * 3 * m_pad + threads * scratch_len}, acc_opts);
  char* base = static_cast<char*>(workspace.data_ptr());
  char* lc_pad = base;
  char* w_pad = base + m_pad * elem;
  char* stats = w_pad + m_pad * elem;
  char* scratch = stats + blocks * 3 * m_pad * elem;
  if (is_double) {
    copy_padded(reinterpret_cast<double*>(lc_pad), log_c, m, m_pad, 0.0);
    copy_padded(reinterpret_cast<double*>(w_pad), w, m, m_pad, 1.0);
  } else {
    copy_padded(reinterpret_cast<float*>(lc_pad), log_c, m, m_pad, 0.0f);
    copy_padded(reinterpret_cast<float*>(w_pad), w, m, m_pad, 1.0f);
  }

  TopkArgs args;
  args.student = student.data_ptr();
  args.index = index.data_ptr<int64_t>();
  args.probs = probs.data_ptr();
  args.labels = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  args.a = a.data_ptr();
  args.log_c = lc_pad;
  args.w = w_pad;
  args.grad = need_grad ? grad.data_ptr() : nullptr;
  args.loss = loss.data_ptr();
  args.half_input = st == at::kBFloat16 || st == at::kHalf;
  args.to_acc = st == at::kBFloat16 ? &half_to_float<c10::BFloat16> : &half_to_float<c10::Half>;
  args.from_acc = st == at::kBFloat16 ? &float_to_half<c10::BFloat16> : &float_to_half<c10::Half>;
  args.rows = rows;
  args.m = m;
  args.k = k;
  args.tau = tau;
  args.grad_scale = grad_scale;
  args.ignore_index = ignore_index;
  args.uniform = uniform;
  args.need_grad = need_grad;

  const TopkRowsFn fn = (!is_double && topk_use_avx2()) ? topk_rows_avx2() : topk_rows_generic(is_double);
  std::vector<int64_t> bad_rows(static_cast<size_t>(blocks), -1), bad_index(static_cast<size_t>(blocks), -1);
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t begin, int64_t end) {
    const FlushToZero ftz;  // see distill_kernel.h
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1)) {
        char* acc_b = stats + b * 3 * m_pad * elem;
        std::memset(acc_b, 0, static_cast<size_t>(3 * m_pad * elem));
        TopkOut out{scratch + t * scratch_len * elem, acc_b, acc_b + m_pad * elem, acc_b + 2 * m_pad * elem, -1, -1};
        fn(args, rows * b / blocks, rows * (b + 1) / blocks, out);
        bad_rows[b] = out.bad_row;
        bad_index[b] = out.bad_index;
      }
    }
  };
  if (threads == 1) {
    work(0, 1);
  } else {
    at::parallel_for(0, threads, 1, work);
  }
  for (size_t b = 0; b < bad_rows.size(); ++b) {
    TORCH_CHECK(bad_rows[b] < 0, "rkd_engine._C.topk_forward: labels must be in [0, ", m, "), got labels[",
                bad_rows[b], "] = ", args.labels[bad_rows[b]]);
    TORCH_CHECK(bad_index[b] < 0, "rkd_engine._C.topk_forward: teacher_topk indices must lie in [0, ", m,
                "), row ", bad_index[b], " has one outside");
  }
  if (is_double) {
    merge_blocks(reinterpret_cast<const double*>(stats), blocks, m, m_pad, mass.data_ptr<double>(),
                 risk.data_ptr<double>(), error.data_ptr<double>());
  } else {
    merge_blocks(reinterpret_cast<const float*>(stats), blocks, m, m_pad, mass.data_ptr<float>(),
                 risk.data_ptr<float>(), error.data_ptr<float>());
  }
  return {loss, grad, mass, risk, error};
}

}  // namespace

void bind_topk(pybind11::module_& mod) {
  namespace py = pybind11;
  mod.def("topk_forward", &topk_forward, py::arg("student"), py::arg("indices"), py::arg("probs"),
          py::arg("labels"), py::arg("a"), py::arg("log_c"), py::arg("w"), py::kw_only(), py::arg("tau"),
          py::arg("uniform"), py::arg("grad_scale"), py::arg("need_grad"), py::arg("grad_out") = py::none(),
          py::arg("ignore_index") = -100, py::call_guard<py::gil_scoped_release>(),
          "(loss, grad, mass, risk, error) of the fused loss with a sparse top-k teacher (indices, probs (B, k)) "
          "on CPU, without a dense teacher.");
}

}  // namespace rkd::cpu
