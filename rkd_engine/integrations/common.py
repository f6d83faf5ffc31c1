"""Framework-free pieces of the trainer adapters: the batch loss of a distillation step and flat metrics.

``batch_distill_loss`` is METHOD.md section 3 over the rows of a batch, summed (the caller divides by
the normaliser ``N``): rows are examples for classification, and tokens for a causal language model
(position ``t`` predicts the label at ``t + 1``; positions labelled ``ignore_index`` add nothing, section
11). ``flat_classification_metrics`` turns ``classification_report`` into the flat ``name -> float``
mapping that trainers' loggers take.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rkd_engine.losses import LossOutput, RobustDistillationLoss, distill_loss
from rkd_engine.metrics import classification_report

IGNORE_INDEX = -100


def check_teacher_weight(teacher_weight: object) -> float:
    """The target mix ``a`` in ``q = (1 - a) e_y + a p``: an explicit number in [0, 1]."""
    if isinstance(teacher_weight, bool) or not isinstance(teacher_weight, (int, float)):
        raise TypeError(f"teacher_weight must be a number in [0, 1], got {type(teacher_weight).__name__}")
    if not 0.0 <= float(teacher_weight) <= 1.0:
        raise ValueError(f"teacher_weight must lie in [0, 1], got {teacher_weight}")
    return float(teacher_weight)


def batch_distill_loss(
    loss: RobustDistillationLoss,
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    *,
    teacher_weight: float,
    causal: bool,
    ignore_index: int = IGNORE_INDEX,
) -> LossOutput:
    """The summed loss of ``loss``'s objective and its per-class statistics on one batch.

    Classification: ``student_logits`` and ``teacher_logits`` (B, m), ``labels`` (B,) or ``None`` when
    ``teacher_weight == 1``. Causal LM: (B, T, V) scores and (B, T) labels; the rows are the positions
    ``t < T - 1`` whose next label is not ``ignore_index`` (the others are masked, without reading
    the mask on the host).
    """
    a = check_teacher_weight(teacher_weight)
    costs = loss.costs
    common = {
        "temperature": loss.temperature,
        "student_temperature": loss.student_temperature,
        "class_costs": costs,
        "class_weights": loss.class_weights,
        "backend": loss.backend,
        "validate": False,
    }
    g = teacher_logits.detach().to(student_logits.dtype)
    if not causal:
        if labels is None and a < 1.0:
            raise ValueError(f"teacher_weight={a} < 1 mixes in the labels, but the batch has no 'labels'")
        y = None if a == 1.0 else labels
        return distill_loss(student_logits, labels=y, teacher_logits=g, teacher_weight=a, reduction="sum", **common)
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
    keep = y != ignore_index
    y_safe = torch.where(keep, y, torch.zeros_like(y))
    out = distill_loss(
        f,
        labels=None if a == 1.0 else y_safe,
        teacher_logits=g,
        teacher_weight=a,
        reduction="none",
        **common,
    )
    weight = keep.to(out.loss.dtype)
    # The loss and its gradient drop the ignored positions through the row weight; the per-class
    # statistics returned here still count them (the adapters use statistics of classification only).
    return LossOutput((out.loss * weight).sum(), out.mass, out.risk, out.error)


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
