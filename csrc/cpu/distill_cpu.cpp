// rkd_engine._C: the fused distillation loss on CPU (docs/loss.md), bound with pybind11.
//
// Math, per row i of B rows and m classes (the symbols of docs/README.md), with f = student scores, g = teacher
// logits (or p given directly), y = label, a = a_i, c = class costs, w = class weights:
//   p_j   = softmax(g / gamma)_j                  q_j = (1 - a) [j == y] + a p_j
//   z_j   = (f_j - max_k f_k) - log c_j           s = softmax(z),  s^tau = softmax(z / tau)
//   loss  = (1 - a) w_y (-log s_y) + a tau^2 sum_j w_j p_j (-log s^tau_j)
//   dloss/df_j = (1 - a) w_y (s_j - [j == y]) + a tau (s^tau_j W_p - w_j p_j),   W_p = sum_k w_k p_k
//              = s_j W_q - w_j q_j  when tau = 1,                               W_q = sum_k w_k q_k
//   mass_j += q_j,  risk_j += q_j (-log s_j),  error_j += q_j [argmax_k f_k != j]   (s at tau = 1)
// A term with q_j = 0 contributes exactly 0 (no 0 * inf for -inf teacher columns).
//
// How a row is computed (distill_rows.h). With u_j = (f_j - r) - log c_j, r = max_k (f_k - log c_k)
// (so u_j = z_j - max_k z_k up to a shift common to all j, which cancels below; r is subtracted first
// so that f_j - r is exact for large logits), and e_j = exp((g_j - max_k g_k) / gamma):
//   L = log sum_j exp(u_j)  gives  -log s_j = L - u_j;   L_tau = log sum_j exp(u_j / tau);
//   p_j = e_j / S_g with S_g = sum_j e_j (S_g = 1 for given probabilities);
//   loss = (1 - a) w_y (L - u_y) + a tau^2 (L_tau W_p - (1/tau) sum_{j: w_j e_j > 0} w_j e_j u_j / S_g),
// where both teacher terms are >= 0, so no cancellation; at tau = 1 without w the loss is instead summed
// in pass B as sum_j q_j (L - u_j), the row's risk increments. Every exponential is computed as 2^y with
// the natural-log exponent scaled by log2(e) in the multiply it needs anyway (distill_kernel.h, kExp2Magic).
// Pass A reads the row once, tile by tile,
// keeping running maxima of f (for the argmax), f - log c and g and the sums above; when a later
// tile raises a maximum the sums are rescaled (exp(-du) for sum exp(u), sum w e u - du sum w e for the
// linear one). Pass B
// forms q, the gradient (fp32 math, one rounding at the store, times grad_scale) and the statistics.
// The teacher's exponentials are exactly 0 below the float range (so masked classes get q = 0); the
// student's are clamped there to exp(-87) ~ 1.6e-38 (one instruction fewer; -log s uses u itself).
// A row of up to kMaxSingleTile classes is held whole in per-thread scratch (u, e and exp(u) stored
// by pass A), so it is read from memory once and its gradient written once: 3 x element size bytes
// per logit; float rows are read in place, and the next row is prefetched while this one is read.
// Wider rows reread each tile in pass B (5 x). Large gradients are written with non-temporal
// stores (see fused_forward for when). Per-class accumulators belong to a block of rows (no atomics)
// and are merged once; error_j = mass_j - hit_j with hit_j = sum_{i: argmax f_i = j} q_ij (first index on ties).
// Accumulation is float for float32/bfloat16/float16 inputs and double for float64 inputs.
//
// Threads: rows are split into contiguous blocks, each with its own accumulators, claimed by the
// threads of one at::parallel_for as they finish; blocks are merged in order, so results do not depend
// on scheduling. Vector code: distill_kernel_avx512.cpp (AVX-512 F/DQ/BW/VL), distill_kernel_avx2.cpp
// (AVX2/FMA/F16C), each chosen at run time when the CPU has it (the widest first), or
// distill_kernel_generic.cpp (portable); RKD_CPU_ISA=generic|avx2|avx512|auto or set_cpu_isa() overrides
// the choice.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "distill_blocks.h"
#include "distill_kernel.h"
#include "distill_topk_bind.h"

namespace rkd::cpu {
namespace {

constexpr const char* kWhere = "rkd_engine._C";

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool avx2_usable() {
  static const bool usable = avx2_kernels() != nullptr && cpu_has_avx2();
  return usable;
}

// __builtin_cpu_supports reports a feature only where the OS also saves its register state (XCR0),
// so the zmm and mask registers are usable when it says avx512f.
bool cpu_has_avx512() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool avx512_usable() {
  static const bool usable = avx512_kernels() != nullptr && cpu_has_avx512();
  return usable;
}

const KernelTable* table_for(const std::string& isa) {
  if (isa == "generic") return generic_kernels();
  if (isa == "avx2") {
    TORCH_CHECK(avx2_usable(), "rkd_engine._C: the AVX2 kernels are not available on this CPU or build");
    return avx2_kernels();
  }
  if (isa == "avx512") {
    TORCH_CHECK(avx512_usable(), "rkd_engine._C: the AVX-512 kernels are not available on this CPU or build");
    return avx512_kernels();
  }
  TORCH_CHECK(isa == "auto", "rkd_engine._C: cpu isa must be 'auto', 'avx512', 'avx2' or 'generic', got '", isa,
              "'");
  if (avx512_usable()) return avx512_kernels();
  return avx2_usable() ? avx2_kernels() : generic_kernels();
}

const KernelTable*& active_table() {
  static const KernelTable* table = [] {
    const char* env = std::getenv("RKD_CPU_ISA");
    return table_for(env != nullptr && env[0] != '\0' ? std::string(env) : std::string("auto"));
  }();
  return table;
}

struct Tiling {
  int64_t max_single = kMaxSingleTile;
  int64_t tile = kTile;
  int64_t narrow_max = kNarrowMax;
};

Tiling& tiling() {
  static Tiling t;
  return t;
}

// Tests use small values to run the tiled (online) path on small rows.
void set_tiling(int64_t max_single_tile, int64_t tile) {
  TORCH_CHECK(tile >= kPad && tile % kPad == 0, "rkd_engine._C: tile must be a positive multiple of ", kPad,
              ", got ", tile);
  TORCH_CHECK(max_single_tile >= 0, "rkd_engine._C: max_single_tile must be >= 0, got ", max_single_tile);
  tiling().max_single = max_single_tile;
  tiling().tile = tile;
}

std::tuple<int64_t, int64_t> get_tiling() { return {tiling().max_single, tiling().tile}; }

// Calls of at most narrow_max classes (rows held whole) take W rows at a time (distill_narrow.h); 0 turns
// that path off (tests compare both paths).
void set_narrow_max(int64_t narrow_max) {
  TORCH_CHECK(narrow_max >= 0 && narrow_max <= kNarrowLimit, "rkd_engine._C: narrow_max must be in [0, ",
              kNarrowLimit, "], got ", narrow_max);
  tiling().narrow_max = narrow_max;
}

int64_t get_narrow_max() { return tiling().narrow_max; }

std::string cpu_isa() { return active_table()->isa; }

void set_cpu_isa(const std::string& isa) { active_table() = table_for(isa); }

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kFloat32;
    case at::kBFloat16:
      return kBFloat16;
    case at::kHalf:
      return kFloat16;
    case at::kDouble:
      return kFloat64;
    default:
      TORCH_CHECK(false, "rkd_engine._C: student scores must be float32, bfloat16, float16 or float64, got ", t);
  }
  return kFloat32;  // unreachable
}

// The kernel table entry for dtype `code`: the active ISA's, or the portable one where it has none.
const KernelTable* table_with(DType code) {
  const KernelTable* t = active_table();
  return t->rows[code] != nullptr ? t : generic_kernels();
}

void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "rkd_engine._C: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == like.sizes(), "rkd_engine._C: ", name, " must have shape ", like.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "rkd_engine._C: ", name, " must be ", like.scalar_type(),
              " like the student scores, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "rkd_engine._C: ", name, " must be contiguous");
}

// The binding's checks of one call: devices, shapes, dtypes and scalars, the guards of the memory the
// kernel reads (value checks are the caller's, from the row losses: rkd_engine/ops/checks.py).
DType check_fused_inputs(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                         const std::optional<at::Tensor>& labels, const at::Tensor& a,
                         const std::optional<at::Tensor>& log_c, const std::optional<at::Tensor>& w, double gamma,
                         double tau, bool teacher_is_probs, double grad_scale, double prob_tol) {
  TORCH_CHECK(student.device().is_cpu(), "rkd_engine._C: student scores must be a CPU tensor, got ",
              student.device());
  TORCH_CHECK(student.dim() == 2, "rkd_engine._C: student scores must have shape (B, m), got ", student.sizes());
  TORCH_CHECK(student.is_contiguous(), "rkd_engine._C: student scores must be contiguous");
  const DType code = dtype_code(student.scalar_type());
  const int64_t rows = student.size(0);
  const int64_t m = student.size(1);
  TORCH_CHECK(m >= 1, "rkd_engine._C: student scores need at least one class (m >= 1), got m = ", m);
  const at::ScalarType acc = code == kFloat64 ? at::kDouble : at::kFloat;
  TORCH_CHECK(teacher.has_value() || labels.has_value(), "rkd_engine._C: need labels, a teacher, or both");
  if (teacher.has_value()) check_matrix(*teacher, "teacher", student);
  if (labels.has_value()) check_vector(*labels, kWhere, "labels", rows, at::kLong);
  check_vector(a, kWhere, "a", rows, acc);
  if (log_c.has_value()) check_vector(*log_c, kWhere, "log_c", m, acc);
  if (w.has_value()) check_vector(*w, kWhere, "w", m, acc);
  TORCH_CHECK(std::isfinite(tau) && tau > 0, "rkd_engine._C: tau must be finite and > 0, got ", tau);
  TORCH_CHECK(!teacher.has_value() || teacher_is_probs || (std::isfinite(gamma) && gamma > 0),
              "rkd_engine._C: gamma must be finite and > 0, got ", gamma);
  TORCH_CHECK(std::isfinite(grad_scale), "rkd_engine._C: grad_scale must be finite, got ", grad_scale);
  TORCH_CHECK(std::isfinite(prob_tol) && prob_tol >= 0, "rkd_engine._C: prob_tol must be finite and >= 0, got ",
              prob_tol);
  return code;
}

// One workspace per call: padded log c and w, per-block accumulators (mass, risk, hit), per-thread scratch.
struct Workspace {
  at::Tensor buffer;
  char* lc_pad;
  char* w_pad;
  char* stats;    // blocks x 3 x m_pad accumulators
  char* scratch;  // threads x scratch_len
  int64_t m_pad, elem, threads, blocks, tile, scratch_len;
  bool narrow;  // FusedArgs::narrow
};

Workspace make_workspace(int64_t rows, int64_t m, DType code, const at::TensorOptions& acc_opts,
                         const std::optional<at::Tensor>& log_c, const std::optional<at::Tensor>& w) {
  Workspace ws;
  ws.m_pad = round_up(m, kPad);
  ws.elem = code == kFloat64 ? 8 : 4;
  ws.threads = num_threads(rows, m);
  ws.blocks = num_blocks(rows, ws.m_pad, ws.threads, ws.elem);
  ws.tile = tile_len(m, tiling().max_single, tiling().tile);
  ws.narrow = m <= tiling().narrow_max && ws.tile == ws.m_pad;
  ws.scratch_len = kScratchBuffers * ws.tile + (ws.narrow ? kNarrowBuffers * kNarrowLanes * ws.m_pad : 0);
  ws.buffer = at::empty({2 * ws.m_pad + ws.blocks * 3 * ws.m_pad + ws.threads * ws.scratch_len}, acc_opts);
  ws.lc_pad = static_cast<char*>(ws.buffer.data_ptr());
  ws.w_pad = ws.lc_pad + ws.m_pad * ws.elem;
  ws.stats = ws.w_pad + ws.m_pad * ws.elem;
  ws.scratch = ws.stats + ws.blocks * 3 * ws.m_pad * ws.elem;
  if (code == kFloat64) {
    copy_padded(reinterpret_cast<double*>(ws.lc_pad), log_c, m, ws.m_pad, 0.0);
    copy_padded(reinterpret_cast<double*>(ws.w_pad), w, m, ws.m_pad, 1.0);
  } else {
    copy_padded(reinterpret_cast<float*>(ws.lc_pad), log_c, m, ws.m_pad, 0.0f);
    copy_padded(reinterpret_cast<float*>(ws.w_pad), w, m, ws.m_pad, 1.0f);
  }
  return ws;
}

// A gradient of 8 MiB or more leaves the caches before anything reads it: write it around them
// (non-temporal stores, some 10% faster at 16 MiB here), but only into grad_out, memory that was written
// before (the Python backend passes the kept memory of the previous gradient there: cpp_backend,
// REUSE_GRAD_BYTES). A gradient allocated here may be a mapping the OS has yet to fault in (glibc maps
// large allocations anew), and first-touch page faults under streaming stores cost more than the kernel.
bool stream_gradient(int64_t grad_bytes, bool need_grad, bool into_grad_out) {
  constexpr int64_t kStreamBytes = int64_t(8) << 20;
  return need_grad && into_grad_out && grad_bytes >= kStreamBytes;
}

// Runs the row kernel over every block of rows (threads claim blocks as they finish) and raises for the
// first label outside [0, m) (the kernel skips such rows: the check guards memory, not values).
void run_blocks(const FusedArgs& args, const Workspace& ws, RowsFn fn) {
  const int64_t rows = args.rows;
  const int64_t m_pad = ws.m_pad;
  const int64_t elem = ws.elem;
  std::vector<int64_t> bad_rows(static_cast<size_t>(ws.blocks), -1);
  std::atomic<int64_t> next_block{0};
  auto work = [&](int64_t begin, int64_t end) {
    const FlushToZero ftz;  // no subnormal results, no microcode assists (distill_kernel.h)
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t b = next_block.fetch_add(1); b < ws.blocks; b = next_block.fetch_add(1)) {
        char* st = ws.stats + b * 3 * m_pad * elem;
        std::memset(st, 0, static_cast<size_t>(3 * m_pad * elem));
        ChunkOut out{ws.scratch + t * ws.scratch_len * elem, st, st + m_pad * elem, st + 2 * m_pad * elem, -1};
        fn(args, rows * b / ws.blocks, rows * (b + 1) / ws.blocks, out);
        bad_rows[b] = out.bad_row;
      }
    }
  };
  if (ws.threads == 1) {
    work(0, 1);  // small problems: no parallel region at all
  } else if (rows > 0) {
    at::parallel_for(0, ws.threads, 1, work);
  }
  for (const int64_t bad : bad_rows) {
    TORCH_CHECK(bad < 0, "rkd_engine._C: labels must be in [0, ", args.m, "), got labels[", bad, "] = ",
                args.labels[bad]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_forward(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& a, const std::optional<at::Tensor>& log_c, const std::optional<at::Tensor>& w, double gamma,
    double tau, bool teacher_is_probs, double grad_scale, bool need_grad, double prob_tol,
    const std::optional<at::Tensor>& grad_out, int64_t ignore_index) {
  const DType code =
      check_fused_inputs(student, teacher, labels, a, log_c, w, gamma, tau, teacher_is_probs, grad_scale, prob_tol);
  const int64_t rows = student.size(0);
  const int64_t m = student.size(1);
  const auto acc_opts = student.options().dtype(code == kFloat64 ? at::kDouble : at::kFloat);
  at::Tensor grad;
  if (need_grad) {
    if (grad_out.has_value()) {
      check_matrix(*grad_out, "grad_out", student);
      grad = *grad_out;
    } else {
      grad = at::empty_like(student);
    }
  } else {
    grad = at::empty({0}, student.options());
  }
  at::Tensor loss = at::empty({rows}, acc_opts);
  at::Tensor mass = at::empty({m}, acc_opts);
  at::Tensor risk = at::empty({m}, acc_opts);
  at::Tensor error = at::empty({m}, acc_opts);
  const Workspace ws = make_workspace(rows, m, code, acc_opts, log_c, w);

  FusedArgs args;
  args.student = student.data_ptr();
  args.teacher = teacher.has_value() ? teacher->data_ptr() : nullptr;
  args.labels = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  args.a = a.data_ptr();
  args.log_c = ws.lc_pad;
  args.w = ws.w_pad;
  args.grad = need_grad ? grad.data_ptr() : nullptr;
  args.loss = loss.data_ptr();
  args.rows = rows;
  args.m = m;
  args.tile = ws.tile;
  args.gamma = gamma;
  args.tau = tau;
  args.grad_scale = grad_scale;
  args.ignore_index = ignore_index;
  args.prob_tol = prob_tol;
  args.teacher_is_probs = teacher_is_probs;
  args.need_grad = need_grad;
  args.has_log_c = log_c.has_value();
  args.has_w = w.has_value();
  args.stream_grad = stream_gradient(rows * m * static_cast<int64_t>(student.element_size()), need_grad,
                                     grad_out.has_value());
  args.narrow = ws.narrow;
  run_blocks(args, ws, table_with(code)->rows[code]);
  if (rows == 0) {
    mass.zero_();
    risk.zero_();
    error.zero_();
  } else if (code == kFloat64) {
    merge_blocks(reinterpret_cast<const double*>(ws.stats), ws.blocks, m, ws.m_pad, mass.data_ptr<double>(),
                 risk.data_ptr<double>(), error.data_ptr<double>());
  } else {
    merge_blocks(reinterpret_cast<const float*>(ws.stats), ws.blocks, m, ws.m_pad, mass.data_ptr<float>(),
                 risk.data_ptr<float>(), error.data_ptr<float>());
  }
  return {loss, grad, mass, risk, error};
}

// factor * sum_i loss[i] as a 0-d tensor of loss's dtype, summed in double in row order: a call's reduced
// loss without ATen's reduction machinery, which costs tens of microseconds on a few thousand rows.
at::Tensor sum_rows(const at::Tensor& loss, double factor) {
  TORCH_CHECK(loss.device().is_cpu() && loss.dim() == 1 && loss.is_contiguous(),
              "rkd_engine._C: sum_rows takes a contiguous (B,) CPU tensor, got ", loss.sizes());
  TORCH_CHECK(loss.scalar_type() == at::kFloat || loss.scalar_type() == at::kDouble,
              "rkd_engine._C: sum_rows takes float32 or float64 losses, got ", loss.scalar_type());
  const int64_t rows = loss.size(0);
  double total = 0;
  at::Tensor out = at::empty({}, loss.options());
  if (loss.scalar_type() == at::kDouble) {
    const double* p = loss.data_ptr<double>();
    for (int64_t i = 0; i < rows; ++i) total += p[i];
    *out.data_ptr<double>() = total * factor;
  } else {
    const float* p = loss.data_ptr<float>();
    for (int64_t i = 0; i < rows; ++i) total += p[i];
    *out.data_ptr<float>() = static_cast<float>(total * factor);
  }
  return out;
}

void scale_rows_(const at::Tensor& grad, const at::Tensor& go) {
  TORCH_CHECK(grad.device().is_cpu(), "rkd_engine._C: grad must be a CPU tensor, got ", grad.device());
  TORCH_CHECK(grad.dim() == 2, "rkd_engine._C: grad must have shape (B, m), got ", grad.sizes());
  TORCH_CHECK(grad.is_contiguous(), "rkd_engine._C: grad must be contiguous");
  const DType code = dtype_code(grad.scalar_type());
  const int64_t rows = grad.size(0);
  const int64_t m = grad.size(1);
  check_vector(go, kWhere, "go", rows, code == kFloat64 ? at::kDouble : at::kFloat);
  if (rows == 0 || m == 0) return;
  const ScaleRowFn fn = table_with(code)->scale_row[code];
  char* base = static_cast<char*>(grad.data_ptr());
  const int64_t row_bytes = m * static_cast<int64_t>(grad.element_size());
  auto run = [&](auto* g) {
    // The rows to scale, found serially (B comparisons): with none (loss.backward() of a mean or sum)
    // no thread is woken at all.
    std::vector<int64_t> todo;
    for (int64_t i = 0; i < rows; ++i) {
      if (static_cast<double>(g[i]) != 1.0) todo.push_back(i);
    }
    const int64_t count = static_cast<int64_t>(todo.size());
    auto scale = [&](int64_t begin, int64_t end) {
      const FlushToZero ftz;
      for (int64_t k = begin; k < end; ++k) fn(base + todo[k] * row_bytes, m, static_cast<double>(g[todo[k]]));
    };
    if (count * m < kMinParallelWork) {
      scale(0, count);
    } else {
      at::parallel_for(0, count, std::max<int64_t>(1, kMinParallelWork / m), scale);
    }
  };
  if (code == kFloat64) {
    run(go.data_ptr<double>());
  } else {
    run(go.data_ptr<float>());
  }
}

}  // namespace
}  // namespace rkd::cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  namespace py = pybind11;
  mod.doc() = "Fused distillation loss on CPU (rkd): loss, gradient and per-class statistics in one pass.";
  mod.def("fused_forward", &rkd::cpu::fused_forward, py::arg("student"), py::arg("teacher"), py::arg("labels"),
          py::arg("a"), py::arg("log_c"), py::arg("w"), py::kw_only(), py::arg("gamma"), py::arg("tau"),
          py::arg("teacher_is_probs"), py::arg("grad_scale"), py::arg("need_grad"), py::arg("prob_tol"),
          py::arg("grad_out") = py::none(), py::arg("ignore_index") = -100,
          py::call_guard<py::gil_scoped_release>(),
          "(loss, grad, mass, risk, error) of docs/loss.md for CPU tensors "
          "(see rkd_engine.reference.fused_rows); a row of teacher probabilities with a negative entry or a "
          "sum off 1 by more than prob_tol, or a bad teacher row whatever a, gets a NaN loss.");
  mod.def("sum_rows", &rkd::cpu::sum_rows, py::arg("loss"), py::arg("factor"),
          "factor * sum(loss) of a (B,) float32/float64 CPU tensor, summed in double, as a 0-d tensor.");
  mod.def("scale_rows_", &rkd::cpu::scale_rows_, py::arg("grad"), py::arg("go"),
          py::call_guard<py::gil_scoped_release>(), "grad[i, :] *= go[i] in place, skipping rows where go[i] == 1.");
  mod.def("cpu_isa", &rkd::cpu::cpu_isa,
          "The instruction set of the kernels in use: 'avx512', 'avx2' or 'generic'.");
  mod.def("set_cpu_isa", &rkd::cpu::set_cpu_isa, py::arg("isa"),
          "Use the 'avx512', 'avx2' or 'generic' kernels, or 'auto' (the widest the CPU has: AVX-512 F/DQ/BW/VL, "
          "else AVX2 with FMA and F16C, else generic).");
  mod.def("get_tiling", &rkd::cpu::get_tiling,
          "(max_single_tile, tile): rows of up to max_single_tile classes are held whole, wider ones tiled.");
  mod.def("set_tiling", &rkd::cpu::set_tiling, py::arg("max_single_tile"), py::arg("tile"),
          "Change the tiling (for tests of the tiled path; the defaults are the tuned ones).");
  mod.def("get_narrow_max", &rkd::cpu::get_narrow_max,
          "Calls of at most this many classes take several rows per vector (the narrow path); 0: never.");
  mod.def("set_narrow_max", &rkd::cpu::set_narrow_max, py::arg("narrow_max"),
          "Change the narrow path's class limit (for tests and benchmarks; the default is the tuned one).");
  rkd::cpu::bind_topk(mod);
}
