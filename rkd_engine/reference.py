"""Pure-PyTorch reference of every formula in docs/loss.md and docs/dro.md.

This module is the test oracle, the fallback backend on any device and the baseline of every
benchmark. It favours clarity over speed, works in any floating dtype (float64 included) and is
differentiable with autograd, so ``torch.autograd.gradcheck`` can check both the loss and the
closed-form gradient below.

Symbols (docs/README.md and docs/loss.md), per row ``i`` of a batch of ``B`` rows and ``m`` classes:

    p_i   = softmax(g_i / gamma)                       (teacher; or given as probabilities)
    q_i   = (1 - a_i) e_{y_i} + a_i p_i                (target)
    z_i   = f_i - log c                                (margin-adjusted student scores)
    (computed as (f_i - max_j f_ij) - log c and (g_i - max_j g_ij) / gamma: equal in exact arithmetic,
    and what keeps logits near 1e4 at extreme temperatures accurate in float32)
    s_i   = softmax(z_i),  s^tau_i = softmax(z_i / tau)
    loss_i = (1 - a_i) w_{y_i} (-log s_{i,y_i}) + a_i tau^2 sum_j w_j p_ij (-log s^tau_ij)
    dloss_i/df_ij = (1 - a_i) w_{y_i} (s_ij - e_{y_i,j}) + a_i tau (s^tau_ij sum_k w_k p_ik - w_j p_ij)
                  = s_ij sum_k w_k q_ik - w_j q_ij      when tau = 1
    mass_j  = sum_i q_ij
    risk_j  = sum_i q_ij (-log s_ij)                   (tau = 1, unweighted by w)
    error_j = sum_i q_ij [argmax_k f_ik != j]

A term with ``q_ij = 0`` contributes exactly 0, also where ``s_ij = 0`` (masked ``-inf`` columns).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "FusedRows",
    "dro_update",
    "fused_rows",
    "linear_loss_rows",
    "loss_rows",
    "teacher_probs_from_logits",
    "topk_target",
    "target_distribution",
    "tradeoff_beta",
]


class FusedRows(NamedTuple):
    """Everything the fused kernel returns for one batch (see the module docstring)."""

    loss: Tensor  # (B,) per-row loss
    grad: Tensor  # (B, m) dloss_i / df_i
    mass: Tensor  # (m,)
    risk: Tensor  # (m,)
    error: Tensor  # (m,)


def _shift(x: Tensor) -> Tensor:
    """``x - max_j x_j`` row-wise: exact near the maximum, so large logits lose no precision below."""
    return x - x.detach().amax(dim=-1, keepdim=True)


def teacher_probs_from_logits(teacher_logits: Tensor, gamma: float) -> Tensor:
    """``p = softmax(g / gamma)`` row-wise; ``-inf`` logits get probability 0.

    The row maximum is subtracted before dividing by ``gamma`` (same result in exact arithmetic,
    far less rounding for logits near 1e4 and small ``gamma``).
    """
    return torch.softmax(_shift(teacher_logits) / gamma, dim=-1)


def target_distribution(p: Tensor | None, labels: Tensor | None, a: Tensor, m: int) -> Tensor:
    """``q = (1 - a) e_y + a p`` with ``a`` of shape (B,). Missing parts must have weight 0."""
    a = a.unsqueeze(-1)
    q = None
    if labels is not None:
        one_hot = torch.nn.functional.one_hot(labels.long(), m).to(a.dtype)
        q = (1 - a) * one_hot
    if p is not None:
        q = a * p if q is None else q + a * p
    if q is None:
        raise ValueError("target_distribution needs labels or teacher probabilities")
    return q


def _neg_log_softmax_masked(z: Tensor, q: Tensor) -> Tensor:
    """``-log softmax(z)`` with entries where ``q == 0`` set to 0 (no ``0 * inf``)."""
    nls = -torch.log_softmax(z, dim=-1)
    return torch.where(q > 0, nls, torch.zeros_like(nls))


def loss_rows(
    student: Tensor,
    *,
    teacher: Tensor | None = None,
    teacher_is_probs: bool = False,
    labels: Tensor | None = None,
    a: Tensor,
    gamma: float = 1.0,
    log_c: Tensor | None = None,
    w: Tensor | None = None,
    tau: float = 1.0,
) -> Tensor:
    """Per-row loss ``loss_i`` of docs/loss.md, differentiable in ``student`` (and teacher).

    ``a`` is a (B,) tensor; ``log_c`` and ``w`` are (m,) tensors or ``None`` (``c = 1``, ``w = 1``).
    Computed in the dtype of ``student`` (use float64 for an oracle).
    """
    dtype = student.dtype
    m = student.shape[-1]
    a = a.to(dtype)
    z = _shift(student) if log_c is None else _shift(student) - log_c.to(dtype)
    p = None
    if teacher is not None:
        p = teacher.to(dtype) if teacher_is_probs else teacher_probs_from_logits(teacher.to(dtype), gamma)
    w_ = torch.ones(m, dtype=dtype, device=student.device) if w is None else w.to(dtype)

    total = torch.zeros(student.shape[0], dtype=dtype, device=student.device)
    if labels is not None:
        one_hot = torch.nn.functional.one_hot(labels.long(), m).to(dtype)
        hard = one_hot * (1 - a).unsqueeze(-1)
        total = total + (hard * w_ * _neg_log_softmax_masked(z, hard)).sum(-1)
    if p is not None:
        soft = p * a.unsqueeze(-1)
        total = total + tau * tau * (soft * w_ * _neg_log_softmax_masked(z / tau, soft)).sum(-1)
    return total


def fused_rows(
    student: Tensor,
    *,
    teacher: Tensor | None = None,
    teacher_is_probs: bool = False,
    labels: Tensor | None = None,
    a: Tensor,
    gamma: float = 1.0,
    log_c: Tensor | None = None,
    w: Tensor | None = None,
    tau: float = 1.0,
    grad_scale: float = 1.0,
    need_grad: bool = True,
    ignore_index: int = -100,
    scale: Tensor | None = None,
) -> FusedRows:
    """Loss, closed-form gradient and per-class statistics in one call (the kernels' contract).

    Arithmetic runs in float64 for float64 inputs and in float32 otherwise; ``grad`` is returned in
    the dtype of ``student`` multiplied by ``grad_scale`` (``1/B`` for a mean) and by the 0-d tensor
    ``scale`` when given, or as an empty tensor when ``need_grad`` is false. A row whose label equals
    ``ignore_index`` is skipped: loss 0, a zero gradient row, nothing added to the statistics.
    ``loss``, ``mass``, ``risk`` and ``error`` are float32 (float64 for float64 inputs).
    """
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    f = student.detach().to(acc)
    m = f.shape[-1]
    a_ = a.detach().to(acc)
    keep = out_of_range = None
    if labels is not None:
        labels, keep, out_of_range = _kept_rows(labels, m, ignore_index)
    log_c_ = None if log_c is None else log_c.detach().to(acc)
    z = _shift(f) if log_c_ is None else _shift(f) - log_c_
    p = None
    if teacher is not None:
        t = teacher.detach().to(acc)
        p = t if teacher_is_probs else teacher_probs_from_logits(t, gamma)
    q = target_distribution(p, labels, a_, m)
    w_ = torch.ones(m, dtype=acc, device=f.device) if w is None else w.detach().to(acc)

    loss = loss_rows(f, teacher=p, teacher_is_probs=True, labels=labels, a=a_, log_c=log_c_, w=w_, tau=tau)
    if keep is not None:
        q = torch.where(keep.unsqueeze(-1), q, torch.zeros_like(q))
        loss = torch.where(keep, loss, torch.zeros_like(loss))
        loss = torch.where(out_of_range, torch.full_like(loss, float("nan")), loss)
    mass, risk, error = _class_statistics(f, z, q)
    if not need_grad:
        return FusedRows(loss, student.new_empty(0), mass, risk, error)

    grad = _grad_rows(z, p, labels, a_, w_, tau) * grad_scale
    if scale is not None:
        grad = grad * scale.detach().to(acc)
    if keep is not None:
        grad = torch.where(keep.unsqueeze(-1), grad, torch.zeros_like(grad))
    return FusedRows(loss, grad.to(student.dtype), mass, risk, error)


def _kept_rows(labels: Tensor, m: int, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(labels, keep, out_of_range)``: the rows whose label is neither ``ignore_index`` nor outside
    ``[0, m)``, the rows whose label is outside ``[0, m)``, and the labels with every row not kept read as
    label 0. Those rows' values are zeroed afterwards and never reach a result; a label outside ``[0, m)``
    makes its row's loss NaN (as in the kernels), which the call's status reports."""
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= m))
    keep = (labels != ignore_index) & ~out_of_range
    return torch.where(keep, labels, torch.zeros_like(labels)), keep, out_of_range


def _class_statistics(f: Tensor, z: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``mass_j = sum_i q_ij``, ``risk_j = sum_i q_ij (-log s_ij)`` and ``error_j = sum_i q_ij
    [argmax_k f_ik != j]`` with ``s_i = softmax(z_i)`` (the module docstring)."""
    nls = _neg_log_softmax_masked(z, q)
    mass = q.sum(0)
    risk = (q * nls).sum(0)
    wrong = torch.ones_like(q)
    wrong.scatter_(1, f.argmax(-1).unsqueeze(1), 0.0)
    return mass, risk, (q * wrong).sum(0)


def _grad_rows(z: Tensor, p: Tensor | None, labels: Tensor | None, a: Tensor, w: Tensor, tau: float) -> Tensor:
    """``dloss_i/df_ij = (1 - a_i) w_{y_i} (s_ij - e_{y_i,j}) + a_i tau (s^tau_ij sum_k w_k p_ik - w_j p_ij)``
    (the module docstring): the label part where there are labels, the teacher part where there is a teacher."""
    grad = torch.zeros_like(z)
    if labels is not None:
        one_hot = torch.nn.functional.one_hot(labels.long(), z.shape[-1]).to(z.dtype)
        w_y = (one_hot * w).sum(-1, keepdim=True)
        grad = grad + (1 - a).unsqueeze(-1) * w_y * (torch.softmax(z, dim=-1) - one_hot)
    if p is not None:
        s_tau = torch.softmax(z / tau, dim=-1)
        w_p = (w * p).sum(-1, keepdim=True)
        grad = grad + a.unsqueeze(-1) * tau * (s_tau * w_p - w * p)
    return grad


def topk_target(indices: Tensor, probs: Tensor, m: int, tail: str = "renormalize") -> Tensor:
    """The dense teacher target ``p~`` (B, m) of a top-k teacher (docs/wide_heads.md).

    ``indices`` (B, k) are distinct classes per row and ``probs`` (B, k) their teacher probabilities
    (``sum_k <= 1``). ``tail="renormalize"``: ``p~_ij = p_ij / sum_{K_i} p_ik`` on ``K_i``, 0 elsewhere;
    ``tail="uniform"``: ``p~_ij = p_ij`` on ``K_i`` and ``(1 - sum_{K_i} p_ik) / (m - k)`` on every other
    class (nothing when ``k = m``). Computed in the dtype of ``probs``; the oracle of the sparse paths.
    """
    k = indices.shape[-1]
    total = probs.sum(-1, keepdim=True)
    if tail == "renormalize":
        dense = torch.zeros(probs.shape[0], m, dtype=probs.dtype, device=probs.device)
        return dense.scatter(1, indices.long(), probs / total)
    if tail == "uniform":
        rest = (1 - total).clamp_min(0) / (m - k) if m > k else torch.zeros_like(total)
        dense = rest.expand(probs.shape[0], m).clone()
        return dense.scatter(1, indices.long(), probs)
    raise ValueError(f"tail must be 'renormalize' or 'uniform', got {tail!r}")


def linear_loss_rows(
    student_input: Tensor,
    student_head_weight: Tensor,
    student_head_bias: Tensor | None = None,
    **loss_args,
) -> Tensor:
    """``loss_rows`` of the scores ``f = X W^T + b`` of a linear output layer (docs/wide_heads.md).

    Differentiable in ``X``, ``W`` and ``b`` with autograd; ``loss_args`` are those of ``loss_rows``.
    This materialises the (B, m) scores: it is the oracle and the eager baseline of the fused layer.
    """
    scores = torch.nn.functional.linear(student_input, student_head_weight, student_head_bias)
    return loss_rows(scores, **loss_args)


def tradeoff_beta(weights: Tensor, alpha: float) -> Tensor:
    """``beta = (1 - alpha) / m + alpha * lambda`` (docs/objectives.md)."""
    m = weights.shape[-1]
    return (1.0 - alpha) / m + alpha * weights


def dro_update(weights: Tensor, risk_numerator: Tensor, mass: Tensor, *, alpha: float, step_size: float) -> Tensor:
    """One exponentiated-gradient step on the class weights ``lambda`` (docs/dro.md).

    ``R_j = risk_numerator_j / mass_j`` for classes with ``mass_j > 0``;
    ``lambda_j <- lambda_j exp(step_size * alpha * R_j)``, renormalised over the classes present so
    that a class with zero mass keeps its weight exactly and ``lambda`` stays on the simplex.
    Returns the new weights (the input is not modified).
    """
    present = mass > 0
    ratio = torch.where(
        present, risk_numerator / torch.where(present, mass, torch.ones_like(mass)), torch.zeros_like(mass)
    )
    grown = torch.where(present, weights * torch.exp(step_size * alpha * ratio), torch.zeros_like(weights))
    old_present = torch.where(present, weights, torch.zeros_like(weights)).sum()
    new_present = grown.sum()
    scale = torch.where(
        new_present > 0,
        old_present / torch.where(new_present > 0, new_present, torch.ones_like(new_present)),
        torch.zeros_like(new_present),
    )
    return torch.where(present, grown * scale, weights)
