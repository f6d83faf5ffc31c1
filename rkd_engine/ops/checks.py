"""Value checks of a fused call, read from a small status instead of extra passes over the data.

Every backend's kernel computes ``loss_i`` from every element of row ``i`` that the loss uses, so a NaN or
``+inf`` in the student or the teacher row, or a row of ``-inf`` everywhere (no class left), makes
``loss_i`` non-finite, and so the reduced loss. The kernels also flag, while they read each element, what
the loss's arithmetic would not: a row of teacher probabilities with a negative entry or a sum off 1 by
more than ``PROB_SUM_TOL`` (fp32 accumulation), and a bad teacher row whose term the loss does not use
(``a_i = 0``) both give a NaN ``loss_i``. The status of a call is therefore computed from the reduced
loss (or the (B,) losses for ``reduction="none"``), the labels (outside ``[0, m)`` and not
``ignore_index``; not looked at on CPU, where they are read before the kernel or refused by the C++
kernel) and ``a`` (outside ``[0, 1]``; not looked at when it is a constant checked on the host): never a
pass over B x m. ``validate="sync"`` (``True``) reads one
flag on the host (free on CPU, one small device-to-host read on CUDA); only when it is set are the inputs
examined in full, to raise the precise error (which argument, which row, what was expected).
``validate="async"`` enqueues a device-side assertion instead (no host synchronisation; on CUDA the error
surfaces at a later synchronisation, without the argument's name). ``validate=False`` reads nothing.

A ``+inf`` loss is legitimate (a hard label on a class the student masks with ``-inf``): a set flag whose
inputs pass the full checks raises nothing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

VALIDATE_MODES: tuple[str, ...] = ("off", "sync", "async")
"""``validate`` as the op takes it (``distill_loss`` also accepts ``True`` for ``"sync"`` and ``False`` for
``"off"``)."""

# How far a row of teacher probabilities may be from summing to 1, by dtype (passed to every backend's kernels).
PROB_SUM_TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-8}
PROB_SUM_UNCHECKED = 1e30
"""A ``prob_tol`` for the backends' ``fused_forward`` that accepts any finite row sum: for targets that are not
distributions by design (a top-k teacher without a tail over ``m = k`` classes); negative entries and NaN are
still flagged."""


def normalize_validate(validate: object) -> str:
    """``True``/``"sync"`` -> ``"sync"``, ``False``/``"off"`` -> ``"off"``, ``"async"`` -> ``"async"``."""
    if validate is True:
        return "sync"
    if validate is False:
        return "off"
    if isinstance(validate, str) and validate in VALIDATE_MODES:
        return validate
    raise ValueError(f"validate must be True, False or one of {VALIDATE_MODES}, got {validate!r}")


def _bad_labels(labels: Tensor, m: int, ignore_index: int) -> Tensor:
    """(B,) bool: labels outside ``[0, m)`` and not ``ignore_index`` (device operations only)."""
    return ((labels < 0) | (labels >= m)) & (labels != ignore_index)


def _check_finite(name: str, t: Tensor, *, allow_neg_inf: bool) -> None:
    if torch.isnan(t).any():
        rows = torch.isnan(t).any(-1).nonzero()
        raise ValueError(f"{name} contains NaN (first in row {int(rows[0])})")
    bad_inf = torch.isposinf(t) if allow_neg_inf else torch.isinf(t)
    if bad_inf.any():
        row = int(bad_inf.any(-1).nonzero()[0])
        raise ValueError(
            f"{name} must be finite{' or -inf' if allow_neg_inf else ''}, found an infinite value in row {row}"
        )


def check_probs(name: str, probs: Tensor) -> None:
    """Teacher probabilities: no NaN or inf, >= 0, rows summing to 1 within the dtype's tolerance (a pass
    over the tensor, taken only to name the problem once the kernels' status reports one)."""
    _check_finite(name, probs, allow_neg_inf=False)
    if (probs < 0).any():
        raise ValueError(f"{name} must be >= 0 everywhere")
    acc = torch.float64 if probs.dtype == torch.float64 else torch.float32
    sums = probs.to(acc).sum(-1)
    off = (sums - 1).abs() > PROB_SUM_TOL[probs.dtype]
    if off.any():
        row = int(off.nonzero()[0])
        raise ValueError(f"{name} rows must sum to 1 (row {row} sums to {float(sums[row]):.6g})")


def check_labels(labels: Tensor, m: int, ignore_index: int) -> None:
    """Labels in ``[0, m)`` or equal to ``ignore_index`` (one read of B values)."""
    bad = _bad_labels(labels, m, ignore_index)
    if bad.any():
        shown = labels[labels != ignore_index]
        raise ValueError(
            f"labels must lie in [0, {m}) (or equal ignore_index={ignore_index}), got values in "
            f"[{int(shown.min())}, {int(shown.max())}] (first bad row {int(bad.nonzero()[0])})"
        )


def raise_for_inputs(
    student: Tensor,
    teacher: Tensor | None,
    teacher_is_probs: bool,
    labels: Tensor | None,
    a: Tensor,
    ignore_index: int,
) -> None:
    """Examine the inputs in full and raise the first problem found, naming the argument and the row
    (the slow path, taken only when the status says something is wrong)."""
    m = student.shape[-1]
    if labels is not None:
        check_labels(labels, m, ignore_index)
    if torch.isnan(a).any() or (a < 0).any() or (a > 1).any():
        raise ValueError("teacher_weight must lie in [0, 1] in every row")
    keep = None if labels is None else labels != ignore_index
    f = student if keep is None else student[keep]
    _check_finite("student_logits", f, allow_neg_inf=True)
    empty = torch.isneginf(f).all(-1)
    if empty.any():
        raise ValueError(
            f"student_logits has a row that is -inf everywhere (no class left): row {int(empty.nonzero()[0])}"
        )
    if teacher is None:
        return
    t = teacher if keep is None else teacher[keep]
    if teacher_is_probs:
        check_probs("teacher_probs", t)
        return
    _check_finite("teacher_logits", t, allow_neg_inf=True)
    empty = torch.isneginf(t).all(-1)
    if empty.any():
        raise ValueError(
            f"teacher_logits has a row that is -inf everywhere (no class left): row {int(empty.nonzero()[0])}"
        )


def enforce(
    mode: str,
    loss: Tensor,
    student: Tensor,
    teacher: Tensor | None,
    teacher_is_probs: bool,
    labels: Tensor | None,
    a: Tensor,
    ignore_index: int,
    *,
    labels_checked: bool = False,
    a_checked: bool = False,
) -> None:
    """Read the status of a finished call as ``mode`` asks (see the module docstring).

    ``loss`` is the reduced loss (or ``loss_rows`` for ``reduction="none"``): a non-finite ``loss_i`` makes
    it non-finite, so one value says whether any row needs a look (a finite sum of huge rows that overflows
    only costs the full checks, which then find nothing). ``labels_checked``/``a_checked``: the caller has
    checked the labels (the C++ kernel's guard, or a read before the kernel) or ``a`` (a constant).
    """
    if mode == "off" or student.device.type == "meta":
        return  # meta tensors hold no values: nothing to read (shapes were checked before the op)
    if loss.device.type == "cpu" and mode == "sync":
        # On CPU every read is free of synchronisation: a few host reads, no (B,) temporaries.
        ok = bool(torch.isfinite(loss).all()) if loss.dim() else math.isfinite(float(loss))
        if ok and not a_checked:
            low, high = torch.aminmax(a)
            ok = float(low) >= 0 and float(high) <= 1  # False for a NaN
        if ok and not labels_checked:
            ok = not bool(_bad_labels(labels, student.shape[-1], ignore_index).any())
        if not ok:
            raise_for_inputs(student, teacher, teacher_is_probs, labels, a, ignore_index)
        return
    bad = ~torch.isfinite(loss).all()
    if not labels_checked and labels is not None:
        bad |= _bad_labels(labels, student.shape[-1], ignore_index).any()
    if not a_checked:
        bad |= ~((a >= 0) & (a <= 1)).all()
    if mode == "async" and bad.device.type != "cpu":
        torch._assert_async(~bad, "rkd distill_loss: invalid input values (run with validate=True for details)")
        return
    if bool(bad):
        raise_for_inputs(student, teacher, teacher_is_probs, labels, a, ignore_index)
