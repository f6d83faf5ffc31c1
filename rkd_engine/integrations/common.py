"""Framework-free pieces of the trainer adapters: the batch loss of a distillation step and flat metrics.

``batch_distill_loss`` is docs/loss.md over the rows of a batch divided by a normaliser ``N``
(section 11): rows are examples for classification, and tokens for a causal language model (position
``t`` predicts the label at ``t + 1``; positions labelled ``ignore_index`` add nothing). ``flat_classification_metrics`` turns ``classification_report`` into the flat ``name -> float``
mapping that trainers' loggers take.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rkd_engine.losses import LossOutput, RobustDistillationLoss, distill_loss
from rkd_engine.metrics import classification_report
from rkd_engine.wide import fused_linear_distill_loss

IGNORE_INDEX = -100


def check_teacher_weight(teacher_weight: object) -> float:
    """The target mix ``a`` in ``q = (1 - a) e_y + a p``: an explicit number in [0, 1]."""
    if isinstance(teacher_weight, bool) or not isinstance(teacher_weight, (int, float)):
        raise TypeError(f"teacher_weight must be a number in [0, 1], got {type(teacher_weight).__name__}")
    if not 0.0 <= float(teacher_weight) <= 1.0:
        raise ValueError(f"teacher_weight must lie in [0, 1], got {teacher_weight}")
    return float(teacher_weight)


def _objective_args(
    loss: RobustDistillationLoss, a: float, normalizer: float | Tensor | None, ignore_index: int
) -> dict[str, Any]:
    """The keywords that carry ``loss``'s objective (temperatures, costs, DRO weights) into a loss call."""
    return {
        "teacher_weight": a,
        "temperature": loss.temperature,
        "student_temperature": loss.student_temperature,
        "class_costs": loss.costs,
        "class_weights": loss.class_weights,
        "reduction": "mean",
        "normalizer": normalizer,
        "ignore_index": ignore_index,
        "backend": loss.backend,
        "validate": False,
    }


def batch_distill_loss(
    loss: RobustDistillationLoss,
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    *,
    teacher_weight: float,
    causal: bool,
    normalizer: float | Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> LossOutput:
    """The loss of ``loss``'s objective on one batch, divided by ``normalizer``, and its per-class statistics.

    Classification: ``student_logits`` and ``teacher_logits`` (B, m), ``labels`` (B,) or ``None`` when
    ``teacher_weight == 1``. Causal LM: (B, T, V) scores and (B, T) labels; the rows are the positions
    ``t < T - 1``, scored against the label at ``t + 1``. Rows labelled ``ignore_index`` add nothing to
    the loss, its gradient or the statistics. ``normalizer`` (a number or a 0-d tensor, never read on
    the host) divides the summed loss: the rows of the whole accumulated batch under gradient
    accumulation; ``None`` gives the mean over the rows kept.
    """
    a = check_teacher_weight(teacher_weight)
    g = teacher_logits.detach().to(student_logits.dtype)
    f, y = student_logits, labels
    if causal:
        if labels is None:
            raise ValueError("a causal LM batch needs 'labels' (B, T) to say which positions count (-100: ignored)")
        if student_logits.dim() != 3 or labels.dim() != 2 or student_logits.shape[:2] != labels.shape:
            raise ValueError(
                f"causal LM scores must be (B, T, V) with labels (B, T), got {tuple(student_logits.shape)} "
                f"and {tuple(labels.shape)}"
            )
        vocab = student_logits.shape[-1]
        f = student_logits[:, :-1].reshape(-1, vocab)
        g = g[:, :-1].reshape(-1, vocab)
        y = labels[:, 1:].reshape(-1)
    elif labels is None and a < 1.0:
        raise ValueError(f"teacher_weight={a} < 1 mixes in the labels, but the batch has no 'labels'")
    return distill_loss(
        f,
        labels=y,
        teacher_logits=g,
        **_objective_args(loss, a, normalizer, ignore_index),
    )


def _next_token_rows(t: Tensor) -> Tensor:
    """Positions ``t < T - 1`` of a (B, T, ...) tensor as rows (B (T - 1), ...)."""
    return t[:, :-1].reshape(-1, *t.shape[2:])


def causal_lm_linear_loss(
    loss: RobustDistillationLoss,
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None,
    labels: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    teacher_weight: float,
    normalizer: float | Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> LossOutput:
    """``batch_distill_loss`` of a causal LM whose scores are ``hidden @ head_weight.T + head_bias``, with the
    output layer fused into the loss (``rkd_engine.wide.fused_linear_distill_loss``): the (tokens, vocab)
    student scores never exist.

    ``hidden`` (B, T, H) are the student's last hidden states (what its head reads), ``labels`` (B, T);
    position ``t`` is scored against the label at ``t + 1`` and ``ignore_index`` labels add nothing. The
    teacher is either dense scores ``teacher_logits`` (B, T, V) or its own hidden states
    ``teacher_hidden`` (B, T, H_t) and head ``teacher_head_weight`` (V, H_t) (+ bias), applied chunk by
    chunk under no grad. ``normalizer`` divides the summed loss as in ``batch_distill_loss``.
    """
    a = check_teacher_weight(teacher_weight)
    if hidden.dim() != 3 or labels.dim() != 2 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"causal LM hidden states must be (B, T, H) with labels (B, T), got {tuple(hidden.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if head_weight.dtype != hidden.dtype:  # e.g. an fp32 head under bf16 autocast; the cast is differentiable
        head_weight = head_weight.to(hidden.dtype)
        head_bias = None if head_bias is None else head_bias.to(hidden.dtype)
    teacher: dict[str, Any] = {}
    if teacher_hidden is not None:
        teacher = {
            "teacher_input": _next_token_rows(teacher_hidden.detach()),
            "teacher_head_weight": teacher_head_weight,
            "teacher_head_bias": teacher_head_bias,
        }
    elif teacher_logits is not None:
        teacher = {"teacher_logits": _next_token_rows(teacher_logits.detach())}
    return fused_linear_distill_loss(
        _next_token_rows(hidden),
        head_weight,
        head_bias,
        labels=labels[:, 1:].reshape(-1),
        **_objective_args(loss, a, normalizer, ignore_index),
        **teacher,
    )


def flat_classification_metrics(logits: Any, labels: Any, num_classes: int, prefix: str = "") -> dict[str, float]:
    """Accuracy, balanced, worst-class and worst-3 accuracy and per-class recall as ``name -> float``."""
    scores = torch.as_tensor(logits)
    if isinstance(logits, (tuple, list)):
        scores = torch.as_tensor(logits[0])
    y = torch.as_tensor(labels).to(torch.int64)
    rep = classification_report(scores.float(), y, num_classes, k=min(3, num_classes))
    out = {
        f"{prefix}accuracy": rep["accuracy"],
        f"{prefix}balanced_accuracy": rep["balanced_accuracy"],
        f"{prefix}worst_accuracy": rep["worst_accuracy"],
        f"{prefix}worst_k_accuracy": rep["worst_k_accuracy"],
    }
    for j, recall in enumerate(rep["per_class_recall"]):
        if recall is not None:
            out[f"{prefix}class_{j}_accuracy"] = recall
    return out
