// Narrow rows (at most FusedArgs::narrow_max classes): W rows at a time, one row per vector lane.
// Included by distill_rows.h (inside the per-ISA namespace, after the row kernel's helpers).
//
// The row kernel's fixed work per row (padding the row to the vector width, the horizontal sums and
// maxima, the special vectors at the label and the argmax) costs more than its arithmetic when a row
// holds a few vectors or less. Here a group of W consecutive rows is transposed into column blocks
// (class j of the group's row l at [j * W + l]), so every vector operation serves W rows and the
// passes are the row kernel's passes with one lane per row: no horizontal operation, no partial vector.
// The math is the row kernel's, operation for operation where it can be (distill_cpu.cpp, docs/loss.md).
//
// A group goes this way only when all of its W rows are regular: a label in [0, m) other than
// ignore_index (or no labels), and a > 0 where a teacher is given (the teacher term present). Other
// groups and the last rows % W go through row_kernel. Per-class statistics are summed per lane over
// the block's groups and added to the block's accumulators at its end (fold_narrow), so results do not
// depend on the threads.

// The scratch of the narrow path: column blocks of m x W values (narrow_buffers() of them) and the
// staging rows of W x m_pad values used to convert the input dtype.
template <class VT>
struct NarrowBufs {
  using T = typename VT::T;
  T* F;      // f, then u = (f - r) - lc
  T* G;      // the teacher values, then e
  T* S;      // exp(u), then the gradient
  T* St;     // exp(u / tau)
  T* H;      // hw at (y_l, l), zero elsewhere (restored to zero after each group)
  T* mass;   // per-lane sums of q over the block's narrow groups
  T* risk;   // per-lane sums of q (L - u)
  T* stage;  // W rows of m_pad values: inputs converted to T, gradients before conversion
  int64_t m_pad;
};

template <class VT>
NarrowBufs<VT> narrow_bufs(typename VT::T* scratch, int64_t m) {
  static_assert(VT::W <= kNarrowLanes, "the binding sizes the narrow scratch for kNarrowLanes lanes");
  NarrowBufs<VT> b;
  b.m_pad = round_up(m, kPad);
  const int64_t block = b.m_pad * VT::W;
  b.F = scratch;
  b.G = b.F + block;
  b.S = b.G + block;
  b.St = b.S + block;
  b.H = b.St + block;
  b.mass = b.H + block;
  b.risk = b.mass + block;
  b.stage = b.risk + block;  // kNarrowBuffers = 8 blocks in all
  std::memset(b.H, 0, static_cast<size_t>(3 * block) * sizeof(typename VT::T));  // H, mass, risk
  return b;
}

// dst[j * W + l] = src[l * m + j] as T, for the W rows at src.
template <class VT, class In>
inline void gather_rows(const In* src, int64_t m, typename VT::T* dst, const NarrowBufs<VT>& b) {
  using T = typename VT::T;
  constexpr int W = VT::W;
  const T* rows = reinterpret_cast<const T*>(src);
  int64_t stride = m;
  if (!std::is_same<In, T>::value) {  // convert through the vector loads (the row kernel's rounding)
    for (int l = 0; l < W; ++l) {
      const In* row = src + l * m;
      T* out = b.stage + l * b.m_pad;
      int64_t j = 0;
      for (; j + W <= m; j += W) VT::store(out + j, VT::load_in(row + j));
      if (j < m) VT::store(out + j, VT::load_in_partial(row + j, m - j, T(0)));
    }
    rows = b.stage;
    stride = b.m_pad;
  }
  for (int l = 0; l < W; ++l) {
    for (int64_t j = 0; j < m; ++j) dst[j * W + l] = rows[l * stride + j];
  }
}

// dst[l * m + j] = src[j * W + l] in the output dtype, for W rows at dst.
template <class VT, class Out>
inline void scatter_rows(const typename VT::T* src, int64_t m, Out* dst, const NarrowBufs<VT>& b) {
  using T = typename VT::T;
  constexpr int W = VT::W;
  if (std::is_same<Out, T>::value) {
    T* rows = reinterpret_cast<T*>(dst);
    for (int l = 0; l < W; ++l) {
      for (int64_t j = 0; j < m; ++j) rows[l * m + j] = src[j * W + l];
    }
    return;
  }
  for (int l = 0; l < W; ++l) {
    T* row = b.stage + l * b.m_pad;
    for (int64_t j = 0; j < m; ++j) row[j] = src[j * W + l];
    int64_t j = 0;
    for (; j + W <= m; j += W) VT::store_out(dst + l * m + j, VT::load(row + j));
    if (j < m) VT::store_out_partial(dst + l * m + j, VT::load(row + j), m - j);
  }
}

// The per-lane (per-row) values of a group between its passes.
template <class T, int W>
struct Lanes {
  T re[W], rge[W];        // the shifts r and r_g (0 for a row of -inf)
  int64_t am[W];          // argmax f, first index on ties
  bool empty[W];          // the student row is -inf everywhere (after log c)
  T sz[W], szt[W], sg[W], swg[W], swgu[W], sneg[W];  // pass A's sums (Sums, one per lane)
  // Pass B's coefficients (row_scalars and soft_pass_b / hard_pass_b of the row kernel).
  T L[W], ca[W], cs[W], c1[W], c2[W], cq2[W], cy[W];
};

// Pass A's maxima of a group: the shifts, the argmax's maximum and the empty rows.
template <class VT, bool Soft, bool Probs>
RKD_ALWAYS_INLINE void narrow_maxima(const NarrowBufs<VT>& b, const Consts<VT>& c, Lanes<typename VT::T, VT::W>& ln) {
  using T = typename VT::T;
  using V = typename VT::V;
  constexpr int W = VT::W;
  const T ninf = neg_inf<T>();
  V mf = VT::set1(ninf), mz = mf, mg = mf, am = VT::zero();
  for (int64_t j = 0; j < c.m; ++j) {
    const V x = VT::load(b.F + j * W);
    am = VT::gt_select(x, mf, VT::set1(static_cast<T>(j)), am);  // strictly greater: the first index on ties
    mf = VT::max(mf, x);
    if (c.has_lc) mz = VT::max(mz, VT::sub(x, VT::set1(c.lc[j])));
    if (Soft && !Probs) mg = VT::max(mg, VT::load(b.G + j * W));
  }
  T amf[W];
  VT::store(amf, am);
  VT::store(ln.re, c.has_lc ? mz : mf);
  VT::store(ln.rge, mg);
  for (int l = 0; l < W; ++l) {
    ln.am[l] = static_cast<int64_t>(amf[l]);
    ln.empty[l] = !(ln.re[l] > ninf);
    if (ln.empty[l]) ln.re[l] = T(0);
    if (!(ln.rge[l] > ninf)) ln.rge[l] = T(0);
  }
}

// The exponential pass of a group (tile_exp with one lane per row): u, exp(u), exp(u / tau) and e in
// place, and the lanes' sums.
template <class VT, bool Soft, bool Probs, bool Tau1, bool HasW, bool NeedGrad>
RKD_ALWAYS_INLINE void narrow_exp(const NarrowBufs<VT>& b, const Consts<VT>& c, Lanes<typename VT::T, VT::W>& ln) {
  using T = typename VT::T;
  using V = typename VT::V;
  constexpr int W = VT::W;
  const V vr = VT::load(ln.re), vrg = VT::load(ln.rge), vkg = VT::set1(c.kg);
  const V vkt = VT::set1(c.kt), vl2e = VT::set1(log2e<T>()), one = VT::set1(T(1));
  V sz = VT::zero(), szt = sz, sg = sz, swg = sz, swgu = sz, sneg = sz;
  for (int64_t j = 0; j < c.m; ++j) {
    T* F = b.F + j * W;
    const V u = VT::sub(VT::sub(VT::load(F), vr), VT::set1(c.lc[j]));
    const V eu = VT::exp2_clamped(VT::mul(u, vl2e));
    sz = VT::add(sz, eu);
    VT::store(F, u);
    if (NeedGrad) VT::store(b.S + j * W, eu);
    if (!Tau1) {
      const V eut = VT::exp2_clamped(VT::mul(u, vkt));
      szt = VT::add(szt, eut);
      if (NeedGrad) VT::store(b.St + j * W, eut);
    }
    if (Soft) {
      T* G = b.G + j * W;
      const V e = Probs ? VT::load(G) : VT::exp2(VT::mul(VT::sub(VT::load(G), vrg), vkg));
      VT::store(G, e);
      sg = VT::add(sg, e);
      if (Probs) sneg = VT::fma_if_pos(VT::sub(VT::zero(), e), one, sneg);
      const V we = HasW ? VT::mul(VT::set1(c.w[j]), e) : e;
      if (HasW || Probs) swg = VT::add(swg, we);
      if (!loss_in_b<Tau1, HasW>()) swgu = VT::fma_if_pos(we, u, swgu);
    }
  }
  VT::store(ln.sz, sz);
  VT::store(ln.szt, Tau1 ? sz : szt);
  VT::store(ln.sg, sg);
  VT::store(ln.swg, (HasW || Probs) ? swg : sg);
  VT::store(ln.swgu, swgu);
  VT::store(ln.sneg, sneg);
}

// Per row of a group: row_scalars, the loss where pass B does not sum it, the argmax's statistic and
// pass B's coefficients; sets H at the labels.
template <class VT, bool Soft, bool Probs, bool Tau1, bool HasW>
RKD_ALWAYS_INLINE void narrow_scalars(const FusedArgs& args, const Consts<VT>& c, int64_t i0, const NarrowBufs<VT>& b,
                                      Lanes<typename VT::T, VT::W>& ln, const ChunkOut& acc) {
  using T = typename VT::T;
  constexpr int W = VT::W;
  const T* a = static_cast<const T*>(args.a) + i0;
  T* loss = static_cast<T*>(args.loss) + i0;
  T* hit = static_cast<T*>(acc.hit);
  for (int l = 0; l < W; ++l) {
    const int64_t y = args.labels != nullptr ? args.labels[i0 + l] : -1;
    const int64_t am = ln.am[l];
    const T sz = ln.empty[l] ? std::numeric_limits<T>::quiet_NaN() : ln.sz[l];
    const T szt = ln.empty[l] ? sz : ln.szt[l];
    const T L = std::log(sz), Lt = Tau1 ? L : std::log(szt);
    const T isz = T(1) / sz, iszt = Tau1 ? isz : T(1) / szt;
    const T isg = (Soft && !Probs) ? T(1) / ln.sg[l] : T(1);
    const T wp = Soft ? ln.swg[l] * isg : T(0);
    const T hw = y >= 0 ? T(1) - a[l] : T(0);
    const T sw = Soft ? a[l] : T(0);
    const T w_y = y >= 0 ? c.w[y] : T(0);
    const T u_y = y >= 0 ? b.F[y * W + l] : T(0);
    if (!Soft || !loss_in_b<Tau1, HasW>()) {
      T lo = 0;
      if (hw > 0) lo += hw * w_y * (L - u_y);
      if (Soft) lo += sw * c.tau * c.tau * (Lt * wp - c.inv_tau * (ln.swgu[l] * isg));
      loss[l] = lo;
    }
    if (y >= 0) b.H[y * W + l] = hw;
    ln.L[l] = L;
    ln.ca[l] = sw * isg;
    ln.cs[l] = c.gs * (hw * w_y + sw * wp) * isz;
    ln.c1[l] = c.gs * hw * w_y * isz;
    ln.c2[l] = c.gs * sw * c.tau * wp * iszt;
    ln.cq2[l] = c.gs * sw * c.tau * isg;
    ln.cy[l] = c.gs * w_y;
    // error = mass - hit: the row's q at its argmax.
    const T h_am = am == y ? hw : T(0);
    hit[am] += Soft ? std::fma(b.G[am * W + l], ln.ca[l], h_am) : h_am;
  }
}

// Pass B of a group (soft_pass_b / hard_pass_b with one lane per row): q, the lanes' statistics and the
// gradient (into S). Returns the rows' losses where pass B sums them (loss_in_b).
template <class VT, bool Soft, bool Tau1, bool HasW, bool NeedGrad>
RKD_ALWAYS_INLINE typename VT::V narrow_pass_b(const NarrowBufs<VT>& b, const Consts<VT>& c,
                                               const Lanes<typename VT::T, VT::W>& ln) {
  using V = typename VT::V;
  constexpr int W = VT::W;
  const V vL = VT::load(ln.L), ca = VT::load(ln.ca), cs = VT::load(ln.cs), c1 = VT::load(ln.c1);
  const V c2 = VT::load(ln.c2), cq2 = VT::load(ln.cq2), cy = VT::load(ln.cy), vgs = VT::set1(c.gs);
  V lsum = VT::zero();
  for (int64_t j = 0; j < c.m; ++j) {
    const int64_t k = j * W;
    const V u = VT::load(b.F + k);
    const V hv = VT::load(b.H + k);
    const V e = Soft ? VT::load(b.G + k) : VT::zero();
    const V q = Soft ? VT::fmadd(e, ca, hv) : hv;
    VT::store(b.mass + k, VT::add(VT::load(b.mass + k), q));
    if (Soft && loss_in_b<Tau1, HasW>()) {
      const V dr = VT::mul_if_nonzero(q, VT::sub(vL, u));
      VT::store(b.risk + k, VT::add(VT::load(b.risk + k), dr));
      lsum = VT::add(lsum, dr);
    } else {
      VT::store(b.risk + k, VT::fma_if_pos(q, VT::sub(vL, u), VT::load(b.risk + k)));
    }
    if (!NeedGrad) continue;
    const V s = VT::load(b.S + k);
    V gv;
    if (!Soft) {
      gv = VT::fnmadd(hv, cy, VT::mul(s, c1));
    } else if (Tau1) {
      const V wq = HasW ? VT::mul(VT::set1(c.w[j]), q) : q;
      gv = VT::fnmadd(wq, vgs, VT::mul(s, cs));
    } else {
      const V q2 = VT::fmadd(e, cq2, VT::mul(hv, vgs));
      const V wq2 = HasW ? VT::mul(VT::set1(c.w[j]), q2) : q2;
      gv = VT::sub(VT::fmadd(s, c1, VT::mul(VT::load(b.St + k), c2)), wq2);
    }
    VT::store(b.S + k, gv);
  }
  return lsum;
}

// W regular rows from i0 (see the top of this file): losses, gradient rows and statistics.
template <class VT, class In, bool Soft, bool Probs, bool Tau1, bool NeedGrad, bool HasW>
void narrow_group(const FusedArgs& args, const Consts<VT>& c, int64_t i0, const NarrowBufs<VT>& b,
                  const ChunkOut& acc) {
  using T = typename VT::T;
  constexpr int W = VT::W;
  Lanes<T, W> ln;
  if (NeedGrad && i0 + 2 * W <= args.rows) {  // the next group's gradient rows (see row_kernel)
    prefetch_for_write(static_cast<In*>(args.grad) + (i0 + W) * c.m, W * c.m * static_cast<int64_t>(sizeof(In)));
  }
  gather_rows<VT>(static_cast<const In*>(args.student) + i0 * c.m, c.m, b.F, b);
  if (Soft) gather_rows<VT>(static_cast<const In*>(args.teacher) + i0 * c.m, c.m, b.G, b);
  narrow_maxima<VT, Soft, Probs>(b, c, ln);
  narrow_exp<VT, Soft, Probs, Tau1, HasW, NeedGrad>(b, c, ln);
  narrow_scalars<VT, Soft, Probs, Tau1, HasW>(args, c, i0, b, ln, acc);
  const typename VT::V lsum = narrow_pass_b<VT, Soft, Tau1, HasW, NeedGrad>(b, c, ln);
  T* loss = static_cast<T*>(args.loss) + i0;
  if (Soft && loss_in_b<Tau1, HasW>()) VT::store(loss, lsum);
  const T tol = static_cast<T>(args.prob_tol);
  for (int l = 0; l < W; ++l) {
    if (args.labels != nullptr) b.H[args.labels[i0 + l] * W + l] = T(0);
    if (Probs) {
      Sums<T> s;
      s.sg = ln.sg[l];
      s.sneg = ln.sneg[l];
      if (!probs_row_ok(s, tol)) loss[l] = std::numeric_limits<T>::quiet_NaN();
    }
  }
  if (NeedGrad) scatter_rows<VT>(b.S, c.m, static_cast<In*>(args.grad) + i0 * c.m, b);
}

// Whether rows [i0, i0 + W) may go through narrow_group (regular rows, see the top of this file).
template <class T, int W>
inline bool narrow_regular(const FusedArgs& args, int64_t i0) {
  for (int l = 0; l < W; ++l) {
    if (args.labels != nullptr) {
      const int64_t y = args.labels[i0 + l];
      if (y < 0 || y >= args.m || y == args.ignore_index) return false;
    }
    if (args.teacher != nullptr && !(static_cast<const T*>(args.a)[i0 + l] > T(0))) return false;
  }
  return true;
}

// Adds the lanes' statistics of a block's narrow groups to its accumulators.
template <class VT>
void fold_narrow(const NarrowBufs<VT>& b, int64_t m, const ChunkOut& acc) {
  constexpr int W = VT::W;
  auto* mass = static_cast<typename VT::T*>(acc.mass);
  auto* risk = static_cast<typename VT::T*>(acc.risk);
  for (int64_t j = 0; j < m; ++j) {
    mass[j] += VT::hsum(VT::load(b.mass + j * W));
    risk[j] += VT::hsum(VT::load(b.risk + j * W));
  }
}

// narrow_group as a kernel variant for pick_kernel (distill_rows.h).
template <class VT, class In, bool Soft, bool Probs, bool Tau1, bool NeedGrad, bool HasW>
struct GroupKernel {
  static constexpr auto fn = &narrow_group<VT, In, Soft, Probs, Tau1, NeedGrad, HasW>;
};
