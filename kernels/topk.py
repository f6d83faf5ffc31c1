"""The fused distillation loss with a sparse top-k teacher in Triton (docs/wide_heads.md).

Row ``i`` gives ``k`` distinct classes ``K_i`` and probabilities ``p_ij`` (``P_i = sum_K p_ij``). The teacher
target is ``v_j = p_j / P`` on ``K_i`` (``"renormalize"``, ``t = 0``) or ``v_j = p_j`` on ``K_i`` and
``t = (1 - P)^+ / (m - k)`` elsewhere (``"uniform"``); ``q = (1 - a) e_y + a p~`` as for a dense teacher
(``kernels/distill.py`` has the math). No dense teacher is formed; three launches, all arithmetic in fp32:

* ``_topk_rows_kernel`` (a program per row): pass 1 over the student row, in column tiles, for
  ``r = max_j (f_j - log c_j)`` and the argmax of ``f`` (first index); pass 2 for ``sum exp(u)``,
  ``sum exp(u / tau)`` (``u = (f - r) - log c``) and, with a uniform tail, ``sum_j w_j`` and
  ``sum_{w_j > 0} w_j u_j`` over the row; then the ``k`` entries: the tail sums are the row sums minus
  their ``K`` part, ``W_p = sum_K w v + t W_tail``, the loss, and per-row numbers for the next launches
  (``u`` and ``a v`` at ``K`` are saved: the gradient may overwrite the student scores).
* ``_topk_grad_kernel`` (column tiles x row groups): the gradient of the tail target
  ``c1 exp(u) + c2 exp(u / tau) - gs tau w a t`` over the whole row, and with a uniform tail that tail's
  per-class ``mass`` (``a t``) and ``risk`` (``a t (L - u)``), partial sums per row group (no atomics).
* ``_topk_fix_kernel`` (a program per row): the gradient at ``K`` and at the label, and the statistics'
  corrections there (``q_j`` minus what the tail put in), and ``q`` at the argmax, as (B, k) and (B,)
  values that the launcher adds per class with ``index_add_`` (on CUDA with atomics: the last bits of
  ``mass``, ``risk``, ``error`` may vary from run to run, unlike the dense kernels').

Rows labelled ``ignore_index`` get loss 0, a zero gradient row and no statistics.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["ROW_STATS"]

ROW_STATS = 10
"""Per-row fp32 numbers passed between the launches: r, L, c1, c2, gs tau a t, a t, 1 - a (label weight),
skip (ignored row), u at the label, inv_tau-free slot (unused)."""


@triton.jit
def _row_tile(row, logc_ptr, start, m, shift, HAS_LOGC: tl.constexpr, BLOCK_N: tl.constexpr):
    """The column tile of a student row from ``start``: its columns, their mask ``cols < m``, ``f`` in fp32
    (``-inf`` past ``m``) and ``(f - shift) - log c`` (no ``log c`` without costs)."""
    cols = start + tl.arange(0, BLOCK_N)
    ok = cols < m
    x = tl.load(row + cols, mask=ok, other=float("-inf")).to(tl.float32)
    u = x - shift
    if HAS_LOGC:
        u = u - tl.load(logc_ptr + cols, mask=ok, other=0.0)
    return cols, ok, x, u


@triton.jit
def _row_maxima(row, logc_ptr, m, HAS_LOGC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pass 1 over a student row: ``r = max_j (f_j - log c_j)`` and the argmax of ``f`` (first index)."""
    ninf = float("-inf")
    r = tl.full((), ninf, tl.float32)
    rf = tl.full((), ninf, tl.float32)
    am = tl.full((), 0, tl.int64)
    for start in range(0, m, BLOCK_N):
        cols, ok, x, z = _row_tile(row, logc_ptr, start, m, 0.0, HAS_LOGC, BLOCK_N)  # z = f - log c (x - 0 is x)
        r = tl.maximum(r, tl.max(z, 0))
        tile_max = tl.max(x, 0)
        tile_am = tl.min(tl.where((x == tile_max) & ok, cols, m), 0).to(tl.int64)
        better = tile_max > rf
        am = tl.where(better, tile_am, am)
        rf = tl.where(better, tile_max, rf)
    return r, am


@triton.jit
def _row_sums(
    row, logc_ptr, w_ptr, m, r, inv_tau,
    HAS_LOGC: tl.constexpr, HAS_W: tl.constexpr, HAS_TAU: tl.constexpr, UNIFORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Pass 2 over a student row: ``sum exp(u)``, ``sum exp(u / tau)`` (``u = (f - r) - log c``) and, with a
    uniform tail, ``sum_j w_j`` and ``sum_{w_j > 0} w_j u_j``."""
    sz = tl.zeros((), tl.float32)
    szt = tl.zeros((), tl.float32)
    w_all = tl.zeros((), tl.float32)
    wu_all = tl.zeros((), tl.float32)
    for start in range(0, m, BLOCK_N):
        cols, ok, _, u = _row_tile(row, logc_ptr, start, m, r, HAS_LOGC, BLOCK_N)
        sz += tl.sum(tl.where(ok, tl.exp(u), 0.0), 0)
        if HAS_TAU:
            szt += tl.sum(tl.where(ok, tl.exp(u * inv_tau), 0.0), 0)
        if UNIFORM:
            wc = tl.where(ok, 1.0, 0.0)
            if HAS_W:
                wc = tl.load(w_ptr + cols, mask=ok, other=0.0)
            w_all += tl.sum(wc, 0)
            wu_all += tl.sum(tl.where(wc > 0, wc * u, 0.0), 0)
    return sz, szt, w_all, wu_all


@triton.jit
def _topk_rows_kernel(
    f_ptr, stride_f, idx_ptr, p_ptr, labels_ptr, a_ptr, logc_ptr, w_ptr, scale_ptr,
    loss_ptr, stats_ptr, am_ptr, uk_ptr, vk_ptr,
    m, k, tau, inv_tau, grad_scale, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_LOGC: tl.constexpr, HAS_W: tl.constexpr, HAS_TAU: tl.constexpr,
    HAS_SCALE: tl.constexpr, UNIFORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64)
    row = f_ptr + i * stride_f
    ninf = float("-inf")
    # pass 1: r = max (f - log c), the argmax of f; pass 2: the exponential sums and the row's weight sums
    r, am = _row_maxima(row, logc_ptr, m, HAS_LOGC, BLOCK_N)
    sz, szt, w_all, wu_all = _row_sums(row, logc_ptr, w_ptr, m, r, inv_tau, HAS_LOGC, HAS_W, HAS_TAU, UNIFORM, BLOCK_N)
    if not HAS_TAU:
        szt = sz
    sz = tl.where(r == ninf, float("nan"), sz)
    szt = tl.where(r == ninf, float("nan"), szt)
    L = tl.log(sz)
    Lt = tl.log(szt)
    # the row's weights
    a_i = tl.load(a_ptr + i)
    sw = tl.where(a_i > 0, a_i, 0.0)
    hw = tl.zeros((), tl.float32)
    skip = tl.zeros((), tl.int1)
    u_y = tl.zeros((), tl.float32)
    w_y = tl.zeros((), tl.float32)
    if HAS_LABELS:
        y = tl.load(labels_ptr + i)
        skip = y == ignore_index
        valid = (y >= 0) & (y < m) & (y != ignore_index)
        y_safe = tl.where(valid, y, 0)
        hw = tl.where(valid, 1.0 - a_i, 0.0)
        w_y = 1.0
        if HAS_W:
            w_y = tl.load(w_ptr + y_safe)
        u_y = tl.load(row + y_safe).to(tl.float32) - r
        if HAS_LOGC:
            u_y = u_y - tl.load(logc_ptr + y_safe)
    # the k entries: P, then the target's sums
    psum = tl.zeros((), tl.float32)
    for s0 in range(0, k, BLOCK_K):
        ks = s0 + tl.arange(0, BLOCK_K)
        psum += tl.sum(tl.load(p_ptr + i * k + ks, mask=ks < k, other=0.0), 0)
    t = tl.zeros((), tl.float32)
    if UNIFORM:
        t = tl.where(m > k, tl.maximum(1.0 - psum, 0.0) / tl.maximum(m - k, 1).to(tl.float32), 0.0)
    wp = tl.zeros((), tl.float32)
    swvu = tl.zeros((), tl.float32)
    w_k = tl.zeros((), tl.float32)
    wu_k = tl.zeros((), tl.float32)
    for s0 in range(0, k, BLOCK_K):
        ks = s0 + tl.arange(0, BLOCK_K)
        kok = ks < k
        j = tl.load(idx_ptr + i * k + ks, mask=kok, other=0)
        p = tl.load(p_ptr + i * k + ks, mask=kok, other=0.0)
        v = p if UNIFORM else p / psum
        uk = tl.load(row + j, mask=kok, other=0.0).to(tl.float32) - r
        if HAS_LOGC:
            uk = uk - tl.load(logc_ptr + j, mask=kok, other=0.0)
        wj = tl.where(kok, 1.0, 0.0)
        if HAS_W:
            wj = tl.load(w_ptr + j, mask=kok, other=0.0)
        wv = wj * v
        wp += tl.sum(wv, 0)
        swvu += tl.sum(tl.where(wv > 0, wv * uk, 0.0), 0)
        w_k += tl.sum(wj, 0)
        wu_k += tl.sum(tl.where(wj > 0, wj * uk, 0.0), 0)
        tl.store(uk_ptr + i * k + ks, uk, mask=kok)
        tl.store(vk_ptr + i * k + ks, sw * v, mask=kok)
    if UNIFORM:
        tail_wu = tl.where(wu_all == ninf, ninf, wu_all - wu_k)
        wp += t * (w_all - w_k)
        swvu += tl.where(t > 0, t * tail_wu, 0.0)
    loss = tl.where(hw > 0, hw * w_y * (L - u_y), 0.0)
    loss += tl.where(sw > 0, sw * tau * tau * (Lt * wp - swvu * inv_tau), 0.0)
    loss = tl.where(skip, 0.0, loss)
    tl.store(loss_ptr + i, loss)
    gs = grad_scale
    if HAS_SCALE:
        gs = gs * tl.load(scale_ptr)
    if HAS_TAU:
        c1 = gs * hw * w_y / sz
        c2 = gs * sw * tau * wp / szt
    else:
        c1 = gs * (hw * w_y + sw * wp) / sz
        c2 = tl.zeros((), tl.float32)
    c = sw * t
    st = stats_ptr + i * 10
    tl.store(st + 0, r)
    tl.store(st + 1, L)
    tl.store(st + 2, c1)
    tl.store(st + 3, c2)
    tl.store(st + 4, gs * tau * c)
    tl.store(st + 5, c)
    tl.store(st + 6, hw)
    tl.store(st + 7, skip.to(tl.float32))
    tl.store(st + 8, u_y)
    tl.store(st + 9, gs)
    tl.store(am_ptr + i, am)


@triton.jit
def _topk_grad_kernel(
    f_ptr, stride_f, logc_ptr, w_ptr, stats_ptr, grad_ptr, stride_o, parts_ptr,
    rows, m, rows_per_group, inv_tau,
    HAS_LOGC: tl.constexpr, HAS_W: tl.constexpr, HAS_TAU: tl.constexpr, UNIFORM: tl.constexpr,
    NEED_GRAD: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < m
    group = tl.program_id(1)
    lc = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_LOGC:
        lc = tl.load(logc_ptr + cols, mask=ok, other=0.0)
    w = tl.full((BLOCK_N,), 1.0, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    mass = tl.zeros((BLOCK_N,), tl.float32)
    risk = tl.zeros((BLOCK_N,), tl.float32)
    first = group * rows_per_group
    for n in range(0, rows_per_group):
        i = (first + n).to(tl.int64)
        if i < rows:
            st = stats_ptr + i * 10
            r = tl.load(st + 0)
            c = tl.load(st + 5)
            skip = tl.load(st + 7) != 0
            keep = tl.load(st + 7) == 0
            x = tl.load(f_ptr + i * stride_f + cols, mask=ok, other=0.0).to(tl.float32)
            u = (x - r) - lc
            if NEED_GRAD:
                g = tl.exp(u) * tl.load(st + 2)
                if HAS_TAU:
                    g += tl.exp(u * inv_tau) * tl.load(st + 3)
                if UNIFORM:
                    g -= w * tl.load(st + 4)
                g = tl.where(skip, 0.0, g)
                tl.store(grad_ptr + i * stride_o + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)
            if UNIFORM:
                take = (c > 0) & keep
                mass += tl.where(take, c, 0.0)
                risk += tl.where(take, c * (tl.load(st + 1) - u), 0.0)
    if UNIFORM:
        out = parts_ptr + group * 2 * m + cols
        tl.store(out, mass, mask=ok)
        tl.store(out + m, risk, mask=ok)


@triton.jit
def _topk_fix_kernel(
    idx_ptr, uk_ptr, vk_ptr, labels_ptr, w_ptr, stats_ptr, am_ptr, grad_ptr, stride_o,
    dmass_ptr, drisk_ptr, ymass_ptr, yrisk_ptr, hit_ptr,
    m, k, tau, inv_tau,
    HAS_LABELS: tl.constexpr, HAS_W: tl.constexpr, HAS_TAU: tl.constexpr, NEED_GRAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64)
    st = stats_ptr + i * 10
    L = tl.load(st + 1)
    c1 = tl.load(st + 2)
    c2 = tl.load(st + 3)
    c = tl.load(st + 5)
    hw = tl.load(st + 6)
    skip = tl.load(st + 7) != 0
    keep = tl.load(st + 7) == 0
    gs = tl.load(st + 9)
    am = tl.load(am_ptr + i)
    y = tl.full((), -1, tl.int64)
    if HAS_LABELS:
        y = tl.where(hw != 0, tl.load(labels_ptr + i), -1)
    y_in_k = tl.zeros((), tl.int32)
    am_in_k = tl.zeros((), tl.int32)
    q_am = tl.zeros((), tl.float32)
    for s0 in range(0, k, BLOCK_K):
        ks = s0 + tl.arange(0, BLOCK_K)
        kok = ks < k
        j = tl.load(idx_ptr + i * k + ks, mask=kok, other=0)
        uk = tl.load(uk_ptr + i * k + ks, mask=kok, other=0.0)
        sv = tl.load(vk_ptr + i * k + ks, mask=kok, other=0.0)
        at_y = (j == y) & kok
        h = tl.where(at_y, hw, 0.0)
        q = sv + h
        y_in_k += tl.sum(at_y.to(tl.int32), 0)
        at_am = (j == am) & kok
        am_in_k += tl.sum(at_am.to(tl.int32), 0)
        q_am += tl.sum(tl.where(at_am, q, 0.0), 0)
        dm = q - c
        dr = tl.where(q > 0, q * (L - uk), 0.0) - tl.where(c > 0, c * (L - uk), 0.0)
        tl.store(dmass_ptr + i * k + ks, tl.where(skip, 0.0, dm), mask=kok)
        tl.store(drisk_ptr + i * k + ks, tl.where(skip, 0.0, dr), mask=kok)
        if NEED_GRAD:
            wj = tl.full((BLOCK_K,), 1.0, tl.float32)
            if HAS_W:
                wj = tl.load(w_ptr + j, mask=kok, other=0.0)
            g = tl.exp(uk) * c1
            if HAS_TAU:
                g += tl.exp(uk * inv_tau) * c2
            g -= wj * gs * (tau * sv + h)
            g = tl.where(skip, 0.0, g)
            tl.store(grad_ptr + i * stride_o + j, g.to(grad_ptr.dtype.element_ty), mask=kok)
    # the label outside K: the tail already holds a t there
    fix_y = ((y >= 0).to(tl.int32) + (y_in_k == 0).to(tl.int32) + keep.to(tl.int32)) == 3
    u_y = tl.load(st + 8)
    tl.store(ymass_ptr + i, tl.where(fix_y, hw, 0.0))
    tl.store(yrisk_ptr + i, tl.where(fix_y & (hw > 0), hw * (L - u_y), 0.0))
    if NEED_GRAD:
        if fix_y:
            y_safe = tl.where(y >= 0, y, 0)
            w_y = 1.0
            if HAS_W:
                w_y = tl.load(w_ptr + y_safe)
            g_y = tl.exp(u_y) * c1
            if HAS_TAU:
                g_y += tl.exp(u_y * inv_tau) * c2
            g_y -= w_y * gs * (tau * c + hw)
            tl.store(grad_ptr + i * stride_o + y_safe, g_y.to(grad_ptr.dtype.element_ty))
    q_am = tl.where(am_in_k > 0, q_am, c + tl.where(am == y, hw, 0.0))
    tl.store(hit_ptr + i, tl.where(skip, 0.0, q_am))
