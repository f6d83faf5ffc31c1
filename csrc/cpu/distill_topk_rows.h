// The top-k row kernel, written once with GCC/clang vector extensions and included (without include
// guard, on purpose) inside one namespace per target by distill_topk_kernel.cpp. The including file has
// included <cmath>, <cstdint>, <cstring>, <limits> and distill_topk.h.
//
// Row i of B rows, m classes; K_i the k teacher classes with probabilities p_j; P = sum_K p_j. The target
// of the teacher term is p~_j = v_j = p_j / P on K_i ("renormalize", t = 0) or v_j = p_j on K_i and
// t = (1 - P)^+ / (m - k) on every other class ("uniform"); q_j = (1 - a) [j == y] + a p~_j as for a dense
// teacher (distill_cpu.cpp has the math). With u_j = (f_j - r) - log c_j, r = max_j (f_j - log c_j):
//   pass A (the row, vectors): r, max f (the argmax), and sum exp(u), sum exp(u / tau), and (t > 0) the
//     tail's sums W_t = sum_{j not in K} w_j and sum_{j not in K, w_j > 0} w_j u_j, through a mask that is
//     0 on K and 1 elsewhere (set and restored at the k classes only);
//   the scalars (k entries): W_p = sum_K w_j v_j + t W_t, loss = (1 - a) w_y (L - u_y)
//     + a tau^2 (L_tau W_p - (1/tau) (sum_{K: w v > 0} w_j v_j u_j + t sum_tail w_j u_j));
//   pass B (the row, vectors): the gradient of the tail target, s_j c1 + s^tau_j c2 - gs tau w_j a t
//     (no last term for "renormalize"), and, where a t > 0, the tail's statistics mass_j += a t,
//     risk_j += a t (L - u_j);
//   the fix-ups (k entries and the label): the gradient of the whole q_j there, mass_j += q_j,
//     risk_j += q_j (L - u_j), and hit[argmax] += q_argmax.
// So a row reads f once (a scratch copy in the accumulation type, then the cached copy), never forms the
// dense target, and writes its gradient row once plus k + 1 entries.

template <class T>
struct TopkVec;

template <>
struct TopkVec<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef uint32_t U __attribute__((vector_size(32)));
  static constexpr int W = 8;
  // 2^y as in distill_kernel.h (kExp2Magic): exactly 0 below kExp2Lo (and for -inf), NaN propagated.
  static inline V exp2(V y) {
    const V t = y + kExp2Magic;
    const V r = y - (t - kExp2Magic);
    V p = kExp2C5 * r + kExp2C4;
    p = p * r + kExp2C3;
    p = p * r + kExp2C2;
    p = p * r + kExp2C1;
    p = p * r + 1.0f;
    U bits;
    std::memcpy(&bits, &t, sizeof(bits));
    bits <<= 23;
    V scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    const V out = p * scale;
    const V zero = {};
    return y < kExp2Lo ? zero : out;
  }
};

template <>
struct TopkVec<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
  static constexpr int W = 4;
  static inline V exp2(V y) {
    V out;
    for (int l = 0; l < W; ++l) out[l] = std::exp2(y[l]);
    return out;
  }
};

template <class T>
inline typename TopkVec<T>::V vload(const T* p) {
  typename TopkVec<T>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class T>
inline void vstore(T* p, const typename TopkVec<T>::V& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <class T>
inline T vsum(const typename TopkVec<T>::V& v) {
  T s = 0;
  for (int l = 0; l < TopkVec<T>::W; ++l) s += v[l];
  return s;
}

template <class T>
inline T vmax_lanes(const typename TopkVec<T>::V& v) {
  T s = v[0];
  for (int l = 1; l < TopkVec<T>::W; ++l) s = v[l] > s ? v[l] : s;
  return s;
}

// Per-row scalars shared by the passes.
template <class T>
struct TopkRow {
  T r, rf, L, Lt, sz, szt;
  T hw, sw, w_y;  // weights of the label and teacher terms, w at the label
  T t, c;         // the tail value of p~ and of q (c = a t)
  T c1, c2;       // gradient: c1 s_j + c2 s^tau_j - gs w_j q2_j
  int64_t y, am;
};

// Pass A: maxima of f - log c and f over the (padded) scratch copy X, and the argmax of f (first index on
// ties: each lane keeps its first maximum, then the smallest index among the lanes holding the maximum).
template <class T>
inline void topk_maxima(const T* X, const T* lc, int64_t mp, TopkRow<T>& row) {
  using V = typename TopkVec<T>::V;
  using I = typename TopkVec<T>::I;
  using Idx = decltype(I{}[0]);
  constexpr int W = TopkVec<T>::W;
  const V ninf = V{} - std::numeric_limits<T>::infinity();
  V vz = ninf, vf = ninf;
  I vi = {}, lane = {};
  for (int l = 0; l < W; ++l) lane[l] = static_cast<Idx>(l);
  for (int64_t j = 0; j < mp; j += W) {
    const V x = vload(X + j);
    const V z = x - vload(lc + j);
    vz = z > vz ? z : vz;
    const auto gt = x > vf;
    vf = gt ? x : vf;
    vi = gt ? lane + static_cast<Idx>(j) : vi;
  }
  row.r = vmax_lanes<T>(vz);
  row.rf = vmax_lanes<T>(vf);
  int64_t am = mp;
  for (int l = 0; l < W; ++l) {
    if (vf[l] == row.rf && static_cast<int64_t>(vi[l]) < am) am = static_cast<int64_t>(vi[l]);
  }
  row.am = am < mp ? am : 0;
}

// Pass A: the exponential sums (and exp(u), exp(u / tau) kept in S, St for the gradient), and with a
// tail its two sums over the classes outside K (the mask tm).
template <class T, bool Tau1, bool NeedGrad, bool Tail>
inline void topk_sums(const T* X, const T* lc, const T* w, const T* tm, int64_t mp, T r, T kt, T* S, T* St, T* out) {
  using V = typename TopkVec<T>::V;
  constexpr int W = TopkVec<T>::W;
  const V zero = {};
  const T l2e = static_cast<T>(1.44269504088896340736);
  V sz = zero, szt = zero, wt_sum = zero, swu = zero;
  for (int64_t j = 0; j < mp; j += W) {
    const V u = (vload(X + j) - r) - vload(lc + j);
    const V e = TopkVec<T>::exp2(u * l2e);
    sz += e;
    if (NeedGrad) vstore(S + j, e);
    if (!Tau1) {
      const V et = TopkVec<T>::exp2(u * kt);
      szt += et;
      if (NeedGrad) vstore(St + j, et);
    }
    if (Tail) {
      const V wt = vload(w + j) * vload(tm + j);
      wt_sum += wt;
      swu += wt > zero ? wt * u : zero;
    }
  }
  out[0] = vsum<T>(sz);
  out[1] = Tau1 ? out[0] : vsum<T>(szt);
  out[2] = vsum<T>(wt_sum);
  out[3] = vsum<T>(swu);
}

// Pass B: the gradient of the tail target into G (whole vectors; `direct`: G is the output row of m
// values, so the last partial vector is stored partially) and, with Tail, the tail's statistics.
template <class T, bool Tau1, bool NeedGrad, bool Tail>
inline void topk_dense(const T* X, const T* lc, const T* w, const T* tm, const T* S, const T* St, int64_t m,
                       int64_t mp, const TopkRow<T>& row, T gtq, T* mass, T* risk, T* G, bool direct) {
  using V = typename TopkVec<T>::V;
  constexpr int W = TopkVec<T>::W;
  const V zero = {};
  for (int64_t j = 0; j < mp; j += W) {
    V g = zero;
    if (NeedGrad) {
      g = vload(S + j) * row.c1;
      if (!Tau1) g += vload(St + j) * row.c2;
    }
    if (Tail) {
      const V qt = vload(tm + j) * row.c;
      if (NeedGrad) g -= vload(w + j) * (qt * gtq);
      const V u = (vload(X + j) - row.r) - vload(lc + j);
      vstore(mass + j, vload(mass + j) + qt);
      vstore(risk + j, vload(risk + j) + (qt > zero ? qt * (row.L - u) : zero));
    }
    if (NeedGrad) {
      if (!direct || j + W <= m) {
        vstore(G + j, g);
      } else if (j < m) {
        std::memcpy(G + j, &g, static_cast<size_t>(m - j) * sizeof(T));
      }
    }
  }
}

// The fix-ups at K and at the label: the gradient there (G[j], whole) and the statistics' corrections (q_j
// minus what pass B put in), then q at the argmax into hit (v = p / P when `renorm`, else p).
template <class T, bool Tau1, bool NeedGrad>
inline void topk_fixups(const T* X, const T* lc, const T* w, const T* tm, const T* S, const T* St,
                        const int64_t* K, const T* p, int64_t k, T P, bool renorm, bool tail, const TopkRow<T>& row,
                        T tau, T gs, T* mass, T* risk, T* hit, T* G) {
  const int64_t y = row.y;
  auto u_at = [&](int64_t j) { return (X[j] - row.r) - lc[j]; };
  // q2_j = tau (a t tm_j + a v_j) + (1 - a) [j == y]: the target in the gradient's last term.
  auto fix = [&](int64_t j, T q, T q2, T added) {
    // q: the whole q_j; added: what pass B already put into the statistics at j.
    mass[j] += q - added;
    const T d = q - added;
    if (d > 0) risk[j] += d * (row.L - u_at(j));
    if (NeedGrad) {
      T g = S[j] * row.c1;
      if (!Tau1) g += St[j] * row.c2;
      G[j] = g - w[j] * (gs * q2);
    }
  };
  bool y_done = !(y >= 0 && row.hw != T(0));
  T q_am = row.c * (tail ? tm[row.am] : T(1));
  if (row.sw > 0) {
    for (int64_t s = 0; s < k; ++s) {
      const int64_t j = K[s];
      const T v = renorm ? p[s] / P : p[s];
      const T h = j == y ? row.hw : T(0);
      if (j == y) y_done = true;
      fix(j, row.sw * v + h, tau * row.sw * v + h, T(0));
      if (j == row.am) q_am = row.sw * v + h;
    }
  }
  if (!y_done) {
    fix(y, row.c + row.hw, tau * row.c + row.hw, row.c);
    if (y == row.am) q_am = row.c + row.hw;
  }
  hit[row.am] += q_am;
}

// One row (not ignored, label valid). Writes loss[i], the gradient row and adds to the accumulators.
template <class T, bool Tau1, bool NeedGrad>
void topk_row(const TopkArgs& args, int64_t i, T a_i, int64_t y, T* scratch, int64_t mp, TopkOut& out) {
  const int64_t m = args.m, k = args.k;
  const T* lc = static_cast<const T*>(args.log_c);
  const T* w = static_cast<const T*>(args.w);
  const int64_t* K = args.index + i * k;
  const T* p = static_cast<const T*>(args.probs) + i * k;
  T* X = scratch;
  T* S = X + mp;
  T* St = S + mp;
  T* tm = St + mp;
  T* Gs = tm + mp;
  T* mass = static_cast<T*>(out.mass);
  T* risk = static_cast<T*>(out.risk);
  T* hit = static_cast<T*>(out.hit);
  const T ninf = -std::numeric_limits<T>::infinity();
  const T tau = static_cast<T>(args.tau);
  const T gs = static_cast<T>(args.grad_scale);

  // The row in the accumulation type, padded with -inf.
  if (args.half_input) {
    args.to_acc(static_cast<const char*>(args.student) + i * m * 2, reinterpret_cast<float*>(X), m);
  } else {
    std::memcpy(X, static_cast<const T*>(args.student) + i * m, static_cast<size_t>(m) * sizeof(T));
  }
  for (int64_t j = m; j < mp; ++j) X[j] = ninf;

  TopkRow<T> row;
  row.y = y;
  row.hw = y >= 0 ? T(1) - a_i : T(0);
  row.sw = a_i > 0 ? a_i : T(0);
  row.w_y = y >= 0 ? w[y] : T(0);
  T P = 0;
  for (int64_t s = 0; s < k; ++s) P += p[s];
  const bool renorm = !args.uniform;
  row.t = (!renorm && m > k) ? (P < T(1) ? T(1) - P : T(0)) / static_cast<T>(m - k) : T(0);
  row.c = row.sw * row.t;
  const bool tail = row.c > 0;
  if (tail) {
    for (int64_t s = 0; s < k; ++s) tm[K[s]] = 0;
  }

  topk_maxima(X, lc, mp, row);
  const T kt = static_cast<T>(1.44269504088896340736 / args.tau);
  T sums[4];
  if (tail) {
    topk_sums<T, Tau1, NeedGrad, true>(X, lc, w, tm, mp, row.r, kt, S, St, sums);
  } else {
    topk_sums<T, Tau1, NeedGrad, false>(X, lc, w, tm, mp, row.r, kt, S, St, sums);
  }
  row.sz = sums[0];
  row.szt = sums[1];
  if (row.r == ninf) row.sz = row.szt = std::numeric_limits<T>::quiet_NaN();  // no softmax: NaN, as dense
  row.L = std::log(row.sz);
  row.Lt = Tau1 ? row.L : std::log(row.szt);

  // The teacher's sums over K, then the loss.
  auto u_at = [&](int64_t j) { return (X[j] - row.r) - lc[j]; };
  T wp = 0, swvu = 0;
  if (row.sw > 0) {
    for (int64_t s = 0; s < k; ++s) {
      const T v = renorm ? p[s] / P : p[s];
      const T wv = w[K[s]] * v;
      wp += wv;
      if (wv > 0) swvu += wv * u_at(K[s]);
    }
    if (tail) {
      wp += row.t * sums[2];
      swvu += row.t * sums[3];
    }
  }
  T loss = 0;
  if (row.hw > 0) loss += row.hw * row.w_y * (row.L - u_at(y));
  if (row.sw > 0) loss += row.sw * tau * tau * (row.Lt * wp - swvu / tau);
  static_cast<T*>(args.loss)[i] = loss;

  // Pass B and the fix-ups.
  const bool direct = !args.half_input;
  T* G = nullptr;
  if (NeedGrad) G = direct ? static_cast<T*>(args.grad) + i * m : Gs;
  if (Tau1) {
    row.c1 = gs * (row.hw * row.w_y + row.sw * wp) / row.sz;
    row.c2 = 0;
  } else {
    row.c1 = gs * row.hw * row.w_y / row.sz;
    row.c2 = gs * row.sw * tau * wp / row.szt;
  }
  const T gtq = gs * tau;
  if (tail) {
    topk_dense<T, Tau1, NeedGrad, true>(X, lc, w, tm, S, St, m, mp, row, gtq, mass, risk, G, direct);
  } else if (NeedGrad) {
    topk_dense<T, Tau1, NeedGrad, false>(X, lc, w, tm, S, St, m, mp, row, gtq, mass, risk, G, direct);
  }
  topk_fixups<T, Tau1, NeedGrad>(X, lc, w, tm, S, St, K, p, k, P, renorm, tail, row, tau, gs, mass, risk,
                                 hit, G);
  if (tail) {
    for (int64_t s = 0; s < k; ++s) tm[K[s]] = 1;
  }
  if (NeedGrad && !direct) args.from_acc(reinterpret_cast<const float*>(G), static_cast<char*>(args.grad) + i * m * 2, m);
}

// Rows [begin, end) with this thread's scratch and accumulators.
template <class T>
void topk_rows(const TopkArgs& args, int64_t begin, int64_t end, TopkOut& out) {
  const int64_t m = args.m;
  const int64_t mp = round_up(m, kPad);
  T* scratch = static_cast<T*>(out.scratch);
  T* tm = scratch + 3 * mp;
  for (int64_t j = 0; j < mp; ++j) tm[j] = j < m ? T(1) : T(0);
  const T* a = static_cast<const T*>(args.a);
  const bool tau1 = args.tau == 1.0;
  using Fn = void (*)(const TopkArgs&, int64_t, T, int64_t, T*, int64_t, TopkOut&);
  const Fn fn = args.need_grad ? (tau1 ? &topk_row<T, true, true> : &topk_row<T, false, true>)
                               : (tau1 ? &topk_row<T, true, false> : &topk_row<T, false, false>);
  const size_t elem = args.half_input ? 2 : sizeof(T);
  for (int64_t i = begin; i < end; ++i) {
    int64_t y = -1;
    bool skip = false, ignored = false;
    if (args.labels != nullptr) {
      y = args.labels[i];
      if (y == args.ignore_index) {
        ignored = skip = true;
      } else if (y < 0 || y >= m) {
        if (out.bad_row < 0) out.bad_row = i;
        skip = true;
      }
    }
    if (!skip) {
      for (int64_t s = 0; s < args.k; ++s) {
        const int64_t j = args.index[i * args.k + s];
        if (j < 0 || j >= m) {
          if (out.bad_index < 0) out.bad_index = i;
          skip = true;
          break;
        }
      }
    }
    if (skip) {
      if (args.need_grad) std::memset(static_cast<char*>(args.grad) + i * m * elem, 0, static_cast<size_t>(m) * elem);
      static_cast<T*>(args.loss)[i] = ignored ? T(0) : std::numeric_limits<T>::quiet_NaN();
      continue;
    }
    fn(args, i, a[i], y, scratch, mp, out);
  }
}
