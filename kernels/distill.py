"""Fused robust-distillation rows in Triton: loss, gradient and per-class statistics in one read.

Math (docs/loss.md), per row ``i`` of ``B`` rows and ``m`` classes, all arithmetic in fp32:

    p_i     = softmax((g_i - max_j g_ij) / gamma)          teacher logits (p_i = g_i for probabilities)
    q_i     = (1 - a_i) e_{y_i} + a_i p_i                   target
    z_i     = (f_i - max_j f_ij) - log c                    margin-adjusted student scores
    s_i     = softmax(z_i),   s^tau_i = softmax(z_i / tau)
    loss_i  = (1 - a_i) w_{y_i} (-log s_{i,y_i}) + a_i tau^2 sum_j w_j p_ij (-log s^tau_ij)
    grad_ij = grad_scale [(1 - a_i) w_{y_i} (s_ij - e_{y_i,j}) + a_i tau (s^tau_ij sum_k w_k p_ik - w_j p_ij)]
    mass_j  = sum_i q_ij,   risk_j = sum_i q_ij (-log s_ij),   error_j = sum_i q_ij [argmax_k f_ik != j]

``-log s_ij`` is computed as ``lse(z_i) - z_ij`` (never a log of a rounded probability). A term with
``q_ij = 0`` contributes exactly 0 (``tl.where``, never ``0 * inf``): ``-inf`` teacher logits give
``p_ij = 0`` and no NaN. The argmax is taken on the RAW ``f`` with the first index on ties, as
``torch.argmax``. The gradient is accumulated in fp32 and rounded once, at the store, to the student dtype.

Two paths, chosen by ``fused_config`` (the one place where tiles, warps and the limits live):

* narrow (``m <= NARROW_MAX_CLASSES``): a row (or a [BLOCK_R, BLOCK_M] tile of short rows) is held in
  registers; ``f`` and ``g`` are read once and the gradient written once (3 element-sized accesses per
  logit). A persistent grid of ``P`` programs strides over row blocks; each program keeps ``mass``,
  ``risk``, ``error`` for all ``m`` classes in registers and writes one (3, m) slice of a (P, 3, m)
  partial-statistics workspace at its end.
* wide (``NARROW_MAX_CLASSES < m <= MAX_CLASSES``), two passes over ``f`` and ``g`` (5 accesses per logit):
  pass 1 (one program per row block) streams the row in column tiles with an online (running-maximum
  rescaled) softmax of the student and the teacher together and writes, per row, the loss and the
  statistics that pass 2 needs (a (B, 8) fp32 workspace, see ``_ROW_STATS``); pass 2 runs a grid of
  (column tiles x row groups), re-reads ``f`` and ``g``, writes the gradient and keeps the per-class
  statistics of its column tile over its row group in registers, writing a (row_groups, 3, m) workspace.
  Each gradient element is read (as ``f``) and written by the same program, after pass 1 has finished
  reading every row: writing the gradient in place of the student scores is safe on both paths.

Row sums: each row (each column tile in pass 1) takes two reduction rounds, one ``tl.reduce`` over a
tuple for all maxima and one for all sums (argmax candidates included), so one pass through shared
memory each instead of one per quantity. The loss comes from those sums:
``sum_{p_ij > 0} w_j p_ij (-log s^tau_ij) = lse(z_i / tau) sum_j w_j p_ij - (1/tau) sum_{p_ij > 0} w_j p_ij z_ij``.

Per-class statistics: partial sums per program, then ``_sum_partials_kernel`` adds the slices in a fixed
order. No atomics: the statistics are bitwise reproducible from run to run, and the workspace is small
(mostly L2-resident when stage 2 reads it right after). Workspace, fp32, ``fused_config`` decides ``P``/``R``:
    narrow: P * 3 * m * 4 bytes,  P = min(row blocks, resident programs)  (m = 1000 on 132 SMs: 3 MiB)
    wide:   B * 8 * 4 + R * 3 * m * 4 bytes,  R = min(B / MIN_GROUP_ROWS, 8 * resident programs / column tiles)
            (R * 3 * m * 4 <= about 52 MiB on 132 SMs for any m; (8192, 131072): 33 row groups, 50 MiB)
Stage 2 always runs (one short launch): it writes ``mass``, ``risk`` and ``error`` as three separate
tensors, which a custom op's outputs must be (no aliasing between outputs).

Precision: the teacher is shifted by its row maximum before dividing by ``gamma`` and the student by its
row maximum before subtracting ``log c``, as the reference does, so logits near 1e4 lose nothing. In the
wide pass 1 the student shift is the maximum of the first tile, ``f_ref``, fixed for the whole row;
``z = v - (max_j f_ij - f_ref)`` with ``v = (f - f_ref) - log c`` is corrected once at the end. Running
maxima start at -1e38 rather than -inf so that all -inf tiles (masked columns, padding) give 0, not NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import triton
import triton.language as tl

from rkd_engine.ops.constants import MAX_CLASSES as _MAX_CLASSES

__all__ = [
    "MAX_CLASSES",
    "NARROW_MAX_CLASSES",
    "FusedConfig",
    "fused_config",
    "scale_rows_config",
]

MAX_CLASSES = _MAX_CLASSES  # rkd_engine.ops.constants
"""Widest rows the kernels accept (the issue's target; the argmax is carried exactly in fp32 far beyond)."""

NARROW_MAX_CLASSES = 4096
"""Rows up to this many classes are held in registers (narrow path); wider rows take the two-pass path.

At 4096 classes and 16 warps the narrow kernel compiles to 108 registers per thread for sm_90 (ptxas, no
spills); 8192 classes would need 32 warps or spill. Tune on the device together with ``_TILE``."""

_ROW_STATS = 8
"""Columns of the wide path's per-row workspace: max f, lse(z), lse(z/tau), max g, 1/sum exp, sum w p, w_y, argmax."""

_ELEMENTS_PER_THREAD = 8
"""Row-tile elements per thread on the narrow path and in pass 2 (one 16-byte load of bf16)."""

_WARPS_PER_SM = 16
"""Resident warps per SM the grids assume. At 8 elements per thread the narrow kernel and pass 2 compile to
72-148 registers per thread for rows of 1024 classes or more (ptxas 12.x for sm_90, no spills; packed short
rows take up to 163), so about 16 warps fill the 64K-register file."""

_TILE = 2048
"""Elements per row tile on the narrow path (short rows are packed several to a tile) and in pass 2."""

_WIDE_PASS2_TILE = 1024
"""Columns per wide pass-2 tile (4 warps). Measured on an H100 at (8192, 131072): 5.05 ms against 5.36 ms
for 2048 columns / 8 warps in bf16, equal in fp32 (benchmarks/results/tune_triton_*.csv)."""

_PASS2_WAVES = 8
"""Pass 2 aims at this many programs per resident slot, so that the last wave leaves little idle."""

MIN_GROUP_ROWS = 128
"""Fewest rows per pass-2 row group: each group writes 3 x 4 bytes per class, so the partials add at most
about 4 / MIN_GROUP_ROWS (bf16; half that for fp32) to pass 2's traffic (written, then read by stage 2)."""


@dataclass(frozen=True)
class FusedConfig:
    """Tiles, warps and grids of one fused call (see ``fused_config``)."""

    wide: bool
    block_r: int  # rows per tile (narrow path and wide pass 2)
    block_m: int  # columns per tile: the whole padded row (narrow) or a pass-2 column tile (wide)
    num_warps: int
    programs: int  # narrow: persistent programs; wide: pass-2 row groups (grid axis 1)
    rows_per_group: int = 0  # wide pass 2: rows per row group (a multiple of block_r)
    block_n1: int = 0  # wide pass 1: columns per tile
    block_r1: int = 1  # wide pass 1: rows per program
    num_warps1: int = 4  # wide pass 1 warps

    @property
    def n_parts(self) -> int:
        """Slices of the (n_parts, 3, m) partial-statistics workspace."""
        return self.programs

    def workspace_bytes(self, rows: int, m: int) -> int:
        """fp32 workspace for ``rows`` x ``m`` inputs: ``n_parts * 3 * m * 4`` (+ ``rows * 8 * 4`` when wide)."""
        return 3 * m * 4 * self.n_parts + (rows * _ROW_STATS * 4 if self.wide else 0)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _warps(elements: int, per_thread: int) -> int:
    return max(1, min(16, elements // (32 * per_thread)))


def _slots(num_warps: int, sm_count: int) -> int:
    """Programs of ``num_warps`` warps resident at once on the device."""
    return max(1, _WARPS_PER_SM // num_warps) * sm_count


def fused_config(
    rows: int,
    m: int,
    *,
    sm_count: int,
    narrow_max_classes: int = NARROW_MAX_CLASSES,
    wide_block_n: int | None = None,
    min_group_rows: int = MIN_GROUP_ROWS,
) -> FusedConfig:
    """Tiles, warps and grids for ``rows`` x ``m`` inputs: the one place they are chosen.

    Narrow rows (``m <= narrow_max_classes``): padded to ``BLOCK_M = 2^ceil(log2 m)`` (at least 16), packed
    ``BLOCK_R`` rows to a tile of ``_TILE`` elements (10 classes: 128 rows a tile), 8 elements per thread;
    a persistent grid of one program per resident slot (``_WARPS_PER_SM / num_warps`` per SM).
    Wide rows: pass 1 streams one row per program in tiles of 4096 columns (16 elements per thread: it
    keeps no per-class state); pass 2 runs (column tiles of 2048) x (row groups), with enough row groups
    for ``_PASS2_WAVES`` programs per slot but at least ``min_group_rows`` rows each.
    ``narrow_max_classes``, ``wide_block_n`` and ``min_group_rows`` let tests force the wide path, small
    tiles and several row groups on small inputs; ``wide_block_n`` also packs two rows per pass-2 tile.

    Raises ValueError for ``m`` outside [1, MAX_CLASSES] or ``rows < 1``.
    """
    if m < 1 or m > MAX_CLASSES:
        raise ValueError(f"m must be in [1, {MAX_CLASSES}] for the Triton kernels, got {m}")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    sm_count = max(1, int(sm_count))
    if m <= narrow_max_classes:
        block_m = max(16, _pow2(m))
        block_r = max(1, min(_TILE // block_m, _pow2(rows)))
        num_warps = _warps(block_r * block_m, _ELEMENTS_PER_THREAD)
        programs = min(triton.cdiv(rows, block_r), _slots(num_warps, sm_count))
        return FusedConfig(False, block_r, block_m, num_warps, programs)
    block_n1 = wide_block_n or min(4096, _pow2(m))
    block_n = wide_block_n or min(_WIDE_PASS2_TILE, _pow2(m))
    block_r = 1 if wide_block_n is None else 2
    num_warps = _warps(block_r * block_n, _ELEMENTS_PER_THREAD)
    n_col = triton.cdiv(m, block_n)
    slots = _slots(num_warps, sm_count)
    groups = max(1, min(triton.cdiv(rows, max(1, min_group_rows)), triton.cdiv(_PASS2_WAVES * slots, n_col)))
    rows_per_group = triton.cdiv(triton.cdiv(rows, groups), block_r) * block_r
    groups = triton.cdiv(rows, rows_per_group)
    return FusedConfig(True, block_r, block_n, num_warps, groups, rows_per_group, block_n1, 1, _warps(block_n1, 16))


def scale_rows_config(m: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of ``_scale_rows_kernel``: column tiles of up to 4096 elements."""
    block = min(4096, max(16, _pow2(m)))
    return block, 4 if block <= 1024 else 8


@triton.jit
def _max3(a0, b0, c0, a1, b1, c1):
    return tl.maximum(a0, a1), tl.maximum(b0, b1), tl.maximum(c0, c1)


@triton.jit
def _min_sum5(i0, a0, b0, c0, d0, e0, i1, a1, b1, c1, d1, e1):
    return tl.minimum(i0, i1), a0 + a1, b0 + b1, c0 + c1, d0 + d1, e0 + e1


@triton.jit
def _min_sum7(i0, a0, b0, c0, d0, e0, f0, g0, i1, a1, b1, c1, d1, e1, f1, g1):
    return tl.minimum(i0, i1), a0 + a1, b0 + b1, c0 + c1, d0 + d1, e0 + e1, f0 + f1, g0 + g1


@triton.jit
def _row_loss(
    a,
    lse_z,
    lse_t,
    z_y,
    w_y,
    wp,
    wpz,
    tau,
    inv_tau,
    HAS_TEACHER: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_TAU: tl.constexpr,
):
    """``loss_i`` from row sums: ``wp = sum_j w_j p_ij``, ``wpz = sum_{p_ij > 0} w_j p_ij z_ij``.

    ``sum_{p_ij > 0} w_j p_ij (-log s^tau_ij) = lse(z_i / tau) wp - wpz / tau``; each part is 0 where its
    weight (``1 - a_i`` or ``a_i``) is 0, as in the reference.
    """
    loss = tl.zeros(a.shape, tl.float32)
    if HAS_LABELS:
        loss += tl.where((1.0 - a) > 0.0, (1.0 - a) * w_y * (lse_z - z_y), 0.0)
    if HAS_TEACHER:
        if HAS_TAU:
            soft = (tau * tau) * (lse_t * wp - inv_tau * wpz)
        else:
            soft = lse_z * wp - wpz
        loss += tl.where(a > 0.0, a * soft, 0.0)
    return loss


@triton.jit
def _grad_rows(
    s,
    s_t,
    p,
    w,
    wp,
    a,
    w_y,
    onehot,
    tau,
    grad_scale,
    HAS_TEACHER: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_TAU: tl.constexpr,
):
    """``grad_scale * dloss/df`` of a [BLOCK_R, N] tile; row quantities are [BLOCK_R] vectors."""
    grad = tl.zeros(s.shape, tl.float32)
    if HAS_LABELS:
        grad += ((1.0 - a) * w_y)[:, None] * (s - onehot.to(tl.float32))
    if HAS_TEACHER:
        if HAS_TAU:
            grad += (a * tau)[:, None] * (s_t * wp[:, None] - w[None, :] * p)
        else:
            grad += a[:, None] * (s * wp[:, None] - w[None, :] * p)
    return grad * grad_scale


@triton.jit
def _target(p, a, onehot, mask, HAS_TEACHER: tl.constexpr, HAS_LABELS: tl.constexpr):
    """``q = (1 - a) e_y + a p`` on a tile, 0 outside ``mask``."""
    q = tl.zeros(mask.shape, tl.float32)
    if HAS_TEACHER:
        q += a[:, None] * p
    if HAS_LABELS:
        q += tl.where(onehot, (1.0 - a)[:, None], 0.0)
    return tl.where(mask, q, 0.0)


@triton.jit
def _store_stats(part_ptr, slot, m, cols, col_ok, acc_mass, acc_risk, acc_error):
    """Write a program's column sums into slice ``slot`` of the (n_parts, 3, m) workspace."""
    base = part_ptr + slot.to(tl.int64) * 3 * m
    tl.store(base + cols, tl.sum(acc_mass, axis=0), mask=col_ok)
    tl.store(base + m + cols, tl.sum(acc_risk, axis=0), mask=col_ok)
    tl.store(base + 2 * m + cols, tl.sum(acc_error, axis=0), mask=col_ok)


@triton.jit
def _class_vectors(logc_ptr, w_ptr, cols, col_ok, HAS_LOGC: tl.constexpr, HAS_W: tl.constexpr):
    """``log c`` (0 without costs) and ``w`` (1 without weights) on the columns ``cols``."""
    log_c = tl.zeros(cols.shape, tl.float32)
    if HAS_LOGC:
        log_c = tl.load(logc_ptr + cols, mask=col_ok, other=0.0)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
    else:
        w = tl.full(cols.shape, 1.0, tl.float32)
    return log_c, w


@triton.jit
def _grad_scale(grad_scale, scale_ptr, HAS_SCALE: tl.constexpr):
    """The gradient's scale: ``grad_scale``, times the device scalar at ``scale_ptr`` when there is one."""
    if HAS_SCALE:
        grad_scale = grad_scale * tl.load(scale_ptr)
    return grad_scale


@triton.jit
def _load_scores(
    f_ptr,
    stride_f,
    g_ptr,
    stride_g,
    rows64,
    cols,
    row_ok,
    col_ok,
    HAS_TEACHER: tl.constexpr,
    TEACHER_PROBS: tl.constexpr,
):
    """A [R, N] tile of student scores and teacher values as fp32: ``f`` is ``-inf`` outside the row, ``g``
    too for logits (0 for probabilities); without a teacher ``g`` is ``f`` (it stands in for the teacher in
    the fused reductions; the results are unused)."""
    mask = row_ok[:, None] & col_ok[None, :]
    f = tl.load(f_ptr + rows64[:, None] * stride_f + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    f = tl.where(col_ok[None, :], f, float("-inf"))
    g = f
    if HAS_TEACHER:
        g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if not TEACHER_PROBS:
            g = tl.where(col_ok[None, :], g, float("-inf"))
    return f, g


@triton.jit
def _teacher_max_input(g, TEACHER_PROBS: tl.constexpr):
    """What the maxima round reduces for the teacher: ``g`` for logits; ``-p`` for probabilities, whose
    maximum is then > 0 exactly when an entry is negative (see ``_flag_teacher``)."""
    if TEACHER_PROBS:
        return -g
    return g


@triton.jit
def _flag_teacher(loss, sum_g, g_top, prob_tol, HAS_TEACHER: tl.constexpr, TEACHER_PROBS: tl.constexpr):
    """``loss`` with NaN in the rows whose teacher is invalid, whatever ``a`` (the call's status, see
    ``rkd_engine.ops.checks``), from the row's sums: logits with a NaN or ``+inf``, or ``-inf`` everywhere,
    make ``sum_g`` (the sum of ``exp((g - max g) / gamma)``) NaN or 0; probabilities are flagged for a
    negative entry (``g_top = max(-p) > 0``) or a sum off 1 by more than ``prob_tol`` (NaN included)."""
    if HAS_TEACHER:
        if TEACHER_PROBS:
            bad = (g_top > 0.0) | ~(tl.abs(sum_g - 1.0) <= prob_tol)
        else:
            bad = ~(sum_g > 0.0)
        loss = tl.where(bad, float("nan"), loss)
    return loss


@triton.jit
def _store_grad(grad_ptr, stride_o, rows64, cols, mask, keep, grad):
    """Store a [R, N] gradient tile in the gradient's dtype, 0 in the rows not kept (``ignore_index``)."""
    grad = tl.where(keep[:, None], grad, 0.0)
    tl.store(grad_ptr + rows64[:, None] * stride_o + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_stats(
    acc_mass,
    acc_risk,
    acc_error,
    p,
    a,
    onehot,
    mask,
    nls,
    cols,
    pred,
    HAS_TEACHER: tl.constexpr,
    HAS_LABELS: tl.constexpr,
):
    """Add a tile's target ``q`` (``_target``, 0 outside ``mask``) to the per-class sums: mass, risk
    ``q (-log s)``, error (``q`` off the argmax ``pred``)."""
    q = _target(p, a, onehot, mask, HAS_TEACHER, HAS_LABELS)
    acc_mass += q
    acc_risk += tl.where(q > 0.0, q * nls, 0.0)
    acc_error += tl.where(cols[None, :] != pred[:, None], q, 0.0)
    return acc_mass, acc_risk, acc_error


@triton.jit
def _fused_narrow_kernel(
    f_ptr,  # student f: (B, m) fp32/bf16/fp16, row stride stride_f, column stride 1
    stride_f,
    g_ptr,  # teacher g: (B, m) student dtype, row stride stride_g (logits, or probabilities if TEACHER_PROBS)
    stride_g,
    y_ptr,  # labels y: (B,) int64
    a_ptr,  # a: (B,) fp32, weight of the teacher in q
    logc_ptr,  # log c: (m,) fp32
    w_ptr,  # w: (m,) fp32 per-class weights
    grad_ptr,  # gradient: (B, m) student dtype, row stride stride_o; may be f_ptr itself
    stride_o,
    loss_ptr,  # loss: (B,) fp32
    part_ptr,  # partial statistics: (P, 3, m) fp32 contiguous, P = number of programs
    n_rows,  # B
    m,
    inv_gamma,  # 1 / gamma
    tau,
    inv_tau,
    grad_scale,
    scale_ptr,  # a 0-d fp32 tensor multiplying the gradient (read when HAS_SCALE)
    ignore_index,  # rows labelled so contribute nothing (with HAS_LABELS)
    prob_tol,  # teacher probabilities: a row whose sum is off 1 by more gets a NaN loss
    HAS_TEACHER: tl.constexpr,
    TEACHER_PROBS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_LOGC: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_TAU: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Narrow path: [BLOCK_R, BLOCK_M] tiles of whole rows, a persistent grid striding over row blocks."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_M)
    col_ok = cols < m
    grad_scale = _grad_scale(grad_scale, scale_ptr, HAS_SCALE)
    log_c, w = _class_vectors(logc_ptr, w_ptr, cols, col_ok, HAS_LOGC, HAS_W)
    acc_mass = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    acc_risk = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    acc_error = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    for rb in range(pid, tl.cdiv(n_rows, BLOCK_R), n_prog):
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & col_ok[None, :]
        f, g = _load_scores(f_ptr, stride_f, g_ptr, stride_g, rows64, cols, row_ok, col_ok, HAS_TEACHER, TEACHER_PROBS)
        a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
        f_adj = f
        if HAS_LOGC:
            f_adj = f - log_c[None, :]
        # Two reduction rounds per row (all maxima, then all sums): each costs one pass through shared memory.
        f_max, f_adj_max, g_max = tl.reduce((f, f_adj, _teacher_max_input(g, TEACHER_PROBS)), 1, _max3)
        z = f - f_max[:, None]
        z_top = tl.zeros([BLOCK_R], tl.float32)  # max_j z_ij: exactly 0 without log c
        if HAS_LOGC:
            z = z - log_c[None, :]
            z_top = f_adj_max - f_max  # max_j z_ij up to rounding: keeps exp(z - z_top) <= ~1
        e_z = tl.exp(z - z_top[:, None])
        e_t = e_z
        if HAS_TAU:
            e_t = tl.exp((z - z_top[:, None]) * inv_tau)
        first = tl.where(f == f_max[:, None], cols[None, :], BLOCK_M)
        onehot = cols[None, :] < 0
        pick_z = e_z
        pick_w = e_z
        keep = row_ok
        if HAS_LABELS:
            y = tl.load(y_ptr + rows, mask=row_ok, other=0)
            keep = row_ok & (y != ignore_index)
            onehot = cols[None, :] == y[:, None]
            pick_z = tl.where(onehot, z, 0.0)
            pick_w = tl.where(onehot, w[None, :], 0.0)
        e_g = e_z
        wg = e_z
        wgz = e_z
        if HAS_TEACHER:
            e_g = g
            if not TEACHER_PROBS:
                e_g = tl.exp((g - g_max[:, None]) * inv_gamma)
            wg = w[None, :] * e_g
            wgz = tl.where(e_g > 0.0, wg * z, 0.0)
        pred, sum_z, sum_t, sum_g, sum_wg, sum_wgz, z_y, w_y = tl.reduce(
            (first, e_z, e_t, e_g, wg, wgz, pick_z, pick_w), 1, _min_sum7
        )
        lse_z = z_top + tl.log(sum_z)
        lse_t = lse_z
        s = e_z * (1.0 / sum_z)[:, None]
        s_t = s
        if HAS_TAU:
            lse_t = z_top * inv_tau + tl.log(sum_t)
            s_t = e_t * (1.0 / sum_t)[:, None]
        inv_g = tl.full([BLOCK_R], 1.0, tl.float32)
        if HAS_TEACHER and not TEACHER_PROBS:
            inv_g = 1.0 / sum_g
        wp = sum_wg * inv_g
        loss = _row_loss(a, lse_z, lse_t, z_y, w_y, wp, sum_wgz * inv_g, tau, inv_tau, HAS_TEACHER, HAS_LABELS, HAS_TAU)
        loss = _flag_teacher(loss, sum_g, g_max, prob_tol, HAS_TEACHER, TEACHER_PROBS)
        tl.store(loss_ptr + rows, tl.where(keep, loss, 0.0), mask=row_ok)
        p = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
        if HAS_TEACHER:
            p = e_g * inv_g[:, None]
        nls = lse_z[:, None] - z  # -log s_ij

        if NEED_GRAD:
            grad = _grad_rows(s, s_t, p, w, wp, a, w_y, onehot, tau, grad_scale, HAS_TEACHER, HAS_LABELS, HAS_TAU)
            _store_grad(grad_ptr, stride_o, rows64, cols, mask, keep, grad)

        acc_mass, acc_risk, acc_error = _add_stats(
            acc_mass, acc_risk, acc_error, p, a, onehot, mask & keep[:, None], nls, cols, pred, HAS_TEACHER, HAS_LABELS
        )
    _store_stats(part_ptr, pid, m, cols, col_ok, acc_mass, acc_risk, acc_error)


@triton.jit
def _wide_tile_update(
    f, v, g, c, w, pred, f_max, v_max, sum_z, sum_t, g_max, sum_g, sum_wg, sum_wgv, inv_gamma, inv_tau,
    HAS_TEACHER: tl.constexpr, TEACHER_PROBS: tl.constexpr, HAS_W: tl.constexpr, HAS_TAU: tl.constexpr,
):  # fmt: skip
    """Wide pass 1: fold one column tile (scores ``f``, ``v = (f - f_ref) - log c``, teacher ``g``, columns
    ``c``, weights ``w``) into a row's running maxima and rescaled sums; returns the new state."""
    # Two reduction rounds per tile (maxima, then sums), each one pass through shared memory.
    t_f_max, t_v_max, t_g_max = tl.reduce((f, v, _teacher_max_input(g, TEACHER_PROBS)), 1, _max3)
    new_v_max = tl.maximum(v_max, t_v_max)
    e_v = tl.exp(v - new_v_max[:, None])
    e_t = e_v
    if HAS_TAU:
        e_t = tl.exp((v - new_v_max[:, None]) * inv_tau)
    first = tl.where(f == t_f_max[:, None], c[None, :], 2147483647)
    e_g = e_v
    wg = e_v
    wgv = e_v
    rescale = tl.full(v_max.shape, 1.0, tl.float32)
    if HAS_TEACHER:
        e_g = g
        new_g_max = tl.maximum(g_max, t_g_max)  # probabilities: the running max of -p (see _flag_teacher)
        if not TEACHER_PROBS:
            rescale = tl.exp((g_max - new_g_max) * inv_gamma)
            e_g = tl.exp((g - new_g_max[:, None]) * inv_gamma)
        g_max = new_g_max
        wg = e_g
        if HAS_W:
            wg = w[None, :] * e_g
        wgv = tl.where(e_g > 0.0, wg * v, 0.0)
    t_arg, t_sum_z, t_sum_t, t_sum_g, t_sum_wg, t_sum_wgv = tl.reduce((first, e_v, e_t, e_g, wg, wgv), 1, _min_sum5)
    pred = tl.where(t_f_max > f_max, t_arg, pred)  # strict: an earlier tile keeps its first index on ties
    f_max = tl.maximum(f_max, t_f_max)
    sum_z = sum_z * tl.exp(v_max - new_v_max) + t_sum_z
    if HAS_TAU:
        sum_t = sum_t * tl.exp((v_max - new_v_max) * inv_tau) + t_sum_t
    if HAS_TEACHER:
        sum_g = sum_g * rescale + t_sum_g
        sum_wg = sum_wg * rescale + t_sum_wg
        sum_wgv = sum_wgv * rescale + t_sum_wgv
    return pred, f_max, new_v_max, sum_z, sum_t, g_max, sum_g, sum_wg, sum_wgv


@triton.jit
def _label_terms(
    f_row, y_ptr, logc_ptr, w_ptr, rows, row_ok, f_max, m, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_LOGC: tl.constexpr, HAS_W: tl.constexpr,
):  # fmt: skip
    """Wide pass 1: each row's ``z_y``, ``w_y`` (0 and 1 without labels) and whether it is kept (its label
    is not ``ignore_index``)."""
    z_y = tl.zeros(f_max.shape, tl.float32)
    w_y = tl.full(f_max.shape, 1.0, tl.float32)
    keep = row_ok
    if HAS_LABELS:
        y = tl.load(y_ptr + rows, mask=row_ok, other=0)
        keep = row_ok & (y != ignore_index)
        y_ok = row_ok & (y >= 0) & (y < m)
        z_y = tl.load(f_row + y, mask=y_ok, other=0.0).to(tl.float32) - f_max
        if HAS_LOGC:
            z_y = z_y - tl.load(logc_ptr + y, mask=y_ok, other=0.0)
        if HAS_W:
            w_y = tl.load(w_ptr + y, mask=y_ok, other=0.0)
    return z_y, w_y, keep


@triton.jit
def _wide_rows_kernel(
    f_ptr,  # student f: (B, m) fp32/bf16/fp16, row stride stride_f, column stride 1
    stride_f,
    g_ptr,  # teacher g: (B, m) student dtype, row stride stride_g
    stride_g,
    y_ptr,  # labels y: (B,) int64
    a_ptr,  # a: (B,) fp32
    logc_ptr,  # log c: (m,) fp32
    w_ptr,  # w: (m,) fp32
    loss_ptr,  # loss: (B,) fp32
    stat_ptr,  # per-row statistics: (B, 8) fp32 contiguous, columns as in _ROW_STATS
    n_rows,
    m,
    inv_gamma,
    tau,
    inv_tau,
    ignore_index,
    prob_tol,  # teacher probabilities: a row whose sum is off 1 by more gets a NaN loss
    HAS_TEACHER: tl.constexpr,
    TEACHER_PROBS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_LOGC: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_TAU: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Wide pass 1: online softmax of student and teacher over column tiles; per-row loss and statistics."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    f_row = f_ptr + rows64 * stride_f
    cols = tl.arange(0, BLOCK_N)

    f0 = tl.load(f_row[:, None] + cols[None, :], mask=row_ok[:, None] & (cols < m)[None, :], other=float("-inf"))
    f_ref = tl.max(f0.to(tl.float32), axis=1)
    f_ref = tl.where(f_ref > float("-inf"), f_ref, 0.0)

    f_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    pred = tl.zeros([BLOCK_R], tl.int32)
    v_max = tl.full([BLOCK_R], -1.0e38, tl.float32)  # running max of v = (f - f_ref) - log c
    sum_z = tl.zeros([BLOCK_R], tl.float32)  # sum exp(v - v_max)
    sum_t = tl.zeros([BLOCK_R], tl.float32)  # sum exp((v - v_max) / tau)
    g_max = tl.full([BLOCK_R], -1.0e38, tl.float32)
    sum_g = tl.zeros([BLOCK_R], tl.float32)  # sum e_g, e_g = exp((g - g_max) / gamma) (or p)
    sum_wg = tl.zeros([BLOCK_R], tl.float32)  # sum w e_g
    sum_wgv = tl.zeros([BLOCK_R], tl.float32)  # sum w e_g v over e_g > 0
    for start in range(0, m, BLOCK_N):
        c = start + cols
        c_ok = c < m
        f, g = _load_scores(f_ptr, stride_f, g_ptr, stride_g, rows64, c, row_ok, c_ok, HAS_TEACHER, TEACHER_PROBS)
        log_c, w = _class_vectors(logc_ptr, w_ptr, c, c_ok, HAS_LOGC, HAS_W)
        v = f - f_ref[:, None]
        if HAS_LOGC:
            v = v - log_c[None, :]
        pred, f_max, v_max, sum_z, sum_t, g_max, sum_g, sum_wg, sum_wgv = _wide_tile_update(
            f, v, g, c, w, pred, f_max, v_max, sum_z, sum_t, g_max, sum_g, sum_wg, sum_wgv, inv_gamma, inv_tau,
            HAS_TEACHER, TEACHER_PROBS, HAS_W, HAS_TAU,
        )  # fmt: skip

    shift = f_max - f_ref  # z = v - shift
    lse_z = (v_max - shift) + tl.log(sum_z)
    lse_t = lse_z
    if HAS_TAU:
        lse_t = (v_max - shift) * inv_tau + tl.log(sum_t)
    a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
    z_y, w_y, keep = _label_terms(
        f_row, y_ptr, logc_ptr, w_ptr, rows, row_ok, f_max, m, ignore_index, HAS_LABELS, HAS_LOGC, HAS_W
    )
    inv_g = tl.full([BLOCK_R], 1.0, tl.float32)
    if HAS_TEACHER and not TEACHER_PROBS:
        inv_g = 1.0 / sum_g
    wp = sum_wg * inv_g
    wpz = (sum_wgv - shift * sum_wg) * inv_g  # sum_j w_j p_ij z_ij over p_ij > 0
    loss = _row_loss(a, lse_z, lse_t, z_y, w_y, wp, wpz, tau, inv_tau, HAS_TEACHER, HAS_LABELS, HAS_TAU)
    loss = _flag_teacher(loss, sum_g, g_max, prob_tol, HAS_TEACHER, TEACHER_PROBS)
    tl.store(loss_ptr + rows, tl.where(keep, loss, 0.0), mask=row_ok)
    out = stat_ptr + rows64 * 8
    tl.store(out, f_max, mask=row_ok)
    tl.store(out + 1, lse_z, mask=row_ok)
    tl.store(out + 2, lse_t, mask=row_ok)
    tl.store(out + 3, g_max, mask=row_ok)
    tl.store(out + 4, inv_g, mask=row_ok)
    tl.store(out + 5, wp, mask=row_ok)
    tl.store(out + 6, w_y, mask=row_ok)
    tl.store(out + 7, pred.to(tl.float32), mask=row_ok)  # exact: m <= 2^24


@triton.jit
def _wide_grad_kernel(
    f_ptr,  # student f: (B, m), row stride stride_f, column stride 1
    stride_f,
    g_ptr,  # teacher g: (B, m), row stride stride_g
    stride_g,
    y_ptr,  # labels y: (B,) int64
    a_ptr,  # a: (B,) fp32
    logc_ptr,  # log c: (m,) fp32
    w_ptr,  # w: (m,) fp32
    stat_ptr,  # per-row statistics of pass 1: (B, 8) fp32 contiguous
    grad_ptr,  # gradient: (B, m) student dtype, row stride stride_o; may be f_ptr itself
    stride_o,
    part_ptr,  # partial statistics: (R, 3, m) fp32 contiguous, R = grid axis 1 (row groups)
    n_rows,
    m,
    rows_per_group,
    inv_gamma,
    tau,
    inv_tau,
    grad_scale,
    scale_ptr,
    ignore_index,
    HAS_TEACHER: tl.constexpr,
    TEACHER_PROBS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_LOGC: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_TAU: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Wide pass 2: program (column tile, row group) writes its gradient tile and its column statistics."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < m
    grad_scale = _grad_scale(grad_scale, scale_ptr, HAS_SCALE)
    log_c, w = _class_vectors(logc_ptr, w_ptr, cols, col_ok, HAS_LOGC, HAS_W)
    acc_mass = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    acc_risk = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    acc_error = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    row_start = pid_r * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, n_rows)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & col_ok[None, :]
        st = stat_ptr + rows64 * 8
        f_max = tl.load(st, mask=row_ok, other=0.0)
        lse_z = tl.load(st + 1, mask=row_ok, other=0.0)
        pred = tl.load(st + 7, mask=row_ok, other=0.0).to(tl.int32)
        a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
        f = tl.load(f_ptr + rows64[:, None] * stride_f + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = f - f_max[:, None]
        if HAS_LOGC:
            z = z - log_c[None, :]
        nls = lse_z[:, None] - z
        s = tl.exp(z - lse_z[:, None])
        onehot = cols[None, :] < 0
        w_y = a
        keep = row_ok
        if HAS_LABELS:
            y = tl.load(y_ptr + rows, mask=row_ok, other=0)
            keep = row_ok & (y != ignore_index)
            onehot = cols[None, :] == y[:, None]
            w_y = tl.load(st + 6, mask=row_ok, other=0.0)
        p = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        wp = a
        s_t = s
        if HAS_TEACHER:
            g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if TEACHER_PROBS:
                p = g
            else:
                g_max = tl.load(st + 3, mask=row_ok, other=0.0)
                inv_g = tl.load(st + 4, mask=row_ok, other=0.0)
                p = tl.exp((g - g_max[:, None]) * inv_gamma) * inv_g[:, None]
            wp = tl.load(st + 5, mask=row_ok, other=0.0)
            if HAS_TAU:
                lse_t = tl.load(st + 2, mask=row_ok, other=0.0)
                s_t = tl.exp(z * inv_tau - lse_t[:, None])
        if NEED_GRAD:
            grad = _grad_rows(s, s_t, p, w, wp, a, w_y, onehot, tau, grad_scale, HAS_TEACHER, HAS_LABELS, HAS_TAU)
            _store_grad(grad_ptr, stride_o, rows64, cols, mask, keep, grad)
        acc_mass, acc_risk, acc_error = _add_stats(
            acc_mass, acc_risk, acc_error, p, a, onehot, mask & keep[:, None], nls, cols, pred, HAS_TEACHER, HAS_LABELS
        )
    _store_stats(part_ptr, pid_r, m, cols, col_ok, acc_mass, acc_risk, acc_error)


@triton.jit
def _sum_partials_kernel(
    part_ptr,  # partial statistics: (n_parts, 3, m) fp32 contiguous
    mass_ptr,  # mass: (m,) fp32
    risk_ptr,  # risk: (m,) fp32
    error_ptr,  # error: (m,) fp32
    n_parts,
    m,
    BLOCK: tl.constexpr,
    PARTS: tl.constexpr,
):
    """Stage 2: sum the slices in a fixed order (reproducible), one program per BLOCK classes.

    Each step loads a (PARTS, BLOCK) tile of slices, so the loop runs n_parts / PARTS times.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < m
    mass = tl.zeros([PARTS, BLOCK], tl.float32)
    risk = tl.zeros([PARTS, BLOCK], tl.float32)
    error = tl.zeros([PARTS, BLOCK], tl.float32)
    stride = 3 * m
    for p0 in range(0, n_parts, PARTS):
        parts = p0 + tl.arange(0, PARTS)
        ptr = part_ptr + parts.to(tl.int64)[:, None] * stride + offs[None, :]
        mask = (parts < n_parts)[:, None] & ok[None, :]
        mass += tl.load(ptr, mask=mask, other=0.0)
        risk += tl.load(ptr + m, mask=mask, other=0.0)
        error += tl.load(ptr + 2 * m, mask=mask, other=0.0)
    tl.store(mass_ptr + offs, tl.sum(mass, axis=0), mask=ok)
    tl.store(risk_ptr + offs, tl.sum(risk, axis=0), mask=ok)
    tl.store(error_ptr + offs, tl.sum(error, axis=0), mask=ok)


@triton.jit
def _scale_rows_kernel(
    grad_ptr,  # gradient: (B, m) fp32/bf16/fp16, row stride stride, column stride 1; scaled in place
    stride,
    go_ptr,  # upstream gradient per row: (B,) fp32
    m,
    BLOCK: tl.constexpr,
):
    """``grad[i, :] *= go[i]``, one program per row looping over column tiles; a row with ``go[i] == 1``
    is neither read nor written (the usual ``loss.backward()``: the launch then costs one load per row)."""
    row = tl.program_id(0)
    go = tl.load(go_ptr + row)
    if go != 1.0:
        base = grad_ptr + row.to(tl.int64) * stride
        for start in range(0, m, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < m
            x = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(base + cols, (x * go).to(grad_ptr.dtype.element_ty), mask=ok)
