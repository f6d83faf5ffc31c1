"""Launcher of the Triton top-k kernels (``rkd_engine.kernels.topk``): the ``triton`` entry point of ``rkd_engine.ops.topk``.

Checks what the kernels need, allocates the outputs and the small per-row workspaces ((B, 10) fp32 row
numbers, (B, k) values at the teacher's classes, (row groups, 2, m) partial tail statistics), launches the
three kernels on the current stream and adds the per-class corrections with ``index_add_``. Nothing here
reads a device value on the host. With ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rkd_engine.ops import triton_backend as tb

_BLOCK_N = 1024  # classes per column tile
_BLOCK_N_INTERPRETER = 64  # the interpreter runs tiles one operation at a time: small ones, many loops
_BLOCK_K = 128  # teacher entries per step


def available() -> bool:
    """Always: the kernels run wherever the Triton backend runs (``dispatch`` has checked that it does)."""
    return True


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def topk_forward(
    student: Tensor,
    indices: Tensor,
    probs: Tensor,
    uniform: bool,
    labels: Tensor | None,
    a: Tensor,
    log_c: Tensor | None,
    w: Tensor | None,
    *,
    tau: float,
    grad_scale: float,
    need_grad: bool,
    grad_out: Tensor | None = None,
    ignore_index: int = -100,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad, mass, risk, error)`` as ``rkd_engine.ops.topk.sparse_topk_forward`` says."""
    rows, m = student.shape
    k = indices.shape[1]
    device = student.device
    tb._check_runnable(device, student.dtype, m)
    if not student.is_contiguous() or (grad_out is not None and not grad_out.is_contiguous()):
        raise ValueError("student and grad_out must be contiguous")
    for name, t in (("indices", indices), ("probs", probs)):
        if t.device != device or tuple(t.shape) != (rows, k) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous ({rows}, {k}) tensor on {device}")
    from rkd_engine.kernels import topk as kernels

    f32 = dict(dtype=torch.float32, device=device)
    loss = torch.empty(rows, **f32)
    grad = (grad_out if grad_out is not None else torch.empty_like(student)) if need_grad else student.new_empty(0)
    if rows == 0:
        return loss, grad, *(torch.zeros(m, **f32) for _ in range(3))
    stats = torch.empty(rows, kernels.ROW_STATS, **f32)
    argmax = torch.empty(rows, dtype=torch.int64, device=device)
    u_k, v_k, d_mass, d_risk = (torch.empty(rows, k, **f32) for _ in range(4))
    y_mass, y_risk, hit_q = (torch.empty(rows, **f32) for _ in range(3))
    block_n = min(_BLOCK_N_INTERPRETER if tb._interpreting() else _BLOCK_N, _pow2(m))
    block_k = min(_BLOCK_K, _pow2(k))
    tiles = tb._cdiv(m, block_n)
    groups = max(1, min(rows, 8 * tb._sm_count(device) // tiles))
    per_group = tb._cdiv(rows, groups)
    groups = tb._cdiv(rows, per_group)
    parts = torch.empty(groups, 2, m, **f32) if uniform else loss
    flags = dict(HAS_W=w is not None, HAS_TAU=float(tau) != 1.0)
    ptrs = dict(labels=labels if labels is not None else a, log_c=log_c if log_c is not None else a)
    grad_arg = grad if need_grad else student
    with tb._on(device):
        kernels._topk_rows_kernel[(rows,)](
            student, student.stride(0), indices, probs, ptrs["labels"], a, ptrs["log_c"], w if w is not None else a,
            scale if scale is not None else a, loss, stats, argmax, u_k, v_k,
            m, k, float(tau), 1.0 / float(tau), float(grad_scale), int(ignore_index),
            HAS_LABELS=labels is not None, HAS_LOGC=log_c is not None, HAS_SCALE=scale is not None,
            UNIFORM=bool(uniform), BLOCK_N=block_n, BLOCK_K=block_k, **flags,
        )  # fmt: skip
        if need_grad or uniform:
            kernels._topk_grad_kernel[(tiles, groups)](
                student, student.stride(0), ptrs["log_c"], w if w is not None else a, stats, grad_arg, m, parts,
                rows, m, per_group, 1.0 / float(tau),
                HAS_LOGC=log_c is not None, UNIFORM=bool(uniform), NEED_GRAD=bool(need_grad), BLOCK_N=block_n,
                **flags,
            )  # fmt: skip
        kernels._topk_fix_kernel[(rows,)](
            indices, u_k, v_k, ptrs["labels"], w if w is not None else a, stats, argmax, grad_arg, m,
            d_mass, d_risk, y_mass, y_risk, hit_q, m, k, float(tau), 1.0 / float(tau),
            HAS_LABELS=labels is not None, NEED_GRAD=bool(need_grad), BLOCK_K=block_k, **flags,
        )  # fmt: skip
    return (loss, grad, *_class_sums(parts if uniform else None, indices, labels, argmax, m, d_mass, d_risk,
                                     y_mass, y_risk, hit_q))  # fmt: skip


def _class_sums(parts, indices, labels, argmax, m, d_mass, d_risk, y_mass, y_risk, hit_q):
    """``(mass, risk, error)``: the tail's partial sums plus the corrections at K, the label and the argmax."""
    zeros = dict(dtype=torch.float32, device=indices.device)
    mass = parts[:, 0].sum(0) if parts is not None else torch.zeros(m, **zeros)
    risk = parts[:, 1].sum(0) if parts is not None else torch.zeros(m, **zeros)
    flat = indices.reshape(-1)
    mass.index_add_(0, flat, d_mass.reshape(-1))
    risk.index_add_(0, flat, d_risk.reshape(-1))
    if labels is not None:
        at = labels.clamp(0, m - 1)  # ignored or label-free rows add 0 there
        mass.index_add_(0, at, y_mass)
        risk.index_add_(0, at, y_risk)
    hit = torch.zeros(m, **zeros).index_add_(0, argmax, hit_q)
    return mass, risk, mass - hit
