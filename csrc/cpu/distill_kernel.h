// Torch-free interface between the binding (distill_cpu.cpp) and the row kernels, which are compiled
// once per instruction set (distill_kernel_generic.cpp, distill_kernel_avx2.cpp, distill_kernel_avx512.cpp)
// from the template in distill_rows.h. Nothing here depends on compiler target flags, so every
// translation unit may include it.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

// Helpers of the row kernel that must be inlined into it (they split it along its passes at no cost).
#if defined(__GNUC__) || defined(__clang__)
#define RKD_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RKD_ALWAYS_INLINE inline
#endif

namespace rkd::cpu {

// Input dtypes, in the order of KernelTable's arrays.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3, kNumDTypes = 4 };

// Storage of one bfloat16 / IEEE half value (layout-compatible with c10::BFloat16 and c10::Half).
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

// Row padding of every scratch and accumulator buffer (a multiple of any vector width used).
constexpr int64_t kPad = 16;
// Default tiling (distill_cpu.cpp may change it for tests). Rows of up to kMaxSingleTile (padded)
// classes are held whole in per-thread scratch (at most 2 MiB of float): one pass over memory, and
// each exponential computed once. Wider rows are processed in tiles of kTile classes: an online
// max/sum pass, then a second pass that rereads the tile and recomputes its exponentials.
constexpr int64_t kMaxSingleTile = 131072;
constexpr int64_t kTile = 4096;
// Scratch buffers per thread, each of tile_len(...) accumulation-type values: u, e, exp(u), exp(u / tau).
constexpr int64_t kScratchBuffers = 4;

// Narrow rows (distill_narrow.h): calls with at most kNarrowMax classes (by default; distill_cpu.cpp may
// change it) take W rows at a time, one per vector lane, through kNarrowBuffers column blocks of
// round_up(m, kPad) x kNarrowLanes values of scratch (kNarrowLanes: the widest vector of any kernel).
constexpr int64_t kNarrowMax = 40;  // measured on AVX2 and AVX-512: beyond it the row kernel is as fast
constexpr int64_t kNarrowLimit = 1024;  // the largest narrow_max accepted (bounds the scratch)
constexpr int64_t kNarrowLanes = 16;
constexpr int64_t kNarrowBuffers = 8;

constexpr int64_t round_up(int64_t x, int64_t k) { return (x + k - 1) / k * k; }

// The float exponential of every row kernel, 2^y (generic::exp2_lane, and the same operations in the
// vector files): n = round(y) (adding kExp2Magic = 1.5 * 2^23 + 127 leaves n + 127 in the low mantissa
// bits), r = y - n (exact, |r| <= 1/2), 2^r by a degree-5 polynomial (Horner, kExp2C5 first), times 2^n
// made by shifting those bits into the exponent field. The coefficients are those of a fit of exp(x) on
// |x| <= ln(2)/2 for relative error, times ln(2)^k (max relative error about 1.9e-7). Callers scale
// their natural-log arguments by log2(e) with the multiply they need anyway (u log2 e, (g - r_g)
// log2(e) / gamma), so the exponential itself has no Cody-Waite reduction.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kExp2Magic = 12583039.0f;
constexpr float kExp2C1 = 0.6931470036506653f, kExp2C2 = 0.24022242426872253f, kExp2C3 = 0.05550733581185341f;
constexpr float kExp2C4 = 0.009671512991189957f, kExp2C5 = 0.001326472731307149f;
// exp2 gives exactly 0 below kExp2Lo (2^-126 is the smallest normal float: the subnormal range is
// flushed, and -inf gives 0); exp2_clamped raises its argument to kExp2Clamp first (2^-125 ~ 2.4e-38
// instead of 0 or a subnormal).
constexpr float kExp2Lo = -126.0f;
constexpr float kExp2Clamp = -125.0f;
// Flush-to-zero for the floating-point results of the calling thread while in scope (x86: MXCSR.FTZ;
// AArch64: FPCR.FZ), the caller's mode restored at the end. A result below the smallest normal float
// (2^-126 ~ 1.2e-38; 2^-1022 in float64) becomes 0 instead of a subnormal. Without it, a vector lane
// that produces a subnormal takes a microcode assist on many x86 cores (about 100 cycles): the padding
// lanes of a row's partial last vector (exp(u) clamped at 2^-125, times the gradient's row scale) did so
// on every row, a third of the kernel's time at m = 100, and a peaked softmax (logit spread beyond about
// 80) does so on most classes. Subnormal inputs are read as they are (no DAZ): the maxima and argmax of
// the logits stay exact. The kernels' results differ from unflushed ones by less than 2^-126 in absolute
// value, below anything the loss, its gradient or the statistics resolve.
class FlushToZero {
 public:
  FlushToZero() {
#if defined(__x86_64__) || defined(_M_X64)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | kFtz);
#elif defined(__aarch64__)
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_ | kFz));
#endif
  }
  ~FlushToZero() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_setcsr(saved_);
#elif defined(__aarch64__)
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  FlushToZero(const FlushToZero&) = delete;
  FlushToZero& operator=(const FlushToZero&) = delete;

 private:
#if defined(__x86_64__) || defined(_M_X64)
  static constexpr unsigned kFtz = 0x8000;  // MXCSR bit 15
  unsigned saved_ = 0;
#elif defined(__aarch64__)
  static constexpr uint64_t kFz = uint64_t(1) << 24;  // FPCR bit 24
  uint64_t saved_ = 0;
#endif
};

// Classes per tile for rows of m classes: the whole (padded) row, or `tile` (a multiple of kPad).
constexpr int64_t tile_len(int64_t m, int64_t max_single_tile, int64_t tile) {
  return round_up(m, kPad) <= max_single_tile ? round_up(m, kPad) : tile;
}

// One fused_forward call. Acc is float for float32/bfloat16/float16 inputs and double for float64.
// Every pointer is to contiguous row-major memory; row r of a (B, m) tensor starts at r * m.
struct FusedArgs {
  const void* student;    // (B, m) input dtype: f
  const void* teacher;    // (B, m) input dtype, or nullptr: g (logits) or p (probabilities)
  const int64_t* labels;  // (B,) or nullptr: y
  const void* a;          // (B,) Acc: weight of the teacher in q
  const void* log_c;      // (round_up(m, kPad),) Acc: log c, zero padded (all zero when there are no costs)
  const void* w;          // (round_up(m, kPad),) Acc: w, zero padded (ones on [0, m) when there are no weights)
  void* grad;             // (B, m) input dtype, or nullptr when need_grad is false
  void* loss;             // (B,) Acc
  int64_t rows;
  int64_t m;
  int64_t tile;  // classes per tile: tile_len(m, ...); == round_up(m, kPad) when rows are held whole
  double gamma;
  double tau;
  double grad_scale;
  int64_t ignore_index;  // rows whose label equals it are skipped: loss 0, a zero gradient row, no statistics
  double prob_tol;       // teacher probabilities: a row whose sum is off 1 by more (or with a negative entry)
                         // gets a NaN loss (rkd_engine.ops.checks.PROB_SUM_TOL for the input dtype)
  bool teacher_is_probs;
  bool need_grad;
  bool has_log_c;
  bool has_w;
  bool stream_grad;  // write the gradient with non-temporal stores (large outputs; aligned rows only)
  bool narrow;       // rows held whole and at most narrow_max classes: W rows at a time (distill_narrow.h)
};

// Per-thread workspace and per-class accumulators (Acc, round_up(m, kPad) each, zero on entry).
struct ChunkOut {
  void* scratch;  // kScratchBuffers * tile Acc, then (narrow calls) the narrow path's buffers
  void* mass;     // sum_i q_ij
  void* risk;     // sum_i q_ij (-log s_ij)
  void* hit;      // sum_i q_ij [argmax_k f_ik == j]   (error = mass - hit)
  int64_t bad_row;  // -1, or the first row of the chunk whose label is outside [0, m)
};

using RowsFn = void (*)(const FusedArgs& args, int64_t begin, int64_t end, ChunkOut& out);
using ScaleRowFn = void (*)(void* row, int64_t m, double scale);

struct KernelTable {
  const char* isa;
  RowsFn rows[kNumDTypes];
  ScaleRowFn scale_row[kNumDTypes];
};

// Portable kernels (every dtype, including float64); always present.
const KernelTable* generic_kernels();
// AVX2 + FMA + F16C kernels for float32/bfloat16/float16 (float64 entries are null); nullptr where the
// compiler cannot target x86-64 AVX2. The caller checks the running CPU before using them.
const KernelTable* avx2_kernels();
// AVX-512 (F, DQ, BW, VL) + FMA + F16C kernels, the same dtypes as avx2_kernels; nullptr where the compiler
// cannot target x86-64 AVX-512. The caller checks the running CPU before using them.
const KernelTable* avx512_kernels();

}  // namespace rkd::cpu
