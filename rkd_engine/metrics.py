"""Evaluation metrics of docs/metrics.md.

Accuracy, per-class recall, balanced accuracy (mean recall), worst-1 (min recall) and worst-k (mean of
the ``k`` lowest recalls) accuracy, top-label expected calibration error (ECE) and the per-class
calibration error of a teacher, ``max_y E_x | p_y(x) / pi_t_y - eta_y(x) / pi_y |``. A class absent from
the evaluation labels has no recall: it is listed in ``absent_classes`` and left out of every average,
never counted as 0 or NaN. Results are plain Python numbers (JSON-serialisable).
"""

from __future__ import annotations

import torch
from torch import Tensor

_PROB_SUM_TOL = 1e-3


def _check_labels(labels: Tensor, n: int, num_classes: int) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if n == 0:
        raise ValueError("labels is empty: nothing to evaluate")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), found {int(labels.min())}..{int(labels.max())}")
    return labels


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")


def _check_probs(probs: Tensor, name: str = "probs") -> Tensor:
    if not isinstance(probs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")
    if probs.ndim != 2:
        raise ValueError(f"{name} must be (N, m) class probabilities, got shape {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {probs.dtype}")
    p = probs.detach().to(torch.float64)
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"{name} must be finite and >= 0 (probabilities, not logits: apply softmax first)")
    if p.shape[0] and ((p.sum(dim=1) - 1).abs() > _PROB_SUM_TOL).any():
        raise ValueError(f"{name} rows must sum to 1 (probabilities, not logits: apply softmax first)")
    return p


def _bin_index(values: Tensor, n_bins: int) -> Tensor:
    """Bin ``b`` of ``n_bins`` equal-width bins ``(b / n_bins, (b + 1) / n_bins]`` of [0, 1]; 0 falls in bin 0."""
    return (torch.ceil(values * n_bins).long() - 1).clamp(0, n_bins - 1)


def _check_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Top-label ECE: ``sum_b (|B_b| / N) | acc(B_b) - conf(B_b) |`` over ``n_bins`` equal-width confidence bins.

    The confidence of a row is ``max_j p_j``, it is correct when ``argmax_j p_j`` (first index on ties)
    equals its label.
    """
    p = _check_probs(probs)
    _check_bins(n_bins)
    labels = _check_labels(labels, p.shape[0], p.shape[1]).to(p.device)
    conf, pred = p.max(dim=1)
    correct = (pred == labels).to(torch.float64)
    bins = _bin_index(conf, n_bins)
    count = torch.bincount(bins, minlength=n_bins).to(torch.float64)
    gap = torch.bincount(bins, weights=correct - conf, minlength=n_bins)
    return float(gap.abs().sum() / count.sum())


def per_class_calibration_error(probs: Tensor, labels: Tensor, prior: Tensor | None = None, n_bins: int = 10) -> dict:
    """The per-class calibration error of docs/metrics.md, estimated from held-out labels.

    ``pi_t = mean_x p(x)`` over the given rows. For each class ``y`` the rows are binned by ``p_y(x)``
    into ``n_bins`` equal-width bins and the error is
    ``sum_b (|B_b| / N) | mean_{B_b} p_y / pi_t_y - mean_{B_b} [Y = y] / pi_y |``,
    an estimate of ``E_x | p_y(x) / pi_t_y - eta_y(x) / pi_y |``. ``prior`` is ``pi``, the label prior of
    the distribution the rows come from; default: the label frequencies of ``labels`` (then both terms
    average to 1 over the rows). Classes absent from ``labels`` get None and stay out of ``max``/``mean``.

    Returns ``{"per_class": [float | None] * m, "max": float | None, "mean": float | None,
    "absent_classes": [int], "n_bins": n_bins}``.
    """
    p = _check_probs(probs)
    _check_bins(n_bins)
    n, m = p.shape
    labels = _check_labels(labels, n, m).to(p.device)
    counts = torch.bincount(labels, minlength=m).to(torch.float64)
    if prior is None:
        pi = counts / n
    else:
        if not isinstance(prior, Tensor) or prior.shape != (m,):
            raise ValueError(f"prior must be a tensor of shape ({m},), got {getattr(prior, 'shape', prior)!r}")
        pi = prior.detach().to(device=p.device, dtype=torch.float64)
        if not torch.isfinite(pi).all() or (pi <= 0).any():
            raise ValueError("prior must be finite and > 0 for every class")
    pi_t = p.mean(dim=0)
    # p_y / pi_t_y, with 0 where the teacher never predicts class y (pi_t_y = 0 means p_y = 0 everywhere).
    ratio = torch.where(pi_t > 0, p / torch.where(pi_t > 0, pi_t, 1.0), 0.0)
    onehot = torch.nn.functional.one_hot(labels, m).to(torch.float64)
    present = counts > 0
    target = torch.where(present, onehot / torch.where(pi > 0, pi, 1.0), 0.0)
    # Flat bin id per (row, class): class * n_bins + bin, so one bincount serves every class.
    flat = (torch.arange(m, device=p.device) * n_bins + _bin_index(p, n_bins)).flatten()
    size = m * n_bins
    diff = torch.bincount(flat, weights=(ratio - target).flatten(), minlength=size).view(m, n_bins)
    # |B_b| / N * |mean ratio - mean target| = |sum over the bin of (ratio - target)| / N
    err = diff.abs().sum(dim=1) / n
    per_class = [float(e) if ok else None for e, ok in zip(err.tolist(), present.tolist(), strict=True)]
    values = [e for e in per_class if e is not None]
    return {
        "per_class": per_class,
        "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
        "absent_classes": [c for c, ok in enumerate(present.tolist()) if not ok],
        "n_bins": n_bins,
    }


def classification_report(
    logits_or_preds: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    k: int = 3,
    probs: Tensor | None = None,
) -> dict:
    """Accuracy metrics of docs/metrics.md from scores ``(N, m)`` or predicted classes ``(N,)``.

    Predictions are ``h(x) = argmax_j f_j(x)`` of the raw scores (first index on ties). Per-class recall
    ``r_y`` is the accuracy on the rows labelled ``y``; over the classes present in ``labels``:
    ``balanced_accuracy = mean_y r_y``, ``worst_accuracy = min_y r_y``, ``worst_k_accuracy`` = mean of the
    ``min(k, #present)`` lowest recalls. ``ece`` is the top-label ECE of ``probs`` (default: the softmax of
    the scores; None when only predictions are given).

    Returns ``accuracy``, ``balanced_accuracy``, ``worst_accuracy``, ``worst_k_accuracy``, ``k``,
    ``per_class_recall`` (None for absent classes), ``per_class_count``, ``absent_classes``, ``ece`` and
    ``num_examples``, all plain Python values.
    """
    _check_num_classes(num_classes)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not isinstance(logits_or_preds, Tensor):
        raise TypeError(f"logits_or_preds must be a torch.Tensor, got {type(logits_or_preds).__name__}")
    scores = logits_or_preds.detach()
    if scores.ndim == 2:
        if scores.shape[1] != num_classes:
            raise ValueError(f"logits_or_preds has {scores.shape[1]} columns but num_classes = {num_classes}")
        if not scores.is_floating_point():
            raise TypeError(f"scores (N, m) must be floating point, got {scores.dtype}")
        if torch.isnan(scores).any() or torch.isposinf(scores).any():
            raise ValueError("logits_or_preds contains NaN or +inf (-inf marks an excluded class and is allowed)")
        preds = scores.argmax(dim=1)
        if probs is None:
            probs = torch.softmax(scores.to(torch.float64), dim=1)
    elif scores.ndim == 1:
        if scores.is_floating_point() or scores.dtype == torch.bool:
            raise TypeError(f"predictions (N,) must be an integer tensor, got {scores.dtype}")
        preds = scores.long()
        if preds.numel() and (preds.min() < 0 or preds.max() >= num_classes):
            raise ValueError(f"predictions must lie in [0, {num_classes})")
    else:
        raise ValueError(f"logits_or_preds must be scores (N, m) or predictions (N,), got {tuple(scores.shape)}")
    n = preds.shape[0]
    labels = _check_labels(labels, n, num_classes).to(preds.device)
    if probs is not None and (probs.ndim != 2 or tuple(probs.shape) != (n, num_classes)):
        raise ValueError(f"probs must have shape ({n}, {num_classes}), got {tuple(probs.shape)}")
    correct = (preds == labels).to(torch.float64)
    counts = torch.bincount(labels, minlength=num_classes)
    hits = torch.bincount(labels, weights=correct, minlength=num_classes)
    present = counts > 0
    recall = hits[present] / counts[present]
    lowest = torch.sort(recall).values[: min(k, recall.numel())]
    per_class = [None] * num_classes
    for c, r in zip(torch.nonzero(present).flatten().tolist(), recall.tolist(), strict=True):
        per_class[c] = r
    return {
        "accuracy": float(correct.mean()),
        "balanced_accuracy": float(recall.mean()),
        "worst_accuracy": float(recall.min()),
        "worst_k_accuracy": float(lowest.mean()),
        "k": k,
        "per_class_recall": per_class,
        "per_class_count": counts.tolist(),
        "absent_classes": torch.nonzero(~present).flatten().tolist(),
        "ece": None if probs is None else expected_calibration_error(probs, labels),
        "num_examples": n,
    }
