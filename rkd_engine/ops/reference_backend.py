"""The pure-PyTorch backend: ``rkd_engine.reference`` behind the backend contract. Runs anywhere."""

from __future__ import annotations

import torch
from torch import Tensor

from rkd_engine import reference


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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss per row, ``grad_scale * scale * dloss/df`` and per-class ``mass``, ``risk``, ``error``; rows
    labelled ``ignore_index`` contribute nothing."""
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
    return out.loss, grad, out.mass, out.risk, out.error


def scale_rows_(grad: Tensor, go: Tensor) -> None:
    """``grad[i, :] *= go[i]`` in place (multiplying by 1 is exact, so no row needs skipping here)."""
    grad.mul_(go.to(grad.dtype).unsqueeze(-1))
