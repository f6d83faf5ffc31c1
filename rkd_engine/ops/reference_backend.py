"""The pure-PyTorch backend: ``rkd_engine.reference`` behind the backend contract. Runs anywhere."""

from __future__ import annotations

import torch
from torch import Tensor

from rkd_engine import reference
from rkd_engine.ops.checks import PROB_SUM_TOL


def unavailable_reason(device: torch.device, dtype: torch.dtype, m: int) -> str | None:
    """The reference runs on every device and floating dtype."""
    return None


def fused_forward(
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor | None,
    a: Tensor,
    log_c: Tensor | None,
    w: Tensor | None,
    *,
    gamma: float,
    tau: float,
    teacher_is_probs: bool,
    grad_scale: float,
    need_grad: bool,
    grad_out: Tensor | None = None,
    ignore_index: int = -100,
    scale: Tensor | None = None,
    prob_tol: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss per row, ``grad_scale * scale * dloss/df`` and per-class ``mass``, ``risk``, ``error``; rows
    labelled ``ignore_index`` contribute nothing. A row with invalid teacher values has a NaN loss whatever
    its ``a`` (``bad_teacher_rows``), as in the kernels: the call's status."""
    out = reference.fused_rows(
        student,
        teacher=teacher,
        teacher_is_probs=teacher_is_probs,
        labels=labels,
        a=a,
        gamma=gamma,
        log_c=log_c,
        w=w,
        tau=tau,
        grad_scale=grad_scale,
        need_grad=need_grad,
        ignore_index=ignore_index,
        scale=scale,
    )
    grad = out.grad
    if need_grad and grad_out is not None:
        grad = grad_out.copy_(grad)
    loss = out.loss
    if teacher is not None:
        bad = bad_teacher_rows(teacher, teacher_is_probs, prob_tol)
        if labels is not None:
            bad = bad & (labels != ignore_index)
        loss = torch.where(bad, torch.full_like(loss, float("nan")), loss)
    return loss, grad, out.mass, out.risk, out.error


def bad_teacher_rows(teacher: Tensor, teacher_is_probs: bool, prob_tol: float | None = None) -> Tensor:
    """(B,) bool: teacher rows the kernels flag with a NaN loss. Logits: a NaN or ``+inf``, or ``-inf``
    everywhere; probabilities: a negative entry, or a sum (fp32 accumulation, fp64 for fp64) off 1 by more
    than ``prob_tol`` (default ``PROB_SUM_TOL`` of the dtype; NaN and infinities included)."""
    if not teacher_is_probs:
        return (torch.isnan(teacher) | torch.isposinf(teacher)).any(-1) | torch.isneginf(teacher).all(-1)
    acc = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    sums = teacher.to(acc).sum(-1)
    tol = PROB_SUM_TOL.get(teacher.dtype, 0.0) if prob_tol is None else prob_tol
    return (teacher < 0).any(-1) | ~((sums - 1).abs() <= tol)


def scale_rows_(grad: Tensor, go: Tensor) -> None:
    """``grad[i, :] *= go[i]`` in place (multiplying by 1 is exact, so no row needs skipping here)."""
    grad.mul_(go.to(grad.dtype).unsqueeze(-1))
