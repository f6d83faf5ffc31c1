"""The CUDA backend: the sm_90 kernels of ``csrc/cuda`` (extension ``rkd_engine._C_cuda``) behind the backend contract.

One fused forward computes ``loss_i``, ``grad_scale * dloss_i/df_i`` (rounded once, in the student dtype)
and the per-class ``mass``, ``risk`` and ``error`` of docs/loss.md, on the current CUDA stream and
with no host synchronisation: rows of up to 4,096 classes are held in registers (a warp or a block per
row; f and g read once), wider rows (up to ``MAX_CLASSES``) take an online-softmax pass and a second
(column tile x row group) pass; per-class statistics are reduced per block and then column-summed in a
fixed order. ``csrc/cuda/distill_kernels.cu`` states the math and the launch shapes. The launch plan (path,
block sizes, grids, workspace) is computed once per (device, dtype, B, m, row alignment) and cached in the
extension, and the device's properties and the kernels' occupancy are queried once: a training loop's
calls look the plan up and query nothing.

The extension is imported on first use, so a checkout or installation without it still imports;
``unavailable_reason`` then says why the backend cannot run.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import torch
from torch import Tensor

from rkd_engine.ops.checks import PROB_SUM_TOL
from rkd_engine.ops.constants import MAX_CLASSES, BackendUnavailableError

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_extension: ModuleType | None = None
_import_error: str | None = None


def _load() -> ModuleType | None:
    """``rkd_engine._C_cuda``, or ``None`` (with the reason kept) when it cannot be imported."""
    global _extension, _import_error
    if _extension is None and _import_error is None:
        try:
            _extension = importlib.import_module("rkd_engine._C_cuda")
        except ImportError as exc:  # not built (CPU-only torch, no CUDA toolkit), or built against another torch
            _import_error = f"{type(exc).__name__}: {exc}"
    return _extension


def _require() -> ModuleType:
    module = _load()
    if module is None:
        raise RuntimeError(f"the CUDA extension rkd_engine._C_cuda is not built: {_import_error}")
    return module


_cuda_seen = False


def _cuda_available() -> bool:
    """``torch.cuda.is_available()``, asked until it is true once (then remembered: a training loop's calls ask
    the driver nothing)."""
    global _cuda_seen
    if not _cuda_seen:
        _cuda_seen = torch.cuda.is_available()
    return _cuda_seen


def unavailable_reason(device: torch.device, dtype: torch.dtype, m: int) -> str | None:
    """``None`` if the CUDA kernels can run (``device``, ``dtype``, ``m``) here, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the CUDA backend runs on CUDA tensors only, got tensors on {device}"
    if dtype == torch.float64:
        return "the CUDA backend does not support float64 (float32, bfloat16 and float16 only)"
    if dtype not in DTYPES:
        return f"the CUDA backend supports float32, bfloat16 and float16, got {dtype}"
    if m < 1:
        return f"the CUDA backend needs at least one class, got m={m}"
    if m > MAX_CLASSES:
        return f"m={m} classes is more than the CUDA kernels' limit of {MAX_CLASSES}"
    if not _cuda_available():
        return "no CUDA GPU is available to this torch (CPU build, or no device visible)"
    if _load() is None:
        return f"the CUDA extension rkd_engine._C_cuda is not built: {_import_error}"
    return None


def _check_tensor(name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """``ValueError``/``TypeError`` naming ``name`` unless ``t`` is a contiguous tensor of that shape, dtype, device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like the student, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_inputs(student, teacher, labels, a, log_c, w, gamma, tau, grad_out) -> None:
    """The checks of the backend contract, on the host only (no device synchronisation)."""
    if not isinstance(student, Tensor):
        raise TypeError(f"student must be a torch.Tensor, got {type(student).__name__}")
    if student.dim() != 2:
        raise ValueError(f"student must have shape (B, m), got {tuple(student.shape)}")
    reason = unavailable_reason(student.device, student.dtype, student.shape[1])
    if reason is not None:
        raise BackendUnavailableError("cuda", student.device, student.dtype, student.shape[1], reason)
    if not student.is_contiguous():
        raise ValueError("student must be contiguous")
    rows, m = student.shape
    device = student.device
    if teacher is None and labels is None:
        raise ValueError("fused_forward needs a teacher or labels")
    if teacher is not None:
        _check_tensor("teacher", teacher, (rows, m), student.dtype, device)
    if labels is not None:
        _check_tensor("labels", labels, (rows,), torch.int64, device)
    _check_tensor("a", a, (rows,), torch.float32, device)
    if log_c is not None:
        _check_tensor("log_c", log_c, (m,), torch.float32, device)
    if w is not None:
        _check_tensor("w", w, (m,), torch.float32, device)
    if grad_out is not None:
        _check_tensor("grad_out", grad_out, (rows, m), student.dtype, device)
    for name, value in (("gamma", gamma), ("tau", tau)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")


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
    """``(loss, grad, mass, risk, error)`` for CUDA tensors; the contract of ``rkd_engine.reference.fused_rows``.

    ``student`` (B, m) and ``teacher`` (B, m, same dtype; logits with temperature ``gamma`` or
    probabilities when ``teacher_is_probs``) are contiguous float32/bfloat16/float16; ``labels`` (B,) int64;
    ``a`` (B,), ``log_c`` and ``w`` (m,) float32, all on the student's device. ``loss`` (B,) and
    ``mass``/``risk``/``error`` (m,) are float32; ``grad`` (B, m) is ``grad_scale * dloss_i/df_i`` in the
    student dtype, written into ``grad_out`` when given (it may be ``student`` itself), or an empty tensor
    when ``need_grad`` is false. Wrong types, shapes, dtypes or devices raise ``TypeError``/``ValueError``
    naming the argument. A label outside [0, m) is not checked on the host (that would synchronise): its
    row's loss is NaN. A row labelled ``ignore_index`` contributes nothing; ``scale``, a 0-d float32 tensor
    on the device, multiplies the gradient (read by the kernel, never by the host).
    """
    _check_inputs(student, teacher, labels, a, log_c, w, gamma, tau, grad_out if need_grad else None)
    module = _require()
    return tuple(
        module.fused_forward(
            student,
            teacher,
            labels,
            a,
            log_c,
            w,
            gamma=float(gamma),
            tau=float(tau),
            teacher_is_probs=bool(teacher_is_probs),
            grad_scale=float(grad_scale),
            need_grad=bool(need_grad),
            prob_tol=PROB_SUM_TOL[student.dtype] if prob_tol is None else float(prob_tol),
            grad_out=grad_out if need_grad else None,
            ignore_index=int(ignore_index),
            scale=scale,
        )
    )


def scale_rows_(grad: Tensor, go: Tensor) -> None:
    """``grad[i, :] *= go[i]`` in place (fp32 product, one rounding); rows with ``go[i] == 1`` are neither read nor written.

    ``grad`` is a contiguous (B, m) CUDA tensor of a supported dtype, ``go`` a contiguous (B,) float32
    tensor on the same device; the skip test runs on the device.
    """
    _require().scale_rows_(grad, go)


def fused_forward_path(student: Tensor) -> str:
    """In words, the code path and launch shape the kernels take for a student like ``student`` (for benchmarks)."""
    return _require().fused_forward_path(student)
