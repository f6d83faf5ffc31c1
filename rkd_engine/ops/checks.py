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
inputs pass the full checks raises nothing. A NaN loss always raises under ``"sync"``: the full checks take
the kernel's verdict on probability rows whose sum lies within rounding of the tolerance (the kernels and
the host add in different orders), and a NaN that no check explains is named by its row
(``raise_for_nan_loss``).
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


def _first_row(bad: Tensor) -> int:
    """Index of the first ``True`` of a (B,) bool tensor (one host read)."""
    return int(bad.nonzero()[0])


def _check_finite(name: str, t: Tensor, *, allow_neg_inf: bool, keep: Tensor | None = None) -> None:
    """No NaN (and no infinity, or no ``+inf`` when ``allow_neg_inf``) in the rows of ``t`` that ``keep`` keeps;
    the error names the row in ``t``."""
    nan_rows = torch.isnan(t).any(-1)
    if keep is not None:
        nan_rows &= keep
    if nan_rows.any():
        raise ValueError(f"{name} contains NaN (first in row {_first_row(nan_rows)})")
    inf_rows = (torch.isposinf(t) if allow_neg_inf else torch.isinf(t)).any(-1)
    if keep is not None:
        inf_rows &= keep
    if inf_rows.any():
        raise ValueError(
            f"{name} must be finite{' or -inf' if allow_neg_inf else ''}, found an infinite value in row "
            f"{_first_row(inf_rows)}"
        )


def _check_not_empty(name: str, t: Tensor, keep: Tensor | None) -> None:
    """No row of ``t`` that ``keep`` keeps is ``-inf`` everywhere."""
    empty = torch.isneginf(t).all(-1)
    if keep is not None:
        empty &= keep
    if empty.any():
        raise ValueError(f"{name} has a row that is -inf everywhere (no class left): row {_first_row(empty)}")


def _sum_rounding_bound(probs: Tensor, acc: torch.dtype) -> Tensor:
    """(B,) float64: a bound on how far any order of summing a row of ``probs`` in ``acc`` may fall from its
    exact sum, ``m eps sum_j |p_j|`` (recursive summation's bound; every tree order is within it), plus the
    rounding of ``|s - 1|`` and of the tolerance."""
    eps = torch.finfo(acc).eps
    m = probs.shape[-1]
    return (m + 2) * eps * (probs.double().abs().sum(-1) + 1.0)


def check_probs(name: str, probs: Tensor, *, keep: Tensor | None = None, flagged: Tensor | None = None) -> None:
    """Teacher probabilities: no NaN or inf, >= 0, rows summing to 1 within the dtype's tolerance (a pass
    over the tensor, taken only to name the problem once the kernels' status reports one).

    The sums are taken as the kernels take them: accumulated in float32 (float64 for float64 inputs) and
    compared as ``not |s - 1| <= PROB_SUM_TOL``. The order of the additions cannot match every kernel's (each
    has its own vector width and reduction tree), so a row whose exact sum lies within rounding of the
    tolerance may be judged differently here than in a kernel. ``flagged`` ((B,) bool: the rows whose loss the
    kernel made NaN) settles those rows: within the rounding bound the kernel's verdict is taken, so a row
    the kernel flagged is named here even when this sum passes, and one it accepted is not named. Rows that
    ``keep`` drops (labelled ``ignore_index``) are not checked."""
    _check_finite(name, probs, allow_neg_inf=False, keep=keep)
    negative = (probs < 0).any(-1)
    if keep is not None:
        negative &= keep
    if negative.any():
        raise ValueError(f"{name} must be >= 0 everywhere (row {_first_row(negative)} has a negative entry)")
    acc = torch.float64 if probs.dtype == torch.float64 else torch.float32
    tol = PROB_SUM_TOL[probs.dtype]
    sums = probs.to(acc).sum(-1)
    host_off = ~((sums - 1).abs() <= tol)
    off = host_off
    if flagged is not None:
        exact = probs.double().sum(-1)
        edge = ((exact - 1).abs() - tol).abs() <= _sum_rounding_bound(probs, acc)
        off = torch.where(edge, flagged, host_off)
    if keep is not None:
        off &= keep
    if off.any():
        row = _first_row(off)
        if not bool(host_off[row]):  # flagged by the kernel only
            raise ValueError(
                f"{name} rows must sum to 1 (row {row} sums to {float(exact[row]):.9g}, within rounding of the "
                f"tolerance {tol:g} for {probs.dtype}: the kernel's {acc} sum of the row is off 1 by more)"
            )
        raise ValueError(f"{name} rows must sum to 1 (row {row} sums to {float(sums[row]):.6g})")


def check_labels(labels: Tensor, m: int, ignore_index: int) -> None:
    """Labels in ``[0, m)`` or equal to ``ignore_index`` (one read of B values)."""
    bad = _bad_labels(labels, m, ignore_index)
    if bad.any():
        shown = labels[labels != ignore_index]
        raise ValueError(
            f"labels must lie in [0, {m}) (or equal ignore_index={ignore_index}), got values in "
            f"[{int(shown.min())}, {int(shown.max())}] (first bad row {_first_row(bad)})"
        )


def raise_for_inputs(
    student: Tensor,
    teacher: Tensor | None,
    teacher_is_probs: bool,
    labels: Tensor | None,
    a: Tensor,
    ignore_index: int,
    *,
    loss_rows: Tensor | None = None,
) -> None:
    """Examine the inputs in full and raise the first problem found, naming the argument and the row
    (the slow path, taken only when the status says something is wrong). Rows labelled ``ignore_index`` are
    not examined (the kernels do not read them); rows are numbered as in the inputs. ``loss_rows`` ((B,), the
    kernel's per-row losses) settles teacher probability rows at the edge of the tolerance
    (``check_probs``)."""
    m = student.shape[-1]
    if labels is not None:
        check_labels(labels, m, ignore_index)
    if torch.isnan(a).any() or (a < 0).any() or (a > 1).any():
        raise ValueError("teacher_weight must lie in [0, 1] in every row")
    keep = None if labels is None else labels != ignore_index
    _check_finite("student_logits", student, allow_neg_inf=True, keep=keep)
    _check_not_empty("student_logits", student, keep)
    if teacher is None:
        return
    if teacher_is_probs:
        flagged = None if loss_rows is None else torch.isnan(loss_rows)
        check_probs("teacher_probs", teacher, keep=keep, flagged=flagged)
        return
    _check_finite("teacher_logits", teacher, allow_neg_inf=True, keep=keep)
    _check_not_empty("teacher_logits", teacher, keep)


def raise_for_nan_loss(loss: Tensor, loss_rows: Tensor | None, teacher: Tensor | None, teacher_is_probs: bool) -> None:
    """The last resort of a status read: a NaN loss whose inputs passed every check of ``raise_for_inputs``
    still raises, naming the first row whose loss is NaN (when the per-row losses are known) and what was
    checked, so that ``validate`` never lets a NaN loss through silently. (A ``+inf`` loss with valid inputs
    is legitimate and passes.)"""
    rows = loss_rows if loss_rows is not None else (loss if loss.dim() == 1 else None)
    if rows is not None:
        nan_rows = torch.isnan(rows)
        if not nan_rows.any():
            if bool(torch.isnan(loss).any()):
                raise ValueError(
                    "the reduced loss is NaN although no row's loss is: an infinite loss_i (a label on a class the "
                    "student masks with -inf) times a scale of 0 (a normalizer of 0)"
                )
            return
        where = f"the loss of row {_first_row(nan_rows)} is NaN"
    elif not bool(torch.isnan(loss).any()):
        return
    else:
        where = "the loss is NaN"
    checked = (
        "labels in [0, m) or ignore_index, teacher_weight in [0, 1], student_logits free of NaN and +inf and "
        "not -inf everywhere"
    )
    if teacher is not None and teacher_is_probs:
        checked += f", teacher_probs >= 0 with rows summing to 1 within {PROB_SUM_TOL[teacher.dtype]:g}"
    elif teacher is not None:
        checked += ", teacher_logits free of NaN and +inf and not -inf everywhere"
    raise ValueError(
        f"{where}, yet the inputs pass every check ({checked}); scores so large that their differences "
        "overflow can do this"
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
    loss_rows: Tensor | None = None,
) -> None:
    """Read the status of a finished call as ``mode`` asks (see the module docstring).

    ``loss`` is the reduced loss (or ``loss_rows`` for ``reduction="none"``): a non-finite ``loss_i`` makes
    it non-finite, so one value says whether any row needs a look (a finite sum of huge rows that overflows
    only costs the full checks, which then find nothing). ``labels_checked``/``a_checked``: the caller has
    checked the labels (the C++ kernel's guard, or a read before the kernel) or ``a`` (a constant).
    ``loss_rows``: the kernel's (B,) losses behind a reduced ``loss``, read only on the slow path (to settle
    probability rows at the edge of the tolerance, and to name the row of a NaN no check explains).
    When the status is set, ``"sync"`` raises the first problem ``raise_for_inputs`` finds, else, for a NaN
    loss, the error of ``raise_for_nan_loss``: a NaN loss never passes silently.
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
            _raise_for_status(loss, student, teacher, teacher_is_probs, labels, a, ignore_index, loss_rows)
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
        _raise_for_status(loss, student, teacher, teacher_is_probs, labels, a, ignore_index, loss_rows)


def _raise_for_status(loss, student, teacher, teacher_is_probs, labels, a, ignore_index, loss_rows) -> None:
    """The slow path of a set status: the full checks, then the NaN loss no check explains."""
    if loss_rows is None and loss.dim() == 1:
        loss_rows = loss
    raise_for_inputs(student, teacher, teacher_is_probs, labels, a, ignore_index, loss_rows=loss_rows)
    raise_for_nan_loss(loss, loss_rows, teacher, teacher_is_probs)
