// rkd CUDA kernels for sm_90 (H100, H200): the fused robust-distillation loss of docs/loss.md,
// and the in-place row scaling of its saved gradient.
// Plain CUDA C++: no torch header, so CI compiles this file with nvcc on a machine without a GPU.
//
// ---------------------------------------------------------------------------------------------------
// The math, per row i of B rows and m classes, in fp32 whatever the input dtype (fp32, fp16, bf16):
//   p_i    = softmax(g_i / gamma)                      (or g_i given as probabilities)
//   q_i    = (1 - a_i) e_{y_i} + a_i p_i
//   z_i    = f_i - log c,   s_i = softmax(z_i),   s^tau_i = softmax(z_i / tau)
//   loss_i = (1 - a_i) w_{y_i} (-log s_{i,y_i}) + a_i tau^2 sum_j w_j p_ij (-log s^tau_ij)
//   grad_ij = grad_scale * [ (1 - a_i) w_{y_i} (s_ij - e_{y_i,j}) + a_i tau (s^tau_ij sum_k w_k p_ik - w_j p_ij) ]
//   mass_j = sum_i q_ij,   risk_j = sum_i q_ij (-log s_ij),   error_j = sum_i q_ij [h(x_i) != j]
// where h(x_i) is the first index of the maximum of the RAW f_i. A term with q_ij = 0 adds exactly 0
// (masked -inf teacher columns included); the gradient is rounded once, at its store.
//
// How a row is reduced. Scores are taken relative to a row reference R_i = f_i0 (a value of the row,
// so f - R is exact for logits near 1e4; the softmax does not depend on it): u_j = (f_j - R) - log c_j.
// One pass over the row, with online rescaling when a maximum grows, builds the row state
//   M  = max_j u_j,       S1 = sum_j exp(u_j - M),     St = sum_j exp((u_j - M) / tau),
//   G  = max_j g_j,       Sg = sum_j e_j,   Wg = sum_j w_j e_j,   Vg = sum_j w_j e_j (M - u_j),
//   with e_j = exp((g_j - G) / gamma)   (teacher probabilities: e_j = p_j, G = 0 and Sg := 1),
// plus the first argmax of raw f. Row states merge associatively (threads, warps, row splits). Then
//   -log s_j = (M - u_j) + log S1,   -log s^tau_j = (M - u_j) / tau + log St,
//   p_j = exp((g_j - G) / gamma - log Sg),   sum_k w_k p_k = Wg / Sg,
//   soft loss = a tau^2 (Wg log St + Vg / tau) / Sg        (non-negative terms: no cancellation),
//   hard loss = (1 - a) w_y ((M - u_y) + log S1).
//
// Two paths (chosen in make_plan, the one place that picks block sizes; its plan is computed once per
// (device, dtype, B, m, alignment) and cached with the device queries it needs, in cached_plan):
// * Resident (m <= 512 threads x 8 elements = 4,096 classes): a team (one warp for rows of up to 256
//   classes, else the whole block) holds a whole row of f and g in registers: one read of f and g, one
//   write of the gradient (3 x element size bytes per logit). At most 8 elements per thread: more would
//   spill past the 128 registers a 512-thread block allows. The next rows are loaded while the current
//   one is reduced: kResidentStages - 1 rows ahead through asynchronous copies into shared memory when the
//   rows are 16-byte aligned (16-byte vectors), else one row ahead into registers (single elements).
//   A persistent grid of (SMs x occupancy) blocks walks the rows; every thread owns the same columns in
//   every row, so it adds its per-class statistics into its own shared-memory slots with no atomics and
//   no barrier. Each block writes its partial statistics [3][m] to the workspace and a column-sum kernel
//   adds the partials in a fixed order (deterministic).
// * Streaming (wider rows, up to kMaxClasses): pass 1 (stream_rows_kernel) reduces the row state over a
//   row, split into column ranges when there are few rows; finalize_rows_kernel merges the splits, writes
//   the loss and the row scalars; pass 2 (stream_tiles_kernel) runs on a (column tile x row group) grid
//   sized to one wave of resident blocks: each block owns one column tile and walks its group of rows,
//   re-reading f and g, writing the gradient and adding the statistics of its columns in registers; the
//   same column-sum kernel adds the row-group partials. 5 x element size bytes per logit. Both passes keep
//   kRowStages / kTileStages vectors per thread in flight through asynchronous copies.
// Workspace: parts x 3 x m float32 partial statistics, with parts = the resident grid (<= SMs x occupancy)
// or the number of row groups (~ SMs x occupancy / tiles), about 10 MB at most on an H100; plus, for the
// streaming path, B x splits row states and B row scalars of 48 bytes each.
// ---------------------------------------------------------------------------------------------------

#include "distill_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>

namespace rkd_cuda {
namespace {

// ---- launch shapes (all chosen in make_plan) --------------------------------------------------------
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kVectorBytes = 16;            // one 128-bit load or store per vector
constexpr int kResidentMaxThreads = 512;    // threads of a resident block (its __launch_bounds__)
constexpr int kResidentMaxElements = 8;     // elements per thread per row (more spill past 128 registers)
constexpr int kResidentMaxWarps = kResidentMaxThreads / kWarpSize;
constexpr int kStatCount = 3;  // mass, risk, error
constexpr int kResidentStages = 3;  // rows of f and g in flight per resident team (asynchronous copies)
// Dynamic shared memory of a resident block: 3 statistics per element it holds, plus the rings of f and g
// (at most 48 KB + 96 KB).
constexpr int kResidentMaxSmem =
    kResidentMaxThreads * (kStatCount * kResidentMaxElements * static_cast<int>(sizeof(float)) +
                           2 * kResidentStages * kResidentMaxElements / 4 * kVectorBytes);
constexpr int kWarpTeamBlock = 256;         // block size when each warp handles its own rows
constexpr int kRowThreads = 256;            // streaming pass 1: threads per (row, split) block
constexpr int kRowMinVectorsPerThread = 2;  // a split gives every thread at least this many vectors
constexpr int kRowBlocksPerSm = 4;          // splits aim at this many pass-1 blocks per multiprocessor
constexpr int kTileThreads = 256;           // streaming pass 2: threads per (tile, row group) block
constexpr int kRowStages = 4;   // pass 1: 16-byte vectors of f and g in flight per thread (asynchronous copies)
constexpr int kTileStages = 4;  // pass 2: rows of f and g in flight per thread (asynchronous copies)
constexpr int kFinalizeThreads = 128;
constexpr int kColsumColumns = 32;  // column-sum block: 32 columns x 8 lanes over the partials
constexpr int kColsumLanes = 8;
constexpr int kScaleThreads = 256;
constexpr int kScaleVectorsPerThread = 4;
constexpr int kMaxGridY = 65535;

constexpr float kInf = __builtin_huge_valf();

// Uniform per-launch options.
enum Flag : unsigned {
  kHasTeacher = 1u,
  kTeacherProbs = 2u,
  kHasLabels = 4u,
  kTauIsOne = 8u,
  kNeedGrad = 16u,
};

struct Ctx {
  float inv_gamma;
  float tau;
  float inv_tau;
  float grad_scale;
  float prob_tol;  // teacher probabilities: the largest |sum_j p_j - 1| of a valid row
  unsigned flags;
  __device__ __forceinline__ bool has(unsigned flag) const { return (flags & flag) != 0u; }
  __device__ __forceinline__ bool logits() const { return has(kHasTeacher) && !has(kTeacherProbs); }
};

// Partial reduction of a row (see the top of the file). arg < 0: no column seen yet. For teacher
// probabilities G is instead max(0, max_j -p_j): > 0 when an entry is negative (teacher_ok).
struct alignas(16) RowState {
  float fmax;
  int arg;
  float M, S1, St;
  float G, Sg, Wg, Vg;
};

// What pass 2 needs of a finished row. y < 0: no (valid) label.
struct alignas(16) RowScalars {
  float R, M, log_s1, log_st;
  float G, log_sg, wp, a;
  float ch, cs;  // gradient coefficients grad_scale (1 - a) w_y and grad_scale a tau
  int pred, y;  // y: the label, -1 without one, kIgnoredRow for a row labelled ignore_index
};

template <typename T>
struct FusedParams {
  // f, g and grad are contiguous (B, m) arrays: row i starts at i * m.
  const T* f;  // not __restrict__: the gradient may be written over the student
  const T* __restrict__ g;
  const int64_t* __restrict__ labels;
  const float* __restrict__ a;
  const float* __restrict__ log_c;
  const float* __restrict__ w;
  T* grad;
  float* __restrict__ loss;
  int64_t rows, m;
  Ctx ctx;
  const float* __restrict__ scale;  // nullptr, or a device scalar multiplying ctx.grad_scale
  int64_t ignore_index;
  float* __restrict__ stats;  // [parts][3][m] partial statistics
  RowState* __restrict__ states;     // streaming: [rows][splits]
  RowScalars* __restrict__ scalars;  // streaming: [rows]
  int64_t split_cols;
  int splits;
  int team;  // resident: threads per row team (32 or the block)
};

// ---- element access -----------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// VEC consecutive elements, loaded and stored as one access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& x) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = x;
}

// Hides a value from the optimiser, so that it recomputes what it derived from the value instead of
// keeping those results in registers across the row reduction (which would spill).
template <typename T, int VEC>
__device__ __forceinline__ void launder(Pack<T, VEC>& x) {
  if constexpr (sizeof(x) % 4 == 0) {
    unsigned* words = reinterpret_cast<unsigned*>(&x);
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(x) / 4); ++i) asm volatile("" : "+r"(words[i]));
  } else {
    unsigned short* half_words = reinterpret_cast<unsigned short*>(&x);
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(x) / 2); ++i) asm volatile("" : "+h"(half_words[i]));
  }
}

template <typename T>
__device__ __forceinline__ const T* launder_ptr(const T* ptr) {
  asm volatile("" : "+l"(ptr));
  return ptr;
}

template <typename T, int VEC>
__device__ __forceinline__ void unpack(const Pack<T, VEC>& x, float (&out)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = to_float(x.v[e]);
}

// Loads of 16-byte vectors in the hot loops are asynchronous copies (cp.async) into a ring of per-thread
// shared-memory slots, several rows or vectors deep: each thread waits only for its own copies and reads
// only its own slots, so the ring needs no barrier, and many bytes per thread are in flight without
// holding registers. Rows that are not 16-byte aligned (single-element vectors) use plain loads instead,
// one row or vector ahead.
template <typename T, int VEC>
constexpr bool kAsyncCopies = sizeof(Pack<T, VEC>) == kVectorBytes;

template <typename T, int VEC>
__device__ __forceinline__ void copy_async(Pack<T, VEC>* slot, const T* src) {
  __pipeline_memcpy_async(slot, src, sizeof(Pack<T, VEC>));
}

// VEC per-class floats (log c or w) at columns col..col+VEC-1, or `fill` when the array is absent.
template <int VEC>
__device__ __forceinline__ void load_class_floats(const float* __restrict__ p, int64_t col, float fill,
                                                  float (&out)[VEC]) {
  if (p == nullptr) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = fill;
  } else if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int h = 0; h < VEC / 4; ++h) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p + col) + h);
      out[4 * h + 0] = v.x;
      out[4 * h + 1] = v.y;
      out[4 * h + 2] = v.z;
      out[4 * h + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = __ldg(p + col + e);
  }
}

// ---- row state: build, merge, reduce ----------------------------------------------------------------
__device__ __forceinline__ RowState empty_state(const Ctx& c) {
  RowState s;
  s.fmax = -kInf;
  s.arg = -1;
  s.M = -kInf;
  s.S1 = 0.0f;
  s.St = 0.0f;
  s.G = c.logits() ? -kInf : 0.0f;
  s.Sg = 0.0f;
  s.Wg = 0.0f;
  s.Vg = 0.0f;
  return s;
}

// A <- A (+) B: the state of the union of both column sets.
__device__ __forceinline__ void merge(RowState& A, const RowState& B, const Ctx& c) {
  if (B.arg >= 0 && (A.arg < 0 || B.fmax > A.fmax || (B.fmax == A.fmax && B.arg < A.arg))) {
    A.fmax = B.fmax;
    A.arg = B.arg;
  }
  const float M = fmaxf(A.M, B.M);
  // da, db <= 0 (-inf for a state without columns); the one holding the maximum gets exactly 0.
  const float da = A.M == M ? 0.0f : A.M - M;
  const float db = B.M == M ? 0.0f : B.M - M;
  A.S1 = (da == 0.0f ? A.S1 : A.S1 * __expf(da)) + (db == 0.0f ? B.S1 : B.S1 * __expf(db));
  if (!c.has(kTauIsOne)) {
    A.St = (da == 0.0f ? A.St : A.St * __expf(da * c.inv_tau)) + (db == 0.0f ? B.St : B.St * __expf(db * c.inv_tau));
  }
  if (c.has(kHasTeacher)) {
    // sum w e (M - u) = sum w e (M_A - u) + (M - M_A) sum w e; Wg == 0 covers a state without columns.
    const float va = A.Wg != 0.0f ? A.Vg - da * A.Wg : A.Vg;
    const float vb = B.Wg != 0.0f ? B.Vg - db * B.Wg : B.Vg;
    if (c.has(kTeacherProbs)) {
      A.G = fmaxf(A.G, B.G);
      A.Sg += B.Sg;
      A.Wg += B.Wg;
      A.Vg = va + vb;
    } else {
      const float G = fmaxf(A.G, B.G);
      const float ca = A.G == G ? 1.0f : __expf((A.G - G) * c.inv_gamma);
      const float cb = B.G == G ? 1.0f : __expf((B.G - G) * c.inv_gamma);
      A.Sg = A.Sg * ca + B.Sg * cb;
      A.Wg = A.Wg * ca + B.Wg * cb;
      A.Vg = va * ca + vb * cb;
      A.G = G;
    }
  }
  A.M = M;
}

// Adds VEC consecutive valid columns starting at col0 to a running state.
template <int VEC>
__device__ __forceinline__ void accumulate(RowState& st, const float (&f)[VEC], const float (&g)[VEC],
                                           const float (&lc)[VEC], const float (&w)[VEC], int64_t col0, float R,
                                           const Ctx& c) {
  float u[VEC];
  float vu = -kInf;
  float vg = -kInf;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    u[e] = (f[e] - R) - lc[e];
    if (st.arg < 0 || f[e] > st.fmax) {  // columns arrive in increasing order: keeps the first maximum
      st.fmax = f[e];
      st.arg = static_cast<int>(col0) + e;
    }
    vu = fmaxf(vu, u[e]);
    vg = fmaxf(vg, c.has(kTeacherProbs) ? -g[e] : g[e]);
  }
  if (c.has(kTeacherProbs)) st.G = fmaxf(st.G, vg);
  if (vu > st.M) {
    const float d = st.M - vu;  // < 0; -inf before the first column, where the sums are still 0
    st.S1 *= __expf(d);
    if (!c.has(kTauIsOne)) st.St *= __expf(d * c.inv_tau);
    if (c.has(kHasTeacher) && st.Wg != 0.0f) st.Vg -= d * st.Wg;
    st.M = vu;
  }
  if (c.logits() && vg > st.G) {
    const float r = __expf((st.G - vg) * c.inv_gamma);
    st.Sg *= r;
    st.Wg *= r;
    st.Vg *= r;
    st.G = vg;
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const float d = st.M - u[e];
    // A class the student masks (u = -inf) adds exactly 0, also while st.M is still -inf (a thread whose
    // columns are all masked), where exp(-d) would be NaN.
    const bool masked = u[e] == -kInf;
    st.S1 += masked ? 0.0f : __expf(-d);
    if (!c.has(kTauIsOne)) st.St += masked ? 0.0f : __expf(-d * c.inv_tau);
    if (c.has(kHasTeacher)) {
      float pe;
      if (c.has(kTeacherProbs)) {
        pe = g[e];
      } else {
        pe = g[e] == -kInf ? 0.0f : __expf((g[e] - st.G) * c.inv_gamma);
      }
      const float wpe = w[e] * pe;
      st.Sg += pe;
      st.Wg += wpe;
      st.Vg += wpe != 0.0f ? wpe * d : 0.0f;  // p = 0 adds 0 (not 0 * inf on a masked class); NaN stays
    }
  }
}

__device__ __forceinline__ RowState shuffle_state(const RowState& s, int src_or_mask, bool xor_mode, const Ctx& c) {
  auto shf = [&](float x) {
    return xor_mode ? __shfl_xor_sync(kFullMask, x, src_or_mask) : __shfl_sync(kFullMask, x, src_or_mask);
  };
  RowState o = s;
  o.fmax = shf(s.fmax);
  o.arg = xor_mode ? __shfl_xor_sync(kFullMask, s.arg, src_or_mask) : __shfl_sync(kFullMask, s.arg, src_or_mask);
  o.M = shf(s.M);
  o.S1 = shf(s.S1);
  if (!c.has(kTauIsOne)) o.St = shf(s.St);
  if (c.has(kHasTeacher)) {
    o.G = shf(s.G);
    o.Sg = shf(s.Sg);
    o.Wg = shf(s.Wg);
    o.Vg = shf(s.Vg);
  }
  return o;
}

// Butterfly over lanes [0, width) (width a power of two <= 32), then every lane takes lane 0's result
// bit for bit, so all threads of a row use identical row scalars.
__device__ __forceinline__ void warp_allreduce(RowState& s, int width, const Ctx& c) {
  for (int off = 1; off < width; off <<= 1) merge(s, shuffle_state(s, off, true, c), c);
  s = shuffle_state(s, 0, false, c);
}

// All threads of a team (a warp, or a block of `team` threads) end with the state of the whole row.
// For a warp team the final __syncwarp also orders every lane's loads of the row before any lane's
// store (the gradient may overwrite the student).
__device__ __forceinline__ void team_allreduce(RowState& s, RowState* scratch, int team, const Ctx& c) {
  warp_allreduce(s, kWarpSize, c);
  if (team <= kWarpSize) {
    __syncwarp();
    return;
  }
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int warps = team / kWarpSize;
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  s = lane < warps ? scratch[lane] : empty_state(c);
  int width = 1;
  while (width < warps) width <<= 1;
  warp_allreduce(s, width, c);
}

// ---- per-row inputs and results -----------------------------------------------------------------------
struct RowInputs {
  float R, a, u_y, w_y;
  int y;          // -1: no label
  bool label_ok;  // false: a label outside [0, m) (the row's loss becomes NaN)
};

constexpr int kIgnoredRow = -2;  // RowInputs::y of a row labelled ignore_index: it contributes nothing

template <typename T>
__device__ __forceinline__ float row_reference(const T* frow) {
  const float r = to_float(frow[0]);
  return isfinite(r) ? r : 0.0f;
}

template <typename T>
__device__ __forceinline__ RowInputs load_row_inputs(const FusedParams<T>& p, int64_t row) {
  const T* frow = p.f + row * p.m;
  RowInputs r;
  r.R = row_reference(frow);
  r.a = p.a[row];
  r.y = -1;
  r.label_ok = true;
  r.u_y = 0.0f;
  r.w_y = 1.0f;
  if (p.ctx.has(kHasLabels)) {
    const int64_t y = p.labels[row];
    if (y == p.ignore_index) {
      r.y = kIgnoredRow;
    } else if (y >= 0 && y < p.m) {
      r.y = static_cast<int>(y);
      const float lc_y = p.log_c != nullptr ? __ldg(p.log_c + y) : 0.0f;
      r.u_y = (to_float(frow[y]) - r.R) - lc_y;
      r.w_y = p.w != nullptr ? __ldg(p.w + y) : 1.0f;
    } else {
      r.label_ok = false;
    }
  }
  return r;
}

// The gradient's scale: grad_scale, times the device scalar when there is one.
template <typename T>
__device__ __forceinline__ float grad_scale_of(const FusedParams<T>& p) {
  return p.scale != nullptr ? p.ctx.grad_scale * __ldg(p.scale) : p.ctx.grad_scale;
}

// Whether a row's teacher is valid, from its reduced state (no extra pass over the row). Logits: a NaN or
// +inf makes Sg NaN, and a row of -inf everywhere leaves Sg = 0. Probabilities: no negative entry, and a
// sum within prob_tol of 1 (a NaN or an infinity fails that too).
__device__ __forceinline__ bool teacher_ok(const RowState& st, const Ctx& c) {
  if (c.has(kTeacherProbs)) return !(st.G > 0.0f) && fabsf(st.Sg - 1.0f) <= c.prob_tol;
  return st.Sg > 0.0f;
}

__device__ __forceinline__ RowScalars finish_row(const RowState& st, const RowInputs& ri, const Ctx& c, float gs,
                                                 float& loss) {
  RowScalars rs;
  rs.R = ri.R;
  rs.M = st.M;
  // A student row that is -inf everywhere keeps M = -inf and S1 = 0, so M - u_y, the teacher's sum Vg and every
  // d = M - u of element() are NaN: its loss and gradient row are NaN, as on every backend.
  rs.log_s1 = logf(st.S1);
  rs.log_st = c.has(kTauIsOne) ? rs.log_s1 : logf(st.St);
  rs.G = st.G;
  rs.log_sg = c.logits() ? logf(st.Sg) : 0.0f;
  const float sg = c.logits() ? st.Sg : 1.0f;
  rs.wp = c.has(kHasTeacher) ? st.Wg / sg : 0.0f;
  rs.a = ri.a;
  rs.pred = st.arg;
  rs.y = ri.y;
  if (ri.y == kIgnoredRow) {  // q = 0 (a = 0, no label column), no gradient, no loss
    rs.a = 0.0f;  // rs.y stays kIgnoredRow: element() writes 0 there, also over non-finite scores
    rs.ch = 0.0f;
    rs.cs = 0.0f;
    loss = 0.0f;
    return rs;
  }
  const bool hard = c.has(kHasLabels) && ri.label_ok;
  rs.ch = hard ? gs * (1.0f - ri.a) * ri.w_y : 0.0f;
  rs.cs = c.has(kHasTeacher) ? gs * ri.a * c.tau : 0.0f;
  float l = 0.0f;
  if (c.has(kHasLabels) && !ri.label_ok) {
    l = __builtin_nanf("");
  } else if (hard && 1.0f - ri.a > 0.0f) {
    l = (1.0f - ri.a) * ri.w_y * ((st.M - ri.u_y) + rs.log_s1);
  }
  if (c.has(kHasTeacher) && ri.a > 0.0f) {
    l += ri.a * c.tau * c.tau * ((st.Wg * rs.log_st + st.Vg * c.inv_tau) / sg);
  }
  // A bad teacher row is the caller's error whatever a (its term may be unused): the call's status.
  if (c.has(kHasTeacher) && !teacher_ok(st, c)) l = __builtin_nanf("");
  loss = l;
  return rs;
}

struct ElementOut {
  float grad, q, risk, error;
};

// Gradient and statistics terms of one column.
__device__ __forceinline__ ElementOut element(const RowScalars& rs, const Ctx& c, int col, float f, float g, float lc,
                                              float w) {
  const float u = (f - rs.R) - lc;
  const float d = rs.M - u;
  const float nls = d + rs.log_s1;  // -log s
  const float s = __expf(-nls);
  const float st = c.has(kTauIsOne) ? s : __expf(-d * c.inv_tau - rs.log_st);
  float p = 0.0f;
  if (c.has(kHasTeacher)) {
    if (c.has(kTeacherProbs)) {
      p = g;
    } else {
      p = g == -kInf ? 0.0f : __expf((g - rs.G) * c.inv_gamma - rs.log_sg);
    }
  }
  const bool is_y = col == rs.y;
  float q = rs.a * p;
  if (is_y) q += 1.0f - rs.a;
  ElementOut o;
  o.grad = rs.y == kIgnoredRow ? 0.0f : rs.ch * (is_y ? s - 1.0f : s) + rs.cs * (st * rs.wp - w * p);
  o.q = q;
  o.risk = q > 0.0f ? q * nls : 0.0f;
  o.error = col != rs.pred ? q : 0.0f;
  return o;
}

// ---- resident path -------------------------------------------------------------------------------------
// Thread t of a team of `team` threads holds columns (k team + t) VEC + e, k < V, e < VEC, of its row.
template <typename T, int VEC, int V>
struct ResidentRow {
  Pack<T, VEC> f[V];
  Pack<T, VEC> g[V];
  RowInputs in;
};

template <typename T, int VEC, int V>
__device__ __forceinline__ void load_resident_row(ResidentRow<T, VEC, V>& r, const FusedParams<T>& p, int64_t row,
                                                  int team, int t) {
  r.in = load_row_inputs(p, row);
  const T* frow = p.f + row * p.m;
  const T* grow = p.g + row * p.m;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t col = (static_cast<int64_t>(k) * team + t) * VEC;
    if (col < p.m) {
      r.f[k] = load_pack<T, VEC>(frow + col);
      if (p.ctx.has(kHasTeacher)) r.g[k] = load_pack<T, VEC>(grow + col);
    }
  }
}

// Scores of vector k as floats (g = 0 without a teacher).
template <typename T, int VEC, int V>
__device__ __forceinline__ void resident_scores(const ResidentRow<T, VEC, V>& r, int k, const Ctx& c, float (&f)[VEC],
                                                float (&g)[VEC]) {
  unpack(r.f[k], f);
  if (c.has(kHasTeacher)) {
    unpack(r.g[k], g);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) g[e] = 0.0f;
  }
}

// Calls fn(k, col, f, g, lc, w) for each vector k < V of this thread's columns of the row whose scores `cur`
// holds (first column col, in the row), with its scores, teacher values, log c and w as floats (log_c and
// w_c: the per-class arrays, or nullptr).
template <typename T, int VEC, int V, typename Fn>
__device__ __forceinline__ void for_resident_vectors(const ResidentRow<T, VEC, V>& cur, int64_t m, const Ctx& c,
                                                     const float* log_c, const float* w_c, int team, int t, Fn&& fn) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t col = (static_cast<int64_t>(k) * team + t) * VEC;
    if (col < m) {
      float f[VEC], g[VEC], lc[VEC], w[VEC];
      resident_scores(cur, k, c, f, g);
      load_class_floats(log_c, col, 0.0f, lc);
      load_class_floats(w_c, col, 1.0f, w);
      fn(k, col, f, g, lc, w);
    }
  }
}

// Pass A of a resident row: the state of this thread's columns of the row whose scores `cur` holds.
template <typename T, int VEC, int V>
__device__ __forceinline__ RowState resident_state(const ResidentRow<T, VEC, V>& cur, const FusedParams<T>& p,
                                                   const Ctx& c, int team, int t) {
  RowState st = empty_state(c);
  for_resident_vectors(cur, p.m, c, p.log_c, p.w, team, t,
                       [&](int, int64_t col, const float(&f)[VEC], const float(&g)[VEC], const float(&lc)[VEC],
                           const float(&w)[VEC]) { accumulate(st, f, g, lc, w, col, cur.in.R, c); });
  return st;
}

// Pass B of a resident row: its gradient columns (stored when needed) and their statistics, added to this
// thread's shared-memory slots `mine` (see resident_kernel).
template <typename T, int VEC, int V>
__device__ __forceinline__ void resident_outputs(ResidentRow<T, VEC, V>& cur, const FusedParams<T>& p, const Ctx& c,
                                                 const RowScalars& rs, int64_t row, int team, int t, float* mine) {
  T* out = c.has(kNeedGrad) ? p.grad + row * p.m : nullptr;
  const float* log_c = launder_ptr(p.log_c);
  const float* w_c = launder_ptr(p.w);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    launder(cur.f[k]);
    launder(cur.g[k]);
  }
  for_resident_vectors(cur, p.m, c, log_c, w_c, team, t,
                       [&](int k, int64_t col, const float(&f)[VEC], const float(&g)[VEC], const float(&lc)[VEC],
                           const float(&w)[VEC]) {
                         Pack<T, VEC> o;
#pragma unroll
                         for (int e = 0; e < VEC; ++e) {
                           const ElementOut eo = element(rs, c, static_cast<int>(col) + e, f[e], g[e], lc[e], w[e]);
                           o.v[e] = from_float<T>(eo.grad);
                           float* slot = mine + (k * VEC + e) * team;
                           slot[0] += eo.q;
                           slot[V * VEC * team] += eo.risk;
                           slot[2 * V * VEC * team] += eo.error;
                         }
                         if (c.has(kNeedGrad)) store_pack<T, VEC>(out + col, o);
                       });
}

// A resident block's partial statistics: the sum over its teams of every column's slots, into row blockIdx.x
// of the [parts][3][m] workspace.
template <int VEC, int V>
__device__ __forceinline__ void store_block_stats(const float* stats_smem, float* stats, int64_t m, int team,
                                                  int teams, int slots) {
  __syncthreads();
  float* part = stats + static_cast<int64_t>(blockIdx.x) * kStatCount * m;
  for (int i = threadIdx.x; i < slots; i += blockDim.x) {
    const int tt = i % team;
    const int e = (i / team) % VEC;
    const int k = (i / (team * VEC)) % V;
    const int s = i / (team * VEC * V);
    const int64_t col = (static_cast<int64_t>(k) * team + tt) * VEC + e;
    if (col < m) {
      float sum = 0.0f;
      for (int j = 0; j < teams; ++j) sum += stats_smem[j * slots + i];
      part[s * m + col] = sum;
    }
  }
}

// Dynamic shared memory: per team, 3 x V x VEC x team floats of statistics, slot ((s V + k) VEC + e) team + t
// for statistic s, vector k, element e of team thread t (consecutive threads, consecutive words); then,
// with asynchronous copies, the rings of f and g: kResidentStages x V x blockDim vectors each.
// Each team walks rows team_index, team_index + teams in the grid, ...; the rows after the current one are
// loaded while it is reduced (kResidentStages - 1 ahead with asynchronous copies, else one ahead).
template <typename T, int VEC, int V>
__global__ void __launch_bounds__(kResidentMaxThreads) resident_kernel(const FusedParams<T> p) {
  extern __shared__ float4 resident_smem[];
  __shared__ RowState scratch[2][kResidentMaxWarps];
  float* const stats_smem = reinterpret_cast<float*>(resident_smem);
  const Ctx c = p.ctx;
  const int team = p.team;
  const int t = threadIdx.x % team;
  const int team_id = threadIdx.x / team;
  const int teams = blockDim.x / team;
  const int slots = kStatCount * V * VEC * team;
  float* mine = stats_smem + team_id * slots + t;
  for (int i = 0; i < kStatCount * V * VEC; ++i) mine[i * team] = 0.0f;
  // The gradient's scale, read once per block into shared memory: a per-row read of the device scalar kept a
  // register live across the row loop and made resident_kernel<float, 4, 1> spill.
  __shared__ float grad_scale;
  if (threadIdx.x == 0) grad_scale = grad_scale_of(p);
  __syncthreads();
  const bool teacher = c.has(kHasTeacher);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * teams + team_id;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * teams;

  int buf = 0;
  // Loss, gradient and statistics of one row whose scores `cur` holds.
  auto process = [&](int64_t row, ResidentRow<T, VEC, V>& cur) {
    RowState st = resident_state(cur, p, c, team, t);
    team_allreduce(st, scratch[buf], team, c);
    buf ^= 1;
    float loss;
    const RowScalars rs = finish_row(st, cur.in, c, grad_scale, loss);
    if (t == 0) p.loss[row] = loss;
    resident_outputs(cur, p, c, rs, row, team, t, mine);
  };

  if constexpr (kAsyncCopies<T, VEC>) {
    // Row i of this team's walk is first + i * stride, in ring stage i % kResidentStages; the slot of
    // (stage s, vector k) of a thread is (s V + k) blockDim + threadIdx (consecutive threads, consecutive slots).
    Pack<T, VEC>* const ring_f = reinterpret_cast<Pack<T, VEC>*>(stats_smem + teams * slots);
    Pack<T, VEC>* const ring_g = ring_f + kResidentStages * V * blockDim.x;
    auto slot = [&](Pack<T, VEC>* ring, int64_t i, int k) -> Pack<T, VEC>& {
      return ring[((i % kResidentStages) * V + k) * blockDim.x + threadIdx.x];
    };
    auto issue = [&](int64_t i) {
      const int64_t row = first + i * stride;
      if (row < p.rows) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const int64_t col = (static_cast<int64_t>(k) * team + t) * VEC;
          if (col < p.m) {
            copy_async(&slot(ring_f, i, k), p.f + row * p.m + col);
            if (teacher) copy_async(&slot(ring_g, i, k), p.g + row * p.m + col);
          }
        }
      }
      __pipeline_commit();
    };
    for (int i = 0; i < kResidentStages - 1; ++i) issue(i);
    for (int64_t i = 0; first + i * stride < p.rows; ++i) {
      const int64_t row = first + i * stride;
      issue(i + kResidentStages - 1);  // into the stage of row i - 1, whose scores are in registers by now
      ResidentRow<T, VEC, V> cur;
      cur.in = load_row_inputs(p, row);
      __pipeline_wait_prior(kResidentStages - 1);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        cur.f[k] = slot(ring_f, i, k);
        if (teacher) cur.g[k] = slot(ring_g, i, k);
      }
      process(row, cur);
    }
    __pipeline_wait_prior(0);
  } else {
    ResidentRow<T, VEC, V> cur;
    if (first < p.rows) load_resident_row(cur, p, first, team, t);
    for (int64_t row = first; row < p.rows; row += stride) {
      ResidentRow<T, VEC, V> next;
      if (row + stride < p.rows) load_resident_row(next, p, row + stride, team, t);
      process(row, cur);
      cur = next;
    }
  }

  store_block_stats<VEC, V>(stats_smem, p.stats, p.m, team, teams, slots);
}

// ---- streaming path ------------------------------------------------------------------------------------
// Pass 1: the row state of columns [split * split_cols, (split + 1) * split_cols) of one row.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads) stream_rows_kernel(const FusedParams<T> p) {
  __shared__ RowState scratch[kRowThreads / kWarpSize];
  const Ctx c = p.ctx;
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const bool teacher = c.has(kHasTeacher);
  const T* frow = p.f + row * p.m;
  const T* grow = teacher ? p.g + row * p.m : nullptr;
  const float R = row_reference(frow);
  const int64_t begin = split * p.split_cols;
  const int64_t end = begin + p.split_cols < p.m ? begin + p.split_cols : p.m;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t first = begin + static_cast<int64_t>(threadIdx.x) * VEC;
  RowState st = empty_state(c);
  auto add = [&](const Pack<T, VEC>& fp, const Pack<T, VEC>& gp, int64_t col) {
    float f[VEC], g[VEC], lc[VEC], w[VEC];
    unpack(fp, f);
    unpack(gp, g);
    load_class_floats(p.log_c, col, 0.0f, lc);
    load_class_floats(p.w, col, 1.0f, w);
    accumulate(st, f, g, lc, w, col, R, c);
  };
  if constexpr (kAsyncCopies<T, VEC>) {
    __shared__ Pack<T, VEC> ring_f[kRowStages][kRowThreads];
    __shared__ Pack<T, VEC> ring_g[kRowStages][kRowThreads];
    const int t = threadIdx.x;
    // Vector i of this thread is at column first + i * step, in slot i % kRowStages.
    auto issue = [&](int64_t i) {
      const int64_t col = first + i * step;
      if (col < end) {
        copy_async(&ring_f[i % kRowStages][t], frow + col);
        if (teacher) copy_async(&ring_g[i % kRowStages][t], grow + col);
      }
      __pipeline_commit();  // one group per vector, empty past the end, so the counts below hold
    };
    for (int i = 0; i < kRowStages - 1; ++i) issue(i);
    for (int64_t i = 0; first + i * step < end; ++i) {
      issue(i + kRowStages - 1);  // into the slot read in iteration i - 1
      __pipeline_wait_prior(kRowStages - 1);
      const Pack<T, VEC> fp = ring_f[i % kRowStages][t];
      Pack<T, VEC> gp{};
      if (teacher) gp = ring_g[i % kRowStages][t];
      add(fp, gp, first + i * step);
    }
    __pipeline_wait_prior(0);
  } else {
    Pack<T, VEC> fn{};
    Pack<T, VEC> gn{};
    if (first < end) {
      fn = load_pack<T, VEC>(frow + first);
      if (teacher) gn = load_pack<T, VEC>(grow + first);
    }
    for (int64_t col = first; col < end; col += step) {
      const Pack<T, VEC> fp = fn;
      const Pack<T, VEC> gp = gn;
      if (col + step < end) {
        fn = load_pack<T, VEC>(frow + col + step);
        if (teacher) gn = load_pack<T, VEC>(grow + col + step);
      }
      add(fp, gp, col);
    }
  }
  team_allreduce(st, scratch, blockDim.x, c);
  if (threadIdx.x == 0) p.states[row * p.splits + split] = st;
}

// Merges a row's splits (in split order), writes its loss and the scalars pass 2 needs.
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads) finalize_rows_kernel(const FusedParams<T> p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.rows) return;
  const Ctx c = p.ctx;
  RowState st = p.states[row * p.splits];
  for (int s = 1; s < p.splits; ++s) merge(st, p.states[row * p.splits + s], c);
  const RowInputs ri = load_row_inputs(p, row);
  float loss;
  p.scalars[row] = finish_row(st, ri, c, grad_scale_of(p), loss);
  p.loss[row] = loss;
}

// Pass 2: block (tile, group) owns columns [tile * blockDim * VEC, ...) and rows group, group + groups, ...
// Each thread has one vector of columns; kTileStages of its rows are in flight at a time.
template <typename T, int VEC>
__global__ void __launch_bounds__(kTileThreads) stream_tiles_kernel(const FusedParams<T> p) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= p.m) return;  // no barrier in this kernel
  const Ctx c = p.ctx;
  const bool teacher = c.has(kHasTeacher);
  const bool need_grad = c.has(kNeedGrad);
  float lc[VEC], w[VEC];
  load_class_floats(p.log_c, col, 0.0f, lc);
  load_class_floats(p.w, col, 1.0f, w);
  float mass[VEC], risk[VEC], error[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    mass[e] = 0.0f;
    risk[e] = 0.0f;
    error[e] = 0.0f;
  }
  const int64_t stride = gridDim.y;
  const T* fcol = p.f + col;
  const T* gcol = teacher ? p.g + col : nullptr;
  auto compute = [&](int64_t row, const Pack<T, VEC>& fp, const Pack<T, VEC>& gp) {
    const RowScalars rs = p.scalars[row];
    float f[VEC], g[VEC];
    unpack(fp, f);
    unpack(gp, g);
    Pack<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const ElementOut eo = element(rs, c, static_cast<int>(col) + e, f[e], g[e], lc[e], w[e]);
      o.v[e] = from_float<T>(eo.grad);
      mass[e] += eo.q;
      risk[e] += eo.risk;
      error[e] += eo.error;
    }
    if (need_grad) store_pack<T, VEC>(p.grad + row * p.m + col, o);
  };
  if constexpr (kAsyncCopies<T, VEC>) {
    __shared__ Pack<T, VEC> ring_f[kTileStages][kTileThreads];
    __shared__ Pack<T, VEC> ring_g[kTileStages][kTileThreads];
    const int t = threadIdx.x;
    // Row i of this thread's walk is blockIdx.y + i * stride, in slot i % kTileStages. A row's gradient
    // store is issued after its copy has completed, so writing the gradient over the student is safe.
    auto issue = [&](int64_t i) {
      const int64_t row = blockIdx.y + i * stride;
      if (row < p.rows) {
        copy_async(&ring_f[i % kTileStages][t], fcol + row * p.m);
        if (teacher) copy_async(&ring_g[i % kTileStages][t], gcol + row * p.m);
      }
      __pipeline_commit();
    };
    for (int i = 0; i < kTileStages - 1; ++i) issue(i);
    for (int64_t i = 0; blockIdx.y + i * stride < p.rows; ++i) {
      issue(i + kTileStages - 1);  // into the slot read in iteration i - 1
      __pipeline_wait_prior(kTileStages - 1);
      const Pack<T, VEC> fp = ring_f[i % kTileStages][t];
      Pack<T, VEC> gp{};
      if (teacher) gp = ring_g[i % kTileStages][t];
      compute(blockIdx.y + i * stride, fp, gp);
    }
    __pipeline_wait_prior(0);
  } else {
    int64_t row = blockIdx.y;
    Pack<T, VEC> fn{};
    Pack<T, VEC> gn{};
    if (row < p.rows) {
      fn = load_pack<T, VEC>(fcol + row * p.m);
      if (teacher) gn = load_pack<T, VEC>(gcol + row * p.m);
    }
    for (; row < p.rows; row += stride) {
      const Pack<T, VEC> fp = fn;
      const Pack<T, VEC> gp = gn;
      if (row + stride < p.rows) {  // the next row, loaded before this row's gradient is stored
        fn = load_pack<T, VEC>(fcol + (row + stride) * p.m);
        if (teacher) gn = load_pack<T, VEC>(gcol + (row + stride) * p.m);
      }
      compute(row, fp, gp);
    }
  }
  float* part = p.stats + static_cast<int64_t>(blockIdx.y) * kStatCount * p.m + col;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    part[e] = mass[e];
    part[p.m + e] = risk[e];
    part[2 * p.m + e] = error[e];
  }
}

// ---- second stage: column sums of the partial statistics ----------------------------------------------
// out_s[j] = sum over partials of parts[partial][s][j], each column summed by one thread strand in a
// fixed order, then the kColsumLanes strands in a fixed order: deterministic.
__global__ void __launch_bounds__(kColsumColumns* kColsumLanes)
    column_sum_kernel(const float* __restrict__ parts, int64_t count, int64_t m, float* __restrict__ mass,
                      float* __restrict__ risk, float* __restrict__ error) {
  __shared__ float partial[kColsumLanes][kColsumColumns + 1];
  const int64_t width = kStatCount * m;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kColsumColumns + threadIdx.x;
  float sum = 0.0f;
  if (k < width) {
    for (int64_t j = threadIdx.y; j < count; j += kColsumLanes) sum += parts[j * width + k];
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && k < width) {
    float total = 0.0f;
#pragma unroll
    for (int l = 0; l < kColsumLanes; ++l) total += partial[l][threadIdx.x];
    const int64_t s = k / m;
    const int64_t col = k - s * m;
    float* out = s == 0 ? mass : (s == 1 ? risk : error);
    out[col] = total;
  }
}

// ---- scale_rows ------------------------------------------------------------------------------------------
template <typename T, int VEC>
__global__ void __launch_bounds__(kScaleThreads)
    scale_rows_kernel(T* grad, const float* __restrict__ go, int64_t cols) {
  const int64_t row = blockIdx.x;
  const float scale = go[row];
  if (scale == 1.0f) return;  // multiplying by 1 changes nothing: skip the row's bytes entirely
  T* r = grad + row * cols;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kScaleThreads * kScaleVectorsPerThread * VEC;
  Pack<T, VEC> x[kScaleVectorsPerThread];
#pragma unroll
  for (int k = 0; k < kScaleVectorsPerThread; ++k) {
    const int64_t col = begin + (static_cast<int64_t>(k) * blockDim.x + threadIdx.x) * VEC;
    // Zeros past the end: with x[k] left undefined there, ptxas spilled scale_rows_kernel<float, 4>.
    x[k] = col < cols ? load_pack<T, VEC>(r + col) : Pack<T, VEC>{};
  }
#pragma unroll
  for (int k = 0; k < kScaleVectorsPerThread; ++k) {
    const int64_t col = begin + (static_cast<int64_t>(k) * blockDim.x + threadIdx.x) * VEC;
    if (col < cols) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[k].v[e] = from_float<T>(to_float(x[k].v[e]) * scale);
      store_pack<T, VEC>(r + col, x[k]);
    }
  }
}

// ---- host side ------------------------------------------------------------------------------------------
void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rkd CUDA kernels: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

int element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

bool aligned(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kVectorBytes == 0; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

size_t round_up_bytes(size_t n) { return (n + 255) / 256 * 256; }

using Plan = LaunchPlan;

// Calls fn(std::integral_constant<int, V>) for the resident vectors-per-thread V of a plan; only the
// V with V * VEC <= kResidentMaxElements are instantiated.
template <int VEC, typename Fn>
void with_vectors(int vectors, Fn&& fn) {
  static_assert(kResidentMaxElements == 8, "with_vectors lists V = 1, 2, 4, 8");
  if constexpr (VEC == 1) {
    switch (vectors) {
      case 1:
        return fn(std::integral_constant<int, 1>{});
      case 2:
        return fn(std::integral_constant<int, 2>{});
      case 4:
        return fn(std::integral_constant<int, 4>{});
      default:
        return fn(std::integral_constant<int, 8>{});
    }
  } else if constexpr (VEC == 4) {
    if (vectors == 1) return fn(std::integral_constant<int, 1>{});
    return fn(std::integral_constant<int, 2>{});
  } else {
    static_assert(VEC == 8, "16-byte vectors hold 4 or 8 elements");
    return fn(std::integral_constant<int, 1>{});
  }
}

template <typename T, int VEC>
const void* resident_function(int vectors) {
  const void* fn = nullptr;
  with_vectors<VEC>(vectors, [&](auto v) {
    fn = reinterpret_cast<const void*>(&resident_kernel<T, VEC, decltype(v)::value>);
  });
  return fn;
}

template <typename T>
const void* resident_function(int vec, int vectors) {
  constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
  return vec == 1 ? resident_function<T, 1>(vectors) : resident_function<T, kVec>(vectors);
}

template <typename T>
const void* tiles_function(int vec) {
  constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
  return vec == 1 ? reinterpret_cast<const void*>(&stream_tiles_kernel<T, 1>)
                  : reinterpret_cast<const void*>(&stream_tiles_kernel<T, kVec>);
}

const void* resident_function_for(DType dtype, int vec, int vectors) {
  switch (dtype) {
    case DType::kFloat32:
      return resident_function<float>(vec, vectors);
    case DType::kFloat16:
      return resident_function<__half>(vec, vectors);
    default:
      return resident_function<__nv_bfloat16>(vec, vectors);
  }
}

const void* tiles_function_for(DType dtype, int vec) {
  switch (dtype) {
    case DType::kFloat32:
      return tiles_function<float>(vec);
    case DType::kFloat16:
      return tiles_function<__half>(vec);
    default:
      return tiles_function<__nv_bfloat16>(vec);
  }
}

// Blocks of `fn` that fit on one multiprocessor of the current device (a runtime query). A block may use
// more than 48 KB of shared memory (static plus dynamic) only after its dynamic limit is raised; it is raised
// to the most any plan asks of a resident kernel (the same value from every thread, so concurrent callers
// cannot undo each other).
int query_occupancy(const void* fn, int threads, size_t smem, bool resident) {
  if (resident) {
    check_cuda(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, kResidentMaxSmem),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
  int blocks = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, fn, threads, smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (blocks < 1) {
    throw std::runtime_error("rkd CUDA kernels: a block of " + std::to_string(threads) + " threads with " +
                             std::to_string(smem) + " bytes of shared memory does not fit on this device");
  }
  return blocks;
}

// Whether every (B, m) array and per-class array of a call starts on a 16-byte boundary and m fills whole
// 16-byte vectors: then rows are read and written as 16-byte vectors.
bool rows_aligned(const FusedArgs& args) {
  const int full_vec = kVectorBytes / element_size(args.dtype);
  return args.classes % full_vec == 0 && aligned(args.student) && (args.teacher == nullptr || aligned(args.teacher)) &&
         (args.grad == nullptr || aligned(args.grad)) && (args.log_c == nullptr || aligned(args.log_c)) &&
         (args.w == nullptr || aligned(args.w));
}

void check_sizes(int64_t rows, int64_t m) {
  if (m < 1 || m > kMaxClasses) {
    throw std::invalid_argument("rkd CUDA kernels: the number of classes m must be in [1, " +
                                std::to_string(kMaxClasses) + "] (kMaxClasses), got " + std::to_string(m));
  }
  if (rows < 0 || rows > INT_MAX) {
    throw std::invalid_argument("rkd CUDA kernels: the number of rows must be in [0, " + std::to_string(INT_MAX) +
                                "], got " + std::to_string(rows));
  }
}

// The one place that picks the path, block sizes, grids and workspace for a call: a pure function of the
// dtype, B, m, the rows' alignment, the device's multiprocessor count `sms` and `occupancy(fn, threads,
// smem, resident)`, the blocks of kernel `fn` that fit on one multiprocessor.
template <typename Occupancy>
Plan make_plan(DType dtype, int64_t B, int64_t m, bool rows_are_aligned, int sms, Occupancy&& occupancy) {
  check_sizes(B, m);
  Plan plan;
  plan.dtype = dtype;
  plan.rows = B;
  plan.classes = m;
  const int full_vec = kVectorBytes / element_size(dtype);
  plan.vec = rows_are_aligned ? full_vec : 1;
  const int64_t vec = plan.vec;

  plan.resident = m <= static_cast<int64_t>(kResidentMaxThreads) * kResidentMaxElements;
  if (plan.resident) {
    const int max_vectors = kResidentMaxElements / plan.vec;  // V: 1 for 16-bit, 2 for fp32, 8 when unaligned
    auto vectors_for = [&](int64_t threads) {
      int v = 1;
      while (v < max_vectors && m > threads * v * vec) v *= 2;
      return v;
    };
    if (m <= static_cast<int64_t>(kWarpSize) * kResidentMaxElements) {
      plan.vectors = vectors_for(kWarpSize);  // narrow rows: one warp per row, several warps per block
      plan.team = kWarpSize;
      plan.threads = kWarpTeamBlock;
    } else {
      plan.vectors = vectors_for(kResidentMaxThreads);
      const int64_t threads = ceil_div(ceil_div(m, vec * plan.vectors), kWarpSize) * kWarpSize;
      plan.team = static_cast<int>(threads);
      plan.threads = static_cast<int>(threads);
    }
    plan.smem = sizeof(float) * kStatCount * plan.vectors * vec * plan.threads;
    if (plan.vec == full_vec) plan.smem += 2 * kResidentStages * plan.vectors * kVectorBytes * plan.threads;
    const int per_sm =
        occupancy(resident_function_for(dtype, plan.vec, plan.vectors), plan.threads, plan.smem, true);
    const int64_t teams_per_block = plan.threads / plan.team;
    plan.grid = std::min<int64_t>(ceil_div(B, teams_per_block), static_cast<int64_t>(sms) * per_sm);
    plan.parts = plan.grid;
    plan.stats_bytes = round_up_bytes(sizeof(float) * kStatCount * m * plan.parts);
    plan.workspace_bytes = plan.stats_bytes;
  } else {
    const int64_t min_cols = static_cast<int64_t>(kRowThreads) * vec * kRowMinVectorsPerThread;
    const int64_t target = static_cast<int64_t>(sms) * kRowBlocksPerSm;
    int64_t splits = B > 0 ? std::max<int64_t>(1, std::min(ceil_div(target, B), ceil_div(m, min_cols))) : 1;
    splits = std::min<int64_t>(splits, kMaxGridY);
    const int64_t step = static_cast<int64_t>(kRowThreads) * vec;
    plan.split_cols = ceil_div(ceil_div(m, splits), step) * step;
    plan.splits = ceil_div(m, plan.split_cols);
    plan.tiles = ceil_div(m, static_cast<int64_t>(kTileThreads) * vec);
    const int per_sm = occupancy(tiles_function_for(dtype, plan.vec), kTileThreads, 0, false);
    // As many row groups as fill one wave of resident blocks, never more: each block walks its rows to the
    // end, so a partial second wave would take as long as the first.
    const int64_t groups = static_cast<int64_t>(sms) * per_sm / plan.tiles;
    plan.grid = B > 0 ? std::max<int64_t>(1, std::min({groups, B, static_cast<int64_t>(kMaxGridY)})) : 0;
    plan.parts = plan.grid;
    plan.stats_bytes = round_up_bytes(sizeof(float) * kStatCount * m * plan.parts);
    plan.states_offset = plan.stats_bytes;
    plan.scalars_offset = plan.states_offset + round_up_bytes(sizeof(RowState) * B * plan.splits);
    plan.workspace_bytes = plan.scalars_offset + round_up_bytes(sizeof(RowScalars) * B);
  }
  return plan;
}

// ---- the launch cache: device properties, occupancy and plans, each queried or computed once --------------
struct PlanKey {
  int device;
  DType dtype;
  int64_t rows, m;
  bool aligned;
  bool operator==(const PlanKey& o) const {
    return device == o.device && dtype == o.dtype && rows == o.rows && m == o.m && aligned == o.aligned;
  }
};

struct OccupancyKey {
  int device;
  const void* fn;
  int threads;
  size_t smem;
  bool operator==(const OccupancyKey& o) const {
    return device == o.device && fn == o.fn && threads == o.threads && smem == o.smem;
  }
};

inline size_t mix_hash(size_t h, size_t v) { return h ^ (v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2)); }

struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const {
    size_t h = std::hash<int64_t>()(k.rows);
    h = mix_hash(h, std::hash<int64_t>()(k.m));
    return mix_hash(h, static_cast<size_t>(k.device) * 8 + static_cast<size_t>(k.dtype) * 2 + (k.aligned ? 1 : 0));
  }
};

struct OccupancyKeyHash {
  size_t operator()(const OccupancyKey& k) const {
    size_t h = std::hash<const void*>()(k.fn);
    h = mix_hash(h, std::hash<size_t>()(k.smem));
    return mix_hash(h, static_cast<size_t>(k.device) * 2048 + static_cast<size_t>(k.threads));
  }
};

// Plans kept at most; past it the plans (not the device properties) are forgotten and recomputed as needed.
constexpr size_t kMaxCachedPlans = 4096;

struct LaunchCache {
  std::mutex mutex;  // guards everything below
  std::unordered_map<int, int> multiprocessors;  // device -> multiprocessor count
  std::unordered_map<OccupancyKey, int, OccupancyKeyHash> occupancy;  // -> blocks per multiprocessor
  std::unordered_map<PlanKey, Plan, PlanKeyHash> plans;
};

LaunchCache& launch_cache() {
  static LaunchCache cache;
  return cache;
}

int current_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// The plan of a call from the cache, computed (with the runtime queries it needs) on the first call only.
Plan cached_plan(const FusedArgs& args) {
  check_sizes(args.rows, args.classes);
  const int device = args.device >= 0 ? args.device : current_device();
  const PlanKey key{device, args.dtype, args.rows, args.classes, rows_aligned(args)};
  LaunchCache& cache = launch_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  const auto found = cache.plans.find(key);
  if (found != cache.plans.end()) return found->second;
  auto sms = cache.multiprocessors.find(device);
  if (sms == cache.multiprocessors.end()) {
    int count = 0;
    check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    sms = cache.multiprocessors.emplace(device, count).first;
  }
  auto occupancy = [&](const void* fn, int threads, size_t smem, bool resident) {
    const OccupancyKey okey{device, fn, threads, smem};
    auto it = cache.occupancy.find(okey);
    if (it == cache.occupancy.end()) {
      it = cache.occupancy.emplace(okey, query_occupancy(fn, threads, smem, resident)).first;
    }
    return it->second;
  };
  Plan plan = make_plan(args.dtype, args.rows, args.classes, key.aligned, sms->second, occupancy);
  plan.device = device;
  if (cache.plans.size() >= kMaxCachedPlans) cache.plans.clear();
  cache.plans.emplace(key, plan);
  return plan;
}

template <typename T>
FusedParams<T> make_params(const FusedArgs& args, const Plan& plan, void* workspace) {
  FusedParams<T> p;
  p.f = static_cast<const T*>(args.student);
  p.g = static_cast<const T*>(args.teacher);
  p.labels = args.labels;
  p.a = args.a;
  p.log_c = args.log_c;
  p.w = args.w;
  p.grad = static_cast<T*>(args.grad);
  p.loss = args.loss;
  p.rows = args.rows;
  p.m = args.classes;
  unsigned flags = 0;
  if (args.teacher != nullptr) flags |= kHasTeacher;
  if (args.teacher != nullptr && args.teacher_is_probs) flags |= kTeacherProbs;
  if (args.labels != nullptr) flags |= kHasLabels;
  if (args.tau == 1.0f) flags |= kTauIsOne;
  if (args.grad != nullptr) flags |= kNeedGrad;
  p.ctx.inv_gamma = 1.0f / args.gamma;
  p.ctx.tau = args.tau;
  p.ctx.inv_tau = 1.0f / args.tau;
  p.ctx.grad_scale = args.grad_scale;
  p.ctx.prob_tol = args.prob_tol;
  p.scale = args.scale;
  p.ignore_index = args.ignore_index;
  p.ctx.flags = flags;
  char* base = static_cast<char*>(workspace);
  p.stats = reinterpret_cast<float*>(base);
  p.states = plan.resident ? nullptr : reinterpret_cast<RowState*>(base + plan.states_offset);
  p.scalars = plan.resident ? nullptr : reinterpret_cast<RowScalars*>(base + plan.scalars_offset);
  p.split_cols = plan.split_cols;
  p.splits = static_cast<int>(plan.splits);
  p.team = plan.team;
  return p;
}

template <typename T, int VEC>
void launch_paths(const FusedParams<T>& p, const Plan& plan, cudaStream_t stream) {
  if (p.rows == 0) return;
  if (plan.resident) {
    const dim3 grid(static_cast<unsigned>(plan.grid));
    with_vectors<VEC>(plan.vectors, [&](auto v) {
      resident_kernel<T, VEC, decltype(v)::value><<<grid, plan.threads, plan.smem, stream>>>(p);
    });
    check_cuda(cudaGetLastError(), "launching resident_kernel");
    return;
  }
  const dim3 rows_grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(plan.splits));
  stream_rows_kernel<T, VEC><<<rows_grid, kRowThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "launching stream_rows_kernel");
  const dim3 finalize_grid(static_cast<unsigned>(ceil_div(p.rows, kFinalizeThreads)));
  finalize_rows_kernel<T><<<finalize_grid, kFinalizeThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "launching finalize_rows_kernel");
  const dim3 tiles_grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.grid));
  stream_tiles_kernel<T, VEC><<<tiles_grid, kTileThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "launching stream_tiles_kernel");
}

template <typename T>
void run_fused(const FusedArgs& args, const Plan& plan, void* workspace, cudaStream_t stream) {
  constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
  const FusedParams<T> p = make_params<T>(args, plan, workspace);
  if (plan.vec == 1) {
    launch_paths<T, 1>(p, plan, stream);
  } else {
    launch_paths<T, kVec>(p, plan, stream);
  }
  const dim3 block(kColsumColumns, kColsumLanes);
  const dim3 grid(static_cast<unsigned>(ceil_div(kStatCount * args.classes, kColsumColumns)));
  column_sum_kernel<<<grid, block, 0, stream>>>(p.stats, plan.parts, args.classes, args.mass, args.risk, args.error);
  check_cuda(cudaGetLastError(), "launching column_sum_kernel");
}

template <typename T>
void run_scale_rows(void* grad, const float* go, int64_t rows, int64_t cols, cudaStream_t stream) {
  constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
  const bool vectorised = cols % kVec == 0 && aligned(grad);
  const int64_t vec = vectorised ? kVec : 1;
  const int64_t chunks = ceil_div(cols, static_cast<int64_t>(kScaleThreads) * kScaleVectorsPerThread * vec);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
  T* g = static_cast<T*>(grad);
  if (vectorised) {
    scale_rows_kernel<T, kVec><<<grid, kScaleThreads, 0, stream>>>(g, go, cols);
  } else {
    scale_rows_kernel<T, 1><<<grid, kScaleThreads, 0, stream>>>(g, go, cols);
  }
  check_cuda(cudaGetLastError(), "launching scale_rows_kernel");
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    default:
      return "bfloat16";
  }
}

}  // namespace

LaunchPlan plan_fused_forward(const FusedArgs& args) { return cached_plan(args); }

void clear_launch_cache() {
  LaunchCache& cache = launch_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  cache.multiprocessors.clear();
  cache.occupancy.clear();
  cache.plans.clear();
}

void fused_forward(const FusedArgs& args, const LaunchPlan& plan, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream) {
  // The plan sizes the grids, the workspace and the vector accesses: it must be this call's.
  if (plan.rows != args.rows || plan.classes != args.classes || plan.dtype != args.dtype ||
      (plan.vec > 1 && !rows_aligned(args))) {
    throw std::invalid_argument("rkd CUDA kernels: the launch plan was made for other arguments (B, m, dtype or "
                                "alignment); pass plan_fused_forward(args)");
  }
  if (workspace_bytes < plan.workspace_bytes ||
      (plan.workspace_bytes > 0 && (workspace == nullptr || !aligned(workspace)))) {
    throw std::invalid_argument("rkd CUDA kernels: the workspace must hold " + std::to_string(plan.workspace_bytes) +
                                " bytes, 16-byte aligned; got " + std::to_string(workspace_bytes));
  }
  if (args.mass == nullptr || args.risk == nullptr || args.error == nullptr ||
      (args.rows > 0 && (args.student == nullptr || args.a == nullptr || args.loss == nullptr))) {
    throw std::invalid_argument(
        "rkd CUDA kernels: student, a, loss (when B > 0), mass, risk and error must not be null");
  }
  if (!(args.gamma > 0.0f) || !(args.tau > 0.0f)) {
    throw std::invalid_argument("rkd CUDA kernels: gamma and tau must be > 0");
  }
  switch (args.dtype) {
    case DType::kFloat32:
      run_fused<float>(args, plan, workspace, stream);
      break;
    case DType::kFloat16:
      run_fused<__half>(args, plan, workspace, stream);
      break;
    default:
      run_fused<__nv_bfloat16>(args, plan, workspace, stream);
      break;
  }
}

void scale_rows(DType dtype, void* grad, const float* go, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows < 0 || rows > INT_MAX || cols < 0) {
    throw std::invalid_argument("rkd CUDA kernels: scale_rows needs 0 <= rows <= INT_MAX and cols >= 0");
  }
  if (rows == 0 || cols == 0) return;
  if (ceil_div(cols, static_cast<int64_t>(kScaleThreads) * kScaleVectorsPerThread) > kMaxGridY) {
    throw std::invalid_argument("rkd CUDA kernels: scale_rows rows are too wide: " + std::to_string(cols));
  }
  switch (dtype) {
    case DType::kFloat32:
      run_scale_rows<float>(grad, go, rows, cols, stream);
      break;
    case DType::kFloat16:
      run_scale_rows<__half>(grad, go, rows, cols, stream);
      break;
    default:
      run_scale_rows<__nv_bfloat16>(grad, go, rows, cols, stream);
      break;
  }
}

std::string fused_forward_path(const FusedArgs& args) {
  const Plan plan = cached_plan(args);
  std::string s = std::string(dtype_name(args.dtype)) + " B=" + std::to_string(args.rows) +
                  " m=" + std::to_string(args.classes) + " vec=" + std::to_string(plan.vec) + ": ";
  if (plan.resident) {
    s += "resident, " + std::to_string(plan.grid) + " blocks x " + std::to_string(plan.threads) + " threads (" +
         (plan.team == kWarpSize ? std::string("a warp per row") : std::string("a block per row")) + "), " +
         std::to_string(plan.vectors) + " vectors per thread, " + std::to_string(plan.smem) + " B shared memory";
  } else {
    s += "streaming, pass 1 " + std::to_string(args.rows) + " x " + std::to_string(plan.splits) + " blocks x " +
         std::to_string(kRowThreads) + " threads, pass 2 " + std::to_string(plan.tiles) + " tiles x " +
         std::to_string(plan.grid) + " row groups x " + std::to_string(kTileThreads) + " threads";
  }
  s += ", workspace " + std::to_string(plan.workspace_bytes) + " B";
  return s;
}

}  // namespace rkd_cuda
