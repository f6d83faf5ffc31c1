// The fused row kernel, written once over a vector-traits class VT and included (without include
// guard, on purpose) inside one namespace per instruction set: rkd::cpu::generic, rkd::cpu::avx2,
// rkd::cpu::avx512.
// The including file has already included <cmath>, <cstdint>, <cstring>, <limits>, <type_traits> and
// distill_kernel.h, and defined its traits classes. See distill_cpu.cpp for the math.
//
// VT provides: T (float or double), V (a vector of W values of T), W,
//   load/store (T*), set1, zero, add, sub, mul, fmadd(a, b, c) = a*b + c, fnmadd(a, b, c) = c - a*b,
//   max, gt_select(a, b, x, y) = (a > b ? x : y, false for NaN), exp2 (2^y for y <= 127: exact 0 below
//   kExp2Lo and for -inf, NaN propagated), exp2_clamped (y raised to kExp2Clamp first),
//   fma_if_pos(c, x, acc) = acc + (c > 0 ? c*x : 0), mul_if_nonzero(c, x) = (c != 0 ? c*x : 0; NaN c gives NaN),
//   one_lane(k, v) (v in lane k, 0 elsewhere), hsum, hmax, first_eq(p, n, v) (first k < n with p[k] == v),
//   first_lanes(x, k, v) (lanes >= k set to v),
//   load_in(const In*) / store_out(In*, V) converting W input values to and from T, store_out_partial
//   (the first count < W values), store_out_partial_stream (the same, whole aligned pieces non-temporal),
//   load_in_partial(p, count, pad) (count < W values read, the other lanes pad),
//   store_out_stream (non-temporal, aligned to stream_align<Out>() bytes) and stream_fence (orders those
//   stores before returning).

// Per-call constants of the row kernel.
template <class VT>
struct Consts {
  using T = typename VT::T;
  int64_t m;
  int64_t tile;    // classes per tile (a multiple of kPad)
  int64_t ntiles;  // 1: the whole row is held in scratch
  const T* lc;     // log c, zero padded
  const T* w;      // w, zero padded
  bool has_lc;
  T kg;  // log2(e) / gamma: the teacher's exponent (g - rg) / gamma in base 2
  T tau;
  T inv_tau;
  T kt;  // log2(e) / tau
  T gs;  // grad_scale
};

// Tile k of a row: its first class, its length and that length padded to the vector width (the buffers
// hold kPad multiples; a whole vector of padding past the last partial one would only be extra work).
struct TileSpan {
  int64_t off;
  int64_t n;
  int64_t npad;
};

template <class VT>
RKD_ALWAYS_INLINE TileSpan tile_span(const Consts<VT>& c, int64_t k) {
  const int64_t off = k * c.tile;
  const int64_t n = c.m - off < c.tile ? c.m - off : c.tile;
  return {off, n, round_up(n, VT::W)};
}

// Running sums of pass A, in the frames described in distill_cpu.cpp.
template <class T>
struct Sums {
  T sz = 0;    // sum_j exp(u_j)
  T szt = 0;   // sum_j exp(u_j / tau)
  T sg = 0;    // sum_j e_j, e_j = exp((g_j - Rg) / gamma)   (unused for teacher probabilities: S_g = 1)
  T swg = 0;   // sum_j w_j e_j
  T swgu = 0;  // sum_{j: w_j e_j > 0} w_j e_j u_j (not kept where pass B sums the loss, see loss_in_b)
  T sneg = 0;  // teacher probabilities: sum_j max(-p_j, 0), > 0 when an entry is negative (sg is then sum_j p_j)
};

// Whether the loss of a teacher row is summed in pass B (tau = 1, no w): there it is sum_j q_j (L - u_j),
// the sum of the row's risk increments (q includes the label term), so pass A keeps no sum w e u.
template <bool Tau1, bool HasW>
inline constexpr bool loss_in_b() {
  return Tau1 && !HasW;
}

// log2(e) in T, to scale natural-log exponents for VT::exp2.
template <class T>
inline constexpr T log2e() {
  return static_cast<T>(1.44269504088896340736);
}

template <class T>
inline constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Converts one input value to T through the vector path (identical rounding to the vector loads).
template <class VT, class In>
inline typename VT::T scalar_in(const In* p) {
  In tmp[VT::W];
  std::memset(tmp, 0, sizeof(tmp));
  tmp[0] = *p;
  typename VT::T out[VT::W];
  VT::store(out, VT::load_in(tmp));
  return out[0];
}

// Whether tiles of n classes of In are read in place by the later passes (not copied to scratch):
// inputs of the accumulation type, except short tiles, where one pass over a copy costs less.
template <class VT, class In>
inline bool read_in_place(int64_t n) {
  return std::is_same<In, typename VT::T>::value && n >= 64;
}

// Reads one tile of an input row. Copy: dst[0, n) = src[0, n) as T (inputs of another dtype are
// converted once); otherwise only the last partial vector is copied (the rest is read in place by
// the later passes, see read_in_place). dst[n, npad) = pad in both cases (npad a multiple of W). WithMax: returns
// max_j src_j and, when lc is given, sets *zmax = max_j (src_j - lc_j) (the student's shift r, see
// row_kernel).
template <class VT, bool WithMax, bool Copy, bool HasLc, class In>
inline typename VT::T load_tile_impl(const In* src, int64_t n, int64_t npad, typename VT::T* dst, typename VT::T pad,
                                     const typename VT::T* lc, typename VT::T* zmax) {
  using T = typename VT::T;
  using V = typename VT::V;
  constexpr int W = VT::W;
  // Four independent maxima: one would make the loop wait on the latency of max.
  V vm0 = VT::set1(neg_inf<T>()), vm1 = vm0, vm2 = vm0, vm3 = vm0;
  V vz0 = vm0, vz1 = vm0, vz2 = vm0, vz3 = vm0;
  auto step = [&](int64_t jj, V& vm, V& vz) {
    const V x = VT::load_in(src + jj);
    if (Copy) VT::store(dst + jj, x);
    if (WithMax) vm = VT::max(vm, x);
    if (WithMax && HasLc) vz = VT::max(vz, VT::sub(x, VT::load(lc + jj)));
  };
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    step(j, vm0, vz0);
    step(j + W, vm1, vz1);
    step(j + 2 * W, vm2, vz2);
    step(j + 3 * W, vm3, vz3);
  }
  for (; j + W <= n; j += W) step(j, vm0, vz0);
  V vmax = VT::max(VT::max(vm0, vm1), VT::max(vm2, vm3));
  V vz = VT::max(VT::max(vz0, vz1), VT::max(vz2, vz3));
  // The partial last vector, its missing lanes set to pad, then whole vectors of pad.
  int64_t k = j;
  if (k < n) {
    VT::store(dst + k, VT::load_in_partial(src + k, n - k, pad));
    k += W;
  }
  for (; k < npad; k += W) VT::store(dst + k, VT::set1(pad));
  if (!WithMax) return T(0);
  for (; j < npad; j += W) {
    const V x = VT::load(dst + j);
    vmax = VT::max(vmax, x);
    if (HasLc) vz = VT::max(vz, VT::sub(x, VT::load(lc + j)));
  }
  if (HasLc) *zmax = VT::hmax(vz);
  return VT::hmax(vmax);
}

template <class VT, bool WithMax, class In>
inline typename VT::T load_tile(const In* src, int64_t n, int64_t npad, typename VT::T* dst, typename VT::T pad,
                                const typename VT::T* lc, typename VT::T* zmax) {
  if (read_in_place<VT, In>(n)) {
    return lc != nullptr ? load_tile_impl<VT, WithMax, false, true>(src, n, npad, dst, pad, lc, zmax)
                         : load_tile_impl<VT, WithMax, false, false>(src, n, npad, dst, pad, lc, zmax);
  }
  return lc != nullptr ? load_tile_impl<VT, WithMax, true, true>(src, n, npad, dst, pad, lc, zmax)
                       : load_tile_impl<VT, WithMax, true, false>(src, n, npad, dst, pad, lc, zmax);
}

// load_tile of a student and a teacher-logit tile together, both read in place (read_in_place), in one
// loop: the same maxima (returned in tf, tz and tg) and the same scratch tails (U and E padded with
// -inf), with both rows' memory streams in flight at once.
template <class VT, bool HasLc>
inline void load_tiles_fg(const typename VT::T* f, const typename VT::T* g, int64_t n, int64_t npad,
                          typename VT::T* U, typename VT::T* E, const typename VT::T* lc, typename VT::T* tf,
                          typename VT::T* tz, typename VT::T* tg) {
  using T = typename VT::T;
  using V = typename VT::V;
  constexpr int W = VT::W;
  const T ninf = neg_inf<T>();
  V mf0 = VT::set1(ninf), mf1 = mf0, mz0 = mf0, mz1 = mf0, mg0 = mf0, mg1 = mf0;
  auto step = [&](const T* fp, const T* gp, const T* lp, V& mf, V& mz, V& mg) {
    const V x = VT::load(fp);
    mf = VT::max(mf, x);
    if (HasLc) mz = VT::max(mz, VT::sub(x, VT::load(lp)));
    mg = VT::max(mg, VT::load(gp));
  };
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    step(f + j, g + j, lc + j, mf0, mz0, mg0);
    step(f + j + W, g + j + W, lc + j + W, mf1, mz1, mg1);
  }
  if (j + W <= n) {
    step(f + j, g + j, lc + j, mf0, mz0, mg0);
    j += W;
  }
  int64_t k = j;
  if (k < n) {
    VT::store(U + k, VT::load_in_partial(f + k, n - k, ninf));
    VT::store(E + k, VT::load_in_partial(g + k, n - k, ninf));
    k += W;
  }
  for (; k < npad; k += W) {
    VT::store(U + k, VT::set1(ninf));
    VT::store(E + k, VT::set1(ninf));
  }
  for (; j < npad; j += W) step(U + j, E + j, lc + j, mf0, mz0, mg0);
  *tf = VT::hmax(VT::max(mf0, mf1));
  if (HasLc) *tz = VT::hmax(VT::max(mz0, mz1));
  *tg = VT::hmax(VT::max(mg0, mg1));
}

// The exponential pass over vectors [j0, j1) of one tile: u = (f - r) - lc, exp(u), exp(u / tau) and
// the teacher's e = exp((g - rg) / gamma) (or e = p for probabilities), all as VT::exp2 of the exponent
// times log2(e) (kg = log2(e) / gamma, kt = log2(e) / tau), reading f and g from f_in,
// g_in (the input row in place, or the scratch copies U, E). Acc: add the sums to `out`. StoreU: write
// u to U and e to E. StoreS: write exp(u) to S and exp(u / tau) to St. u <= 0 up to rounding, so the
// student exponentials are clamped below at the underflow threshold instead of masked (2^-125 ~ 2e-38
// instead of 0 changes nothing that matters, and -log s uses u itself); the teacher's are masked so
// that -inf logits give p = 0 exactly. PfElem > 0: every vector also prefetches the same classes of
// pf_f and pf_g, the next row (PfElem bytes per class), so that memory is read while this row is
// computed; one row ahead, no further (a wide row would otherwise evict its own scratch).
template <class VT, bool Soft, bool Probs, bool Tau1, bool HasW, bool Acc, bool StoreU, bool StoreS,
          int PfElem = 0>
inline void tile_exp(const typename VT::T* f_in, const typename VT::T* g_in, typename VT::T* U, typename VT::T* E,
                     typename VT::T* S, typename VT::T* St, const typename VT::T* lc, const typename VT::T* w,
                     int64_t j0, int64_t j1, typename VT::T r, typename VT::T rg,
                     typename VT::T kg, typename VT::T kt, Sums<typename VT::T>& out,
                     const char* pf_f = nullptr, const char* pf_g = nullptr) {
  using T = typename VT::T;
  using V = typename VT::V;
  const V vr = VT::set1(r), vrg = VT::set1(rg), vkg = VT::set1(kg);
  const V vkt = VT::set1(kt), vl2e = VT::set1(log2e<T>());
  V sz = VT::zero(), szt = VT::zero(), sg = VT::zero(), swg = VT::zero(), swgu = VT::zero(), sneg = VT::zero();
  const V one = VT::set1(T(1));
  for (int64_t j = j0; j < j1; j += VT::W) {
    if (PfElem > 0) {
      __builtin_prefetch(pf_f + j * PfElem, 0, 3);
      if (Soft) __builtin_prefetch(pf_g + j * PfElem, 0, 3);
    }
    const V u = VT::sub(VT::sub(VT::load(f_in + j), vr), VT::load(lc + j));
    const V eu = VT::exp2_clamped(VT::mul(u, vl2e));
    if (Acc) sz = VT::add(sz, eu);
    if (StoreU) VT::store(U + j, u);
    if (StoreS) VT::store(S + j, eu);
    if (!Tau1) {
      const V eut = VT::exp2_clamped(VT::mul(u, vkt));
      if (Acc) szt = VT::add(szt, eut);
      if (StoreS) VT::store(St + j, eut);
    }
    if (Soft) {
      const V e = Probs ? VT::load(g_in + j) : VT::exp2(VT::mul(VT::sub(VT::load(g_in + j), vrg), vkg));
      if (StoreU) VT::store(E + j, e);
      if (Acc) {
        // Probabilities: sg sums p and sneg the negative parts, the row's validity (probs_row_ok).
        sg = VT::add(sg, e);
        if (Probs) sneg = VT::fma_if_pos(VT::sub(VT::zero(), e), one, sneg);
        const V we = HasW ? VT::mul(VT::load(w + j), e) : e;
        if (HasW || Probs) swg = VT::add(swg, we);
        if (!loss_in_b<Tau1, HasW>()) swgu = VT::fma_if_pos(we, u, swgu);
      }
    }
  }
  if (Acc) {
    out.sz += VT::hsum(sz);
    if (!Tau1) out.szt += VT::hsum(szt);
    if (Soft) {
      const T tsg = VT::hsum(sg);
      out.sg += tsg;
      if (Probs) out.sneg += VT::hsum(sneg);
      out.swg += (HasW || Probs) ? VT::hsum(swg) : tsg;
      if (!loss_in_b<Tau1, HasW>()) out.swgu += VT::hsum(swgu);
    }
  }
}

// tile_exp over one tile of row (f, g) starting at class `off`: the whole vectors straight from the
// input row when it is of the accumulation type, the rest (and every vector otherwise) from the
// scratch copies U, E made by load_tile. Prefetch: the next row (see tile_exp).
template <class VT, class In, bool Soft, bool Probs, bool Tau1, bool HasW, bool Acc, bool StoreU, bool StoreS,
          bool Prefetch = false>
inline void exp_pass(const In* f, const In* g, typename VT::T* scratch, const Consts<VT>& c, int64_t off, int64_t n,
                     int64_t npad, typename VT::T re, typename VT::T rge, Sums<typename VT::T>& s,
                     const char* pf_f = nullptr, const char* pf_g = nullptr) {
  using T = typename VT::T;
  T* U = scratch;
  T* E = U + c.tile;
  T* S = E + c.tile;
  T* St = S + c.tile;
  const int64_t direct = read_in_place<VT, In>(n) ? n / VT::W * VT::W : 0;
  if (direct > 0) {
    const T* f_in = reinterpret_cast<const T*>(f + off);
    const T* g_in = Soft ? reinterpret_cast<const T*>(g + off) : nullptr;
    tile_exp<VT, Soft, Probs, Tau1, HasW, Acc, StoreU, StoreS, Prefetch ? int(sizeof(In)) : 0>(
        f_in, g_in, U, E, S, St, c.lc + off, c.w + off, 0, direct, re, rge, c.kg, c.kt, s, pf_f, pf_g);
  }
  tile_exp<VT, Soft, Probs, Tau1, HasW, Acc, StoreU, StoreS, Prefetch ? int(sizeof(In)) : 0>(
      U, E, U, E, S, St, c.lc + off, c.w + off, direct, npad, re, rge, c.kg, c.kt, s, pf_f, pf_g);
}

// A full vector of the gradient: a plain store, or a non-temporal one that bypasses the caches.
template <class VT, class Out>
inline void store_grad(Out* p, const typename VT::V& g, bool stream) {
  if (stream) {
    VT::store_out_stream(p, g);
  } else {
    VT::store_out(p, g);
  }
}

// The partial last vector of a gradient row (count < W values). Streaming: its whole aligned pieces
// go through non-temporal stores too (VT::store_out_partial_stream), so that no cache line is written
// both ways (a plain store into a line under non-temporal stores is costly).
template <class VT, class Out>
inline void store_grad_partial(Out* p, const typename VT::V& g, int64_t count, bool stream) {
  if (stream) {
    VT::store_out_partial_stream(p, g, count);
  } else {
    VT::store_out_partial(p, g, count);
  }
}

// Start of the W-vector holding position p of a tile of n values, or -1 when p is outside [0, n).
template <int W>
inline int64_t vector_start(int64_t p, int64_t n) {
  return p >= 0 && p < n ? p / W * W : -1;
}

// body(j, std::true_type{}) for the vectors starting at s0, s1, s2 (vector starts, or -1 for none) and
// body(j, std::false_type{}) for every other vector start j < n, in increasing j: the special cases
// (label column, argmax column, partial last vector) stay out of the main loop.
template <int W, class Body>
inline void for_vectors(int64_t n, int64_t s0, int64_t s1, int64_t s2, Body&& body) {
  int64_t sp[3] = {s0, s1, s2};
  for (int a = 0; a < 2; ++a) {
    for (int b = 0; b < 2 - a; ++b) {
      if (sp[b] > sp[b + 1]) {
        const int64_t t = sp[b];
        sp[b] = sp[b + 1];
        sp[b + 1] = t;
      }
    }
  }
  int64_t j = 0;
  for (int k = 0; k < 3; ++k) {
    if (sp[k] < j) continue;  // none (-1) or a duplicate
    for (; j < sp[k]; j += W) body(j, std::false_type{});
    body(j, std::true_type{});
    j += W;
  }
  for (; j < n; j += W) body(j, std::false_type{});
}

// Pointers of one row, shared by its passes.
template <class VT, class In>
struct RowIO {
  using T = typename VT::T;
  const In* f;
  const In* g;  // the teacher row (Soft), else nullptr
  In* grad;     // the gradient row (NeedGrad), else nullptr
  T* U;         // scratch: u (pass A), or the tile copy of f
  T* E;         // scratch: e (pass A), or the tile copy of g
  T* S;         // scratch: exp(u)
  T* St;        // scratch: exp(u / tau)
  T* mass;
  T* risk;
  T* hit;
  const char* pf_f;  // the next row, prefetched during pass A (single-tile rows)
  const char* pf_g;
  bool stream;  // non-temporal gradient stores
};

// What pass A leaves of a row: its maxima, argmax and sums.
template <class T>
struct RowA {
  T re = 0;       // r = max (f - lc) as rounded, the student's shift (0 for a row of -inf)
  T rge = 0;      // max g, the teacher's shift (0 for a row of -inf)
  bool empty;     // the student row is -inf everywhere (after log c)
  int64_t am = 0;  // argmax f, first index on ties
  Sums<T> s;
};

// Pass A's reads of one tile of the row: tf = max f, tz = max (f - lc) (with log c), tg = max g (teacher
// logits), and the scratch copies U, E that exp_pass reads where the row is not read in place.
template <class VT, class In, bool Soft, bool Probs>
RKD_ALWAYS_INLINE void pass_a_load(const RowIO<VT, In>& io, const Consts<VT>& c, int64_t off, int64_t n,
                                   int64_t npad, typename VT::T& tf, typename VT::T& tz, typename VT::T& tg) {
  using T = typename VT::T;
  const T ninf = neg_inf<T>();
  if (Soft && !Probs && read_in_place<VT, In>(n)) {
    const T* ft = reinterpret_cast<const T*>(io.f + off);
    const T* gt = reinterpret_cast<const T*>(io.g + off);
    if (c.has_lc) {
      load_tiles_fg<VT, true>(ft, gt, n, npad, io.U, io.E, c.lc + off, &tf, &tz, &tg);
    } else {
      load_tiles_fg<VT, false>(ft, gt, n, npad, io.U, io.E, c.lc + off, &tf, &tz, &tg);
    }
    return;
  }
  tf = load_tile<VT, true>(io.f + off, n, npad, io.U, ninf, c.has_lc ? c.lc + off : nullptr, &tz);
  if (Soft) {
    if (Probs) {
      load_tile<VT, false>(io.g + off, n, npad, io.E, T(0), nullptr, nullptr);
    } else {
      tg = load_tile<VT, true>(io.g + off, n, npad, io.E, ninf, nullptr, nullptr);
    }
  }
}

// Pass A: maxima, argmax and the sums, tile by tile (online rescaling across tiles). Single-tile rows
// also store u, e and the exponentials in scratch for pass B.
template <class VT, class In, bool Soft, bool Probs, bool Tau1, bool NeedGrad, bool HasW>
RKD_ALWAYS_INLINE RowA<typename VT::T> pass_a(const RowIO<VT, In>& io, const Consts<VT>& c) {
  using T = typename VT::T;
  const T ninf = neg_inf<T>();
  // rf: max f (for the argmax); r: max (f - lc) as rounded, the student's shift; rg: max g.
  T rf = ninf, r = ninf, rg = ninf, re = 0, rge = 0;
  int64_t am = 0;
  Sums<T> s;
  for (int64_t k = 0; k < c.ntiles; ++k) {
    const TileSpan span = tile_span(c, k);
    const int64_t off = span.off, n = span.n, npad = span.npad;
    T tz = ninf;  // max_j (f_j - lc_j) over the tile
    T tf = ninf;
    T tg = ninf;
    pass_a_load<VT, In, Soft, Probs>(io, c, off, n, npad, tf, tz, tg);
    // Student frame: u = (f - r) - lc with r = max (f - lc) so far. Subtracting r before lc keeps
    // f - r exact for large logits; an error in r itself shifts every u alike and cancels in
    // -log s = L - u. A larger r in a later tile lowers every earlier u by du: rescale their sums.
    if (tf > rf) {
      am = off + VT::first_eq(read_in_place<VT, In>(n) ? reinterpret_cast<const T*>(io.f + off) : io.U, n, tf);
      rf = tf;
    }
    const T tr = c.has_lc ? tz : tf;
    if (tr > r) {
      if (r > ninf) {
        const T du = tr - r;
        s.sz *= std::exp(-du);
        if (!Tau1) s.szt *= std::exp(-du * c.inv_tau);
        s.swgu -= du * s.swg;
      }
      r = tr;
    }
    re = r > ninf ? r : T(0);
    if (Soft && !Probs) {
      const T rg_new = tg > rg ? tg : rg;
      if (rg > ninf && rg_new > rg) {
        const T sc = std::exp2((rg - rg_new) * c.kg);
        s.sg *= sc;
        s.swg *= sc;
        s.swgu *= sc;
      }
      rg = rg_new;
      rge = rg > ninf ? rg : T(0);
    }
    T* scratch = io.U;
    if (c.ntiles == 1) {
      exp_pass<VT, In, Soft, Probs, Tau1, HasW, true, true, NeedGrad, true>(io.f, io.g, scratch, c, off, n, npad, re,
                                                                            rge, s, io.pf_f, io.pf_g);
    } else {
      exp_pass<VT, In, Soft, Probs, Tau1, HasW, true, false, false>(io.f, io.g, scratch, c, off, n, npad, re, rge, s);
    }
  }
  RowA<T> out;
  out.re = re;
  out.rge = rge;
  out.empty = r == ninf;
  out.am = am;
  out.s = s;
  return out;
}

// Tile k of a row in pass B; a row of several tiles reloads the tile's student scores into U (a row of
// one tile still holds them from pass A).
template <class VT, class In>
RKD_ALWAYS_INLINE TileSpan pass_b_tile(const RowIO<VT, In>& io, const Consts<VT>& c, int64_t k) {
  const TileSpan span = tile_span(c, k);
  if (c.ntiles != 1) {
    load_tile<VT, false>(io.f + span.off, span.n, span.npad, io.U, neg_inf<typename VT::T>(), nullptr, nullptr);
  }
  return span;
}

// The per-row scalars of the loss and the gradient.
template <class T>
struct RowScalars {
  T L;    // log sum_j exp(u_j): -log s_j = L - u_j
  T Lt;   // log sum_j exp(u_j / tau)
  T isz;  // 1 / sum_j exp(u_j)
  T iszt;
  T isg;  // 1 / S_g (1 for probabilities)
  T wp;   // sum_j w_j p_j
  T hw;   // weight of the label term, 1 - a (0 without a label)
  T sw;   // weight of the teacher term, a (0 without a teacher)
  T w_y;
  T u_y;
};

template <class VT, class In, bool Soft, bool Probs, bool Tau1, bool HasW>
RKD_ALWAYS_INLINE RowScalars<typename VT::T> row_scalars(RowA<typename VT::T>& ra, const RowIO<VT, In>& io,
                                                         const Consts<VT>& c, typename VT::T a_i, int64_t y) {
  using T = typename VT::T;
  Sums<T>& s = ra.s;
  // A student row that is -inf everywhere (after log c) has no softmax: its loss and gradient row are NaN,
  // as on every backend (without this, the padding lanes' exponentials would make a finite sz).
  if (ra.empty) {
    s.sz = std::numeric_limits<T>::quiet_NaN();
    s.szt = s.sz;
  }
  RowScalars<T> rs;
  rs.L = std::log(s.sz);
  rs.Lt = Tau1 ? rs.L : std::log(s.szt);
  rs.isz = T(1) / s.sz;
  rs.iszt = Tau1 ? rs.isz : T(1) / s.szt;
  rs.isg = (Soft && !Probs) ? T(1) / s.sg : T(1);
  rs.wp = Soft ? s.swg * rs.isg : T(0);
  rs.hw = y >= 0 ? T(1) - a_i : T(0);
  rs.sw = Soft ? a_i : T(0);
  rs.w_y = y >= 0 ? (HasW ? c.w[y] : T(1)) : T(0);
  rs.u_y = 0;
  if (y >= 0) rs.u_y = c.ntiles == 1 ? io.U[y] : (scalar_in<VT>(io.f + y) - ra.re) - c.lc[y];
  return rs;
}

// Pass B of a row without a teacher term: q = hw e_y touches one class of the statistics; the gradient
// is gs hw w_y (s - e_y).
template <class VT, class In, bool NeedGrad>
RKD_ALWAYS_INLINE void hard_pass_b(const RowIO<VT, In>& io, const Consts<VT>& c, const RowA<typename VT::T>& ra,
                                   const RowScalars<typename VT::T>& rs, int64_t y) {
  using T = typename VT::T;
  using V = typename VT::V;
  constexpr int W = VT::W;
  const T hw = rs.hw;
  if (hw != T(0)) {
    io.mass[y] += hw;
    if (hw > 0) io.risk[y] += hw * (rs.L - rs.u_y);
    if (ra.am == y) io.hit[y] += hw;
  }
  if (!NeedGrad) return;
  const V c1 = VT::set1(c.gs * hw * rs.w_y * rs.isz);
  const T at_y = c.gs * hw * rs.w_y;
  Sums<T> unused = ra.s;
  for (int64_t k = 0; k < c.ntiles; ++k) {
    const TileSpan span = pass_b_tile(io, c, k);
    const int64_t off = span.off, n = span.n, npad = span.npad;
    if (c.ntiles != 1) {
      exp_pass<VT, In, false, false, true, false, false, false, true>(io.f, io.g, io.U, c, off, n, npad, ra.re,
                                                                      ra.rge, unused);
    }
    const int64_t yl = y - off;
    for_vectors<W>(n, vector_start<W>(yl, n), n % W != 0 ? n / W * W : -1, -1, [&](int64_t j, auto special) {
      constexpr bool kSpecial = decltype(special)::value;
      V gv = VT::mul(VT::load(io.S + j), c1);
      if (kSpecial && yl >= j && yl < j + W) gv = VT::sub(gv, VT::one_lane(yl - j, at_y));
      if (kSpecial && j + W > n) {
        store_grad_partial<VT>(io.grad + off + j, gv, n - j, io.stream);
      } else {
        store_grad<VT>(io.grad + off + j, gv, io.stream);
      }
    });
  }
}

// Pass B of a row with a teacher term: q, the gradient and the statistics, class by class. Returns the
// row's loss where pass B sums it (loss_in_b), else 0.
template <class VT, class In, bool Probs, bool Tau1, bool NeedGrad, bool HasW>
RKD_ALWAYS_INLINE typename VT::T soft_pass_b(const RowIO<VT, In>& io, const Consts<VT>& c,
                                             const RowA<typename VT::T>& ra, const RowScalars<typename VT::T>& rs,
                                             int64_t y) {
  using T = typename VT::T;
  using V = typename VT::V;
  constexpr int W = VT::W;
  const T hw = rs.hw;
  const V ca = VT::set1(rs.sw * rs.isg);  // q = e * ca (+ hw at y)
  const V vL = VT::set1(rs.L);
  const V vgs = VT::set1(c.gs);
  // tau = 1: grad = s Wq - w q with s = exp(u) / sz, Wq = hw w_y + a Wp.
  const V cs = VT::set1(c.gs * (hw * rs.w_y + rs.sw * rs.wp) * rs.isz);
  // tau != 1: grad = hw w_y s + a tau Wp s^tau - w (a tau p + hw e_y), all times gs.
  const V c1 = VT::set1(c.gs * hw * rs.w_y * rs.isz);
  const V c2 = VT::set1(c.gs * rs.sw * c.tau * rs.wp * rs.iszt);
  const V cq2 = VT::set1(c.gs * rs.sw * c.tau * rs.isg);
  T q_am = 0;
  V lsum = VT::zero();  // loss_in_b: sum_j q_j (L - u_j)
  Sums<T> unused = ra.s;
  for (int64_t k = 0; k < c.ntiles; ++k) {
    const TileSpan span = pass_b_tile(io, c, k);
    const int64_t off = span.off, n = span.n, npad = span.npad;
    if (c.ntiles != 1) {
      load_tile<VT, false>(io.g + off, n, npad, io.E, Probs ? T(0) : neg_inf<T>(), nullptr, nullptr);
      exp_pass<VT, In, true, Probs, Tau1, HasW, false, true, NeedGrad>(io.f, io.g, io.U, c, off, n, npad, ra.re,
                                                                       ra.rge, unused);
    }
    const int64_t yl = y >= 0 && hw != T(0) ? y - off : -1;
    const int64_t aml = ra.am - off;
    T* mass_t = io.mass + off;
    T* risk_t = io.risk + off;
    const T* w_t = c.w + off;
    const T* E = io.E;
    const T* U = io.U;
    const T* S = io.S;
    const T* St = io.St;
    In* grad_t = NeedGrad ? io.grad + off : nullptr;
    for_vectors<W>(n, vector_start<W>(yl, n), vector_start<W>(aml, n), n % W != 0 ? n / W * W : -1,
                   [&](int64_t j, auto special) {
                     constexpr bool kSpecial = decltype(special)::value;
                     const V e = VT::load(E + j);
                     const V u = VT::load(U + j);
                     V hv = VT::zero();
                     if (kSpecial && yl >= j && yl < j + W) hv = VT::one_lane(yl - j, hw);
                     const V q = VT::fmadd(e, ca, hv);
                     VT::store(mass_t + j, VT::add(VT::load(mass_t + j), q));
                     if (loss_in_b<Tau1, HasW>()) {
                       const V dr = VT::mul_if_nonzero(q, VT::sub(vL, u));
                       VT::store(risk_t + j, VT::add(VT::load(risk_t + j), dr));
                       lsum = VT::add(lsum, dr);
                     } else {
                       VT::store(risk_t + j, VT::fma_if_pos(q, VT::sub(vL, u), VT::load(risk_t + j)));
                     }
                     if (kSpecial && aml >= j && aml < j + W) {
                       T tmp[W];
                       VT::store(tmp, q);
                       q_am = tmp[aml - j];
                     }
                     if (NeedGrad) {
                       V gv;
                       if (Tau1) {
                         const V wq = HasW ? VT::mul(VT::load(w_t + j), q) : q;
                         gv = VT::fnmadd(wq, vgs, VT::mul(VT::load(S + j), cs));
                       } else {
                         const V q2 = VT::fmadd(e, cq2, VT::mul(hv, vgs));
                         const V wq2 = HasW ? VT::mul(VT::load(w_t + j), q2) : q2;
                         gv = VT::sub(VT::fmadd(VT::load(S + j), c1, VT::mul(VT::load(St + j), c2)), wq2);
                       }
                       if (kSpecial && j + W > n) {
                         store_grad_partial<VT>(grad_t + j, gv, n - j, io.stream);
                       } else {
                         store_grad<VT>(grad_t + j, gv, io.stream);
                       }
                     }
                   });
  }
  io.hit[ra.am] += q_am;
  return loss_in_b<Tau1, HasW>() ? VT::hsum(lsum) : T(0);
}

// Prefetches [p, p + bytes) into the caches, one cache line at a time: a write prefetch (PREFETCHW) where
// the compile target has one, a plain prefetch otherwise, which still spares the later stores a fetch
// from memory.
inline void prefetch_for_write(const void* p, int64_t bytes) {
  constexpr int64_t kLine = 64;
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += kLine) __builtin_prefetch(c + off, 1, 3);
}

// Whether a row of teacher probabilities is one (from pass A's sums, no extra pass): no negative entry, and
// a sum within `tol` of 1 (a NaN or an infinity makes the sum fail too).
template <class T>
inline bool probs_row_ok(const Sums<T>& s, T tol) {
  return !(s.sneg > T(0)) && std::abs(s.sg - T(1)) <= tol;
}

// The status of a teacher row whose term the loss does not use (a_i = 0): read only for its validity, so
// that a bad teacher value gives the row a NaN loss whatever a_i. Logits: no NaN or +inf, and not -inf
// everywhere; probabilities: as probs_row_ok. `buf` holds W values of scratch.
template <class VT, class In>
bool teacher_row_ok(const In* g, int64_t m, bool probs, typename VT::T tol, typename VT::T* buf) {
  using T = typename VT::T;
  constexpr int W = VT::W;
  const T inf = std::numeric_limits<T>::infinity();
  T sum = 0, mx = -inf;
  bool ok = true;
  for (int64_t j = 0; j < m; j += W) {
    const int64_t n = m - j < W ? m - j : W;
    VT::store(buf, n == W ? VT::load_in(g + j) : VT::load_in_partial(g + j, n, T(0)));
    for (int64_t l = 0; l < n; ++l) {
      const T v = buf[l];
      if (probs) {
        ok = ok && v >= T(0);  // false for NaN
        sum += v;
      } else {
        ok = ok && v == v && v < inf;
        mx = v > mx ? v : mx;
      }
    }
  }
  return probs ? ok && std::abs(sum - T(1)) <= tol : ok && mx > -inf;
}

// One row. Soft: the teacher term is present (a teacher is given and a_i > 0); otherwise only the
// label term. y < 0: no labels. Writes loss[i], grad row i (NeedGrad) and adds to the accumulators.
// A row of teacher probabilities that is not one (probs_row_ok) gets a NaN loss: the call's status.
template <class VT, class In, bool Soft, bool Probs, bool Tau1, bool NeedGrad, bool HasW>
void row_kernel(const FusedArgs& args, const Consts<VT>& c, int64_t i, typename VT::T a_i, int64_t y,
                typename VT::T* scratch, const ChunkOut& acc) {
  using T = typename VT::T;
  const int64_t m = c.m;
  RowIO<VT, In> io;
  io.f = static_cast<const In*>(args.student) + i * m;
  io.g = Soft ? static_cast<const In*>(args.teacher) + i * m : nullptr;
  io.grad = NeedGrad ? static_cast<In*>(args.grad) + i * m : nullptr;
  io.U = scratch;
  io.E = io.U + c.tile;
  io.S = io.E + c.tile;
  io.St = io.S + c.tile;
  io.mass = static_cast<T*>(acc.mass);
  io.risk = static_cast<T*>(acc.risk);
  io.hit = static_cast<T*>(acc.hit);
  // Rows held whole prefetch the next ones during their exponential pass (wide rows rely on the
  // hardware prefetchers); the last row prefetches itself, harmlessly.
  const int64_t next = i + 1 < args.rows ? m : 0;
  io.pf_f = reinterpret_cast<const char*>(io.f + next);
  io.pf_g = Soft ? reinterpret_cast<const char*>(io.g + next) : nullptr;
  // Non-temporal gradient stores need every vector aligned: true when the row start is.
  io.stream =
      NeedGrad && args.stream_grad && reinterpret_cast<uintptr_t>(io.grad) % VT::template stream_align<In>() == 0;
  // The next gradient row, held whole, is fetched for writing now: its lines are not in any cache
  // when the caller's memory is fresh, and stores that miss stall the row once the store buffer fills.
  if (NeedGrad && !io.stream && c.ntiles == 1) prefetch_for_write(io.grad + next, m * static_cast<int64_t>(sizeof(In)));

  RowA<T> ra = pass_a<VT, In, Soft, Probs, Tau1, NeedGrad, HasW>(io, c);
  const RowScalars<T> rs = row_scalars<VT, In, Soft, Probs, Tau1, HasW>(ra, io, c, a_i, y);
  const Sums<T>& s = ra.s;
  T* loss = static_cast<T*>(args.loss) + i;
  if (!Soft || !loss_in_b<Tau1, HasW>()) {
    T l = 0;
    if (rs.hw > 0) l += rs.hw * rs.w_y * (rs.L - rs.u_y);
    if (Soft) l += rs.sw * c.tau * c.tau * (rs.Lt * rs.wp - c.inv_tau * (s.swgu * rs.isg));
    *loss = l;
  }
  if (!Soft) {
    hard_pass_b<VT, In, NeedGrad>(io, c, ra, rs, y);
    return;
  }
  const T lb = soft_pass_b<VT, In, Probs, Tau1, NeedGrad, HasW>(io, c, ra, rs, y);
  if (loss_in_b<Tau1, HasW>()) *loss = lb;
  if (Probs && !probs_row_ok(s, static_cast<T>(args.prob_tol))) *loss = std::numeric_limits<T>::quiet_NaN();
}

#include "distill_narrow.h"

// row_kernel as a kernel variant for pick_kernel.
template <class VT, class In, bool Soft, bool Probs, bool Tau1, bool NeedGrad, bool HasW>
struct RowKernel {
  static constexpr auto fn = &row_kernel<VT, In, Soft, Probs, Tau1, NeedGrad, HasW>;
};

template <class VT, class In>
using RowFn = void (*)(const FusedArgs&, const Consts<VT>&, int64_t, typename VT::T, int64_t, typename VT::T*,
                       const ChunkOut&);

// K<VT, In, Soft, Probs, Tau1, need_grad, has_w>::fn (K: RowKernel or GroupKernel).
template <template <class, class, bool, bool, bool, bool, bool> class K, class VT, class In, bool Soft, bool Probs,
          bool Tau1>
inline auto pick_variant(bool need_grad, bool has_w) -> decltype(K<VT, In, Soft, Probs, Tau1, true, true>::fn) {
  if (need_grad) {
    return has_w ? K<VT, In, Soft, Probs, Tau1, true, true>::fn : K<VT, In, Soft, Probs, Tau1, true, false>::fn;
  }
  return has_w ? K<VT, In, Soft, Probs, Tau1, false, true>::fn : K<VT, In, Soft, Probs, Tau1, false, false>::fn;
}

// The variant of kernel K for a call's rows with the teacher term (a teacher given), or for label-only rows
// (no teacher: they read w at the label alone, ones when absent, so one variant serves both).
template <template <class, class, bool, bool, bool, bool, bool> class K, class VT, class In>
inline auto pick_kernel(const FusedArgs& args, bool soft) -> decltype(K<VT, In, true, true, true, true, true>::fn) {
  const bool g = args.need_grad, w = args.has_w, t1 = args.tau == 1.0;
  if (!soft) return pick_variant<K, VT, In, false, false, true>(g, true);
  if (args.teacher_is_probs) {
    return t1 ? pick_variant<K, VT, In, true, true, true>(g, w) : pick_variant<K, VT, In, true, true, false>(g, w);
  }
  return t1 ? pick_variant<K, VT, In, true, false, true>(g, w) : pick_variant<K, VT, In, true, false, false>(g, w);
}

// Row i of a call through row_kernel (soft: the variant with the teacher term, nullptr without a teacher).
template <class VT, class In>
RKD_ALWAYS_INLINE void one_row(const FusedArgs& args, const Consts<VT>& c, int64_t i, RowFn<VT, In> soft,
                               RowFn<VT, In> hard, ChunkOut& out) {
  using T = typename VT::T;
  T* scratch = static_cast<T*>(out.scratch);
  int64_t y = -1;
  if (args.labels != nullptr) {
    y = args.labels[i];
    if (y == args.ignore_index) {
      static_cast<T*>(args.loss)[i] = T(0);
      if (args.need_grad) {
        std::memset(static_cast<In*>(args.grad) + i * args.m, 0, static_cast<size_t>(args.m) * sizeof(In));
      }
      return;
    }
    if (y < 0 || y >= args.m) {
      if (out.bad_row < 0) out.bad_row = i;
      static_cast<T*>(args.loss)[i] = std::numeric_limits<T>::quiet_NaN();
      return;
    }
  }
  const T a_i = static_cast<const T*>(args.a)[i];
  const bool soft_row = soft != nullptr && a_i > 0;
  (soft_row ? soft : hard)(args, c, i, a_i, y, scratch, out);
  // A teacher row the loss does not use is still checked: a bad value there is the caller's error too.
  if (args.teacher != nullptr && !soft_row &&
      !teacher_row_ok<VT>(static_cast<const In*>(args.teacher) + i * args.m, args.m, args.teacher_is_probs,
                          static_cast<T>(args.prob_tol), scratch)) {
    static_cast<T*>(args.loss)[i] = std::numeric_limits<T>::quiet_NaN();
  }
}

// Rows [begin, end) of one call, with this thread's scratch and accumulators. Narrow calls take regular
// groups of W rows through narrow_group (distill_narrow.h) and the other rows through row_kernel.
template <class VT, class In>
void run_rows(const FusedArgs& args, int64_t begin, int64_t end, ChunkOut& out) {
  using T = typename VT::T;
  constexpr int W = VT::W;
  Consts<VT> c;
  c.m = args.m;
  c.tile = args.tile;
  c.ntiles = (args.m + c.tile - 1) / c.tile;
  c.lc = static_cast<const T*>(args.log_c);
  c.w = static_cast<const T*>(args.w);
  c.has_lc = args.has_log_c;
  c.tau = static_cast<T>(args.tau);
  c.inv_tau = static_cast<T>(1.0 / args.tau);
  c.kg = static_cast<T>(1.4426950408889634074 / args.gamma);
  c.kt = static_cast<T>(1.4426950408889634074 / args.tau);
  c.gs = static_cast<T>(args.grad_scale);
  const bool teacher = args.teacher != nullptr;
  const RowFn<VT, In> hard = pick_kernel<RowKernel, VT, In>(args, false);
  const RowFn<VT, In> soft = teacher ? pick_kernel<RowKernel, VT, In>(args, true) : nullptr;
  if (!args.narrow) {
    for (int64_t i = begin; i < end; ++i) one_row<VT, In>(args, c, i, soft, hard, out);
  } else {
    const NarrowBufs<VT> nb = narrow_bufs<VT>(static_cast<T*>(out.scratch) + kScratchBuffers * args.tile, args.m);
    const auto group = pick_kernel<GroupKernel, VT, In>(args, teacher);
    for (int64_t i = begin; i < end;) {
      if (end - i >= W && narrow_regular<T, W>(args, i)) {
        group(args, c, i, nb, out);
        i += W;
      } else {
        one_row<VT, In>(args, c, i++, soft, hard, out);
      }
    }
    fold_narrow<VT>(nb, args.m, out);
  }
  if (args.stream_grad) VT::stream_fence();
}

// row[0, m) *= scale, rounded once to the storage dtype.
template <class VT, class In>
void scale_row(void* row_v, int64_t m, double scale) {
  using T = typename VT::T;
  constexpr int W = VT::W;
  In* row = static_cast<In*>(row_v);
  const typename VT::V sv = VT::set1(static_cast<T>(scale));
  int64_t j = 0;
  for (; j + W <= m; j += W) VT::store_out(row + j, VT::mul(VT::load_in(row + j), sv));
  if (j < m) {
    In tmp[W];
    std::memset(tmp, 0, sizeof(tmp));
    std::memcpy(tmp, row + j, static_cast<size_t>(m - j) * sizeof(In));
    VT::store_out_partial(row + j, VT::mul(VT::load_in(tmp), sv), m - j);
  }
}
