"""One typed description of a fused call, built and checked once from the user's arguments.

``distill_loss``, ``topk_distill_loss`` and ``fused_linear_distill_loss`` check their own score inputs
(``student_logits``, or ``student_input`` and a head) and their teacher, then hand everything else to
``describe_call``: labels, ``teacher_weight``, the class costs and weights, the temperatures, the
reduction, ``ignore_index``, the normaliser, ``validate`` and the backend. It checks each argument once,
with one set of messages (which argument, what was expected, what was given), normalises it to what the
op takes (int64 labels, the per-row ``a`` in the accumulation dtype, ``log c``) and returns a frozen
``FusedCall``. The backends keep only the guards that protect memory.

The value checks of the (m,) costs and weights run here, as ``validate`` asks: one host read under
``"sync"`` (and on CPU, where reads are free), a device-side assertion under ``"async"`` (no host
synchronisation), nothing when ``validate=False``, while compiling or on meta tensors. The value checks
of the (B, m) inputs are read from the kernel's status (``rkd_engine.ops.checks``), or run here for the
ops that have no status (``host_checks=True``).
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from rkd_engine.ops import checks
from rkd_engine.ops.constants import REDUCTIONS
from rkd_engine.ops.dispatch import select_backend
from rkd_engine.ops.op import acc_dtype

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes of the scores (``student_logits``, ``student_input``) every backend takes."""


@dataclass(frozen=True, slots=True)
class FusedCall:
    """The checked, normalised arguments of one fused call (everything but the scores and the teacher).

    ``labels`` are int64 (or ``None``); ``a`` is the per-row teacher weight in ``acc``, ``a_const`` its
    value when every row has the same (checked on the host, so the status need not look at ``a``);
    ``log_c`` and ``w`` are (m,) in ``acc`` or ``None``; ``norm_value`` (0.0: none) or ``norm_t`` (a
    0-d tensor on ``device``) is the normaliser of ``reduction="mean"``; ``validate`` is ``"off"``,
    ``"sync"`` or ``"async"``; ``backend`` is the resolved backend name.
    """

    rows: int
    m: int
    device: torch.device
    dtype: torch.dtype
    acc: torch.dtype
    labels: Tensor | None
    a: Tensor
    a_const: float | None
    log_c: Tensor | None
    w: Tensor | None
    gamma: float
    tau: float
    reduction: str
    ignore_index: int
    norm_value: float
    norm_t: Tensor | None
    validate: str
    backend: str

    @property
    def check_values(self) -> bool:
        """Whether value checks run on the host (``validate`` on, not while ``torch.compile`` traces)."""
        return self.validate != "off" and not torch.compiler.is_compiling()


# ------------------------------------------------------------------------------------ argument checks
def check_tensor(name: str, t: object) -> Tensor:
    """``t`` if it is a tensor, else ``TypeError`` naming ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_scores(name: str, t: object, layout: str = "(B, m)") -> Tensor:
    """A 2-D floating-point tensor of scores (``student_logits``, ``student_input``)."""
    t = check_tensor(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_reduction(reduction: object) -> str:
    """``reduction`` is one of ``REDUCTIONS``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def positive_number(name: str, value: object) -> float:
    """A finite number > 0 as a float (a symbolic number while ``torch.compile`` traces is passed through:
    its value is not known then; the kernels reject a non-positive one when they run)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a finite number > 0, got {type(value).__name__}")
    if torch.compiler.is_compiling():
        return value  # type: ignore[return-value]
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_like(name: str, t: Tensor, shape: tuple[int, ...], device: torch.device, ref: str) -> None:
    """``t`` has ``shape`` and lives on ``device`` (that of the argument named ``ref``)."""
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {ref} is on {device}")


def check_companion(
    name: str, t: object, shape: tuple[int, ...], device: torch.device, ref: str, dtype: torch.dtype | None = None
) -> Tensor:
    """A tensor beside the scores: ``shape``, ``device``, the dtype ``dtype`` (or any floating point when
    ``None``), and no gradient (the loss is differentiated only in the scores)."""
    t = check_tensor(name, t)
    check_like(name, t, shape, device, ref)
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have the dtype of {ref} ({dtype}), got {t.dtype}")
    if dtype is None and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.requires_grad:
        raise ValueError(f"{name} requires grad, but distill_loss differentiates only in {ref}: pass {name}.detach()")
    return t


def check_finite(name: str, t: Tensor, *, allow_neg_inf: bool = False) -> None:
    """No NaN and no infinity (``-inf`` allowed with ``allow_neg_inf``) in ``t`` (one pass, one host read)."""
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")
    bad = torch.isposinf(t) if allow_neg_inf else torch.isinf(t)
    if bad.any():
        raise ValueError(f"{name} must be finite{' or -inf' if allow_neg_inf else ''}, found an infinite value")


def _class_values_fail(name: str, t: Tensor, *, positive: bool) -> None:
    """Raise the precise error for (m,) costs (finite, > 0) or weights (finite, >= 0) that failed a check."""
    check_finite(name, t)
    raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} everywhere")


def _check_class_values(ok: Tensor, mode: str, name: str, t: Tensor, *, positive: bool) -> None:
    """Whether the (m,) class values ``t`` passed (``ok``, a 0-d bool tensor), read as ``mode`` asks.

    ``"async"`` off the CPU enqueues a device assertion (no host synchronisation: the error surfaces at a
    later one, without the details); meta tensors hold no values, so nothing is read; otherwise one host
    read, and the precise error (``_class_values_fail``) when it failed.
    """
    if mode == "off":
        return
    if mode == "async" and ok.device.type != "cpu":
        expected = "> 0" if positive else ">= 0"
        torch._assert_async(ok, f"rkd: {name} must be finite and {expected} (run with validate=True for details)")
        return
    if ok.device.type != "meta" and not bool(ok):
        _class_values_fail(name, t, positive=positive)


def check_normalizer(normalizer: object, reduction: str, device: torch.device) -> tuple[float, Tensor | None]:
    """``normalizer`` as the op takes it: ``(value, None)`` for a number (0.0: none given) or ``(0.0, t)``
    for a one-element tensor ``t`` (moved to ``device``, never read on the host)."""
    if normalizer is None:
        return 0.0, None
    if reduction != "mean":
        raise ValueError(f"normalizer applies to reduction='mean' only, got reduction={reduction!r}")
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.dtype.is_complex or normalizer.dtype == torch.bool:
            raise TypeError(f"normalizer must be a real number tensor, got {normalizer.dtype}")
        if normalizer.requires_grad:
            raise ValueError("normalizer requires grad: pass normalizer.detach()")
        return 0.0, normalizer.reshape(()).to(device, non_blocking=True)
    return positive_number("normalizer", normalizer), None


def check_ignore_index(ignore_index: object) -> int:
    """``ignore_index`` is a plain int."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def _check_labels(labels: object, rows: int, device: torch.device, ref: str) -> Tensor:
    labels = check_tensor("labels", labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    check_like("labels", labels, (rows,), device, ref)
    return labels if labels.dtype == torch.int64 and labels.is_contiguous() else labels.to(torch.int64).contiguous()


@functools.lru_cache(maxsize=64)
def _constant_rows(rows: int, value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A (rows,) tensor of ``value``, made once per shape, dtype and device: the op only reads it."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.full((rows,), value, dtype=dtype, device=device)


def constant_rows(rows: int, value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.full((rows,), value)`` without an allocation and a fill per call in eager mode (never
    written: the ops take ``a`` read-only). While ``torch.compile`` traces, a plain ``torch.full``."""
    if torch.compiler.is_compiling() or device.type == "meta":
        return torch.full((rows,), value, dtype=dtype, device=device)
    return _constant_rows(rows, value, dtype, device)


def _teacher_weight(
    teacher_weight: object,
    rows: int,
    device: torch.device,
    acc: torch.dtype,
    ref: str,
    *,
    has_teacher: bool,
    has_labels: bool,
    teacher_names: str,
) -> tuple[Tensor, float | None]:
    """``(a, a_const)``: the per-row teacher weight and its value when constant (``None`` for a tensor
    whose values are known only on device)."""
    if teacher_weight is None:
        if not has_teacher and not has_labels:
            raise ValueError(f"the loss needs labels, a teacher ({teacher_names}), or both")
        a_const: float | None = 1.0 if has_teacher else 0.0
        return constant_rows(rows, a_const, acc, device), a_const
    if isinstance(teacher_weight, Tensor):
        check_companion("teacher_weight", teacher_weight, (rows,), device, ref)
        a = teacher_weight if teacher_weight.dtype == acc else teacher_weight.to(acc)
        a_const = None
        needed = 0.0 if not has_teacher else (1.0 if not has_labels else None)
        if needed is not None and not torch.compiler.is_compiling() and a.device.type != "meta":
            # One side of the target is missing, so every row must use only the other: a tensor of all
            # ``needed`` is accepted (one read of B values: this call pattern is not a training hot path).
            if bool((a == needed).all()):
                a_const = needed
        return a.contiguous(), a_const
    if isinstance(teacher_weight, bool) or not isinstance(teacher_weight, (int, float)):
        raise TypeError(
            f"teacher_weight must be a float in [0, 1] or a (B,) tensor, got {type(teacher_weight).__name__}"
        )
    a_const = float(teacher_weight)
    if not 0.0 <= a_const <= 1.0:
        raise ValueError(f"teacher_weight must lie in [0, 1], got {a_const}")
    return constant_rows(rows, a_const, acc, device), a_const


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph. A captured call must not use a
    tensor cached by an earlier call for values that can change between replays (``log c`` of the class
    costs after a DRO update): a replay re-runs only the graph's kernels, never the Python that would
    refresh such a cache, so captured calls compute those values inside the graph instead."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ``log c`` of the last class-cost tensor seen: (a weak reference to it, its version counter, the
# accumulation dtype, whether it was checked, log c). A training loop passes the same costs every step.
_last_log_costs: tuple | None = None


def _remembered_log_costs(t: Tensor, acc: torch.dtype, check: bool) -> Tensor | None:
    """``log c`` of ``t`` computed (and checked, if ``check``) by an earlier call, if ``t`` has not changed
    since (same tensor, same version counter); else ``None``."""
    last = _last_log_costs
    if last is None or torch.compiler.is_compiling() or capturing():
        return None
    ref, version, last_acc, checked, log_c = last
    if ref() is not t or last_acc != acc or (check and not checked) or t.is_inference() or t._version != version:
        return None
    return log_c


def _remember_log_costs(t: Tensor, acc: torch.dtype, checked: bool, log_c: Tensor) -> None:
    global _last_log_costs
    if torch.compiler.is_compiling() or t.requires_grad or t.is_inference() or type(t) is not Tensor or capturing():
        return  # a traced, differentiable, versionless or graph-captured tensor is not kept
    _last_log_costs = (weakref.ref(t), t._version, acc, checked, log_c)


def _log_costs(t: object, m: int, device: torch.device, acc: torch.dtype, ref: str, mode: str) -> Tensor:
    """``log c`` of the class costs, checked as ``mode`` asks (``_check_class_values``); ``log c`` is finite
    exactly when ``c`` is finite and > 0, so the check reads one flag of the result (no pass of its own).
    The costs of the previous call, unchanged (the same tensor, not written since), are not read again."""
    t = check_companion("class_costs", t, (m,), device, ref)
    check = mode != "off"
    remembered = _remembered_log_costs(t, acc, check)
    if remembered is not None:
        return remembered
    log_c = torch.log(t if t.dtype == acc else t.to(acc))
    # The sum of m logs of finite floats cannot overflow, so it is finite exactly when every log c is.
    _check_class_values(torch.isfinite(log_c.sum()), mode, "class_costs", t, positive=True)
    _remember_log_costs(t, acc, check, log_c)
    return log_c


def _weights(t: object, m: int, device: torch.device, acc: torch.dtype, ref: str, mode: str) -> Tensor:
    """The class weights in ``acc``, checked as ``mode`` asks: finite and >= 0 (their smallest and largest
    value; a NaN fails both comparisons)."""
    t = check_companion("class_weights", t, (m,), device, ref)
    if mode != "off":
        low, high = torch.aminmax(t)
        _check_class_values((low >= 0) & (high < math.inf), mode, "class_weights", t, positive=False)
    return t if t.dtype == acc and t.is_contiguous() else t.to(acc).contiguous()


def describe_call(
    rows: int,
    m: int,
    device: torch.device,
    dtype: torch.dtype,
    ref: str,
    *,
    labels: Tensor | None,
    has_teacher: bool,
    teacher_names: str,
    teacher_weight: float | Tensor | None,
    class_costs: Tensor | None,
    class_weights: Tensor | None,
    temperature: float,
    student_temperature: float,
    reduction: str,
    backend: str,
    validate: bool | str,
    ignore_index: int,
    normalizer: float | Tensor | None,
    host_checks: bool = False,
    log_costs: Tensor | None = None,
) -> FusedCall:
    """Check and normalise the arguments of one fused call (see the module docstring).

    ``ref`` names the scores' argument in messages; ``teacher_names`` the ways to pass a teacher.
    ``host_checks``: check the label and ``teacher_weight`` values here (ops without a status).
    ``log_costs``: ``log c`` already computed and checked by the caller (``RobustDistillationLoss``
    keeps it between DRO updates), used instead of ``class_costs``.
    """
    if rows == 0 or m == 0:
        raise ValueError(f"{ref} must have at least one row and one class, got shape {(rows, m)}")
    check_reduction(reduction)
    gamma = positive_number("temperature", temperature)
    tau = positive_number("student_temperature", student_temperature)
    mode = checks.normalize_validate(validate)
    value_mode = "off" if torch.compiler.is_compiling() else mode  # how the (m,) class values are checked
    check = value_mode != "off"
    acc = acc_dtype(dtype)
    if labels is not None:
        labels = _check_labels(labels, rows, device, ref)
    a, a_const = _teacher_weight(
        teacher_weight,
        rows,
        device,
        acc,
        ref,
        has_teacher=has_teacher,
        has_labels=labels is not None,
        teacher_names=teacher_names,
    )
    if not has_teacher and a_const != 0.0:
        raise ValueError(f"teacher_weight > 0 needs {teacher_names}")
    if labels is None and a_const != 1.0:
        raise ValueError("teacher_weight < 1 needs labels (the one-hot part of the target)")
    ignore_index = check_ignore_index(ignore_index)
    norm_value, norm_t = check_normalizer(normalizer, reduction, device)
    if host_checks and check:
        if labels is not None:
            checks.check_labels(labels, m, ignore_index)
        if a_const is None and bool(((a < 0) | (a > 1) | torch.isnan(a)).any()):
            raise ValueError("teacher_weight must lie in [0, 1] in every row")
    log_c = log_costs
    if log_c is None and class_costs is not None:
        log_c = _log_costs(class_costs, m, device, acc, ref, value_mode)
    w = None if class_weights is None else _weights(class_weights, m, device, acc, ref, value_mode)
    name = select_backend(backend, device, dtype, m)
    return FusedCall(
        rows, m, device, dtype, acc, labels, a, a_const, log_c, w, gamma, tau, reduction, ignore_index,
        norm_value, norm_t, mode, name,
    )  # fmt: skip
