"""The Triton backend: launchers of ``rkd_engine.kernels`` behind the backend contract.

Checks the inputs, picks tiles and grids with ``kernels.distill.fused_config`` (the one place they are
chosen), allocates the outputs and the fp32 workspaces, and launches on the current stream. Nothing here
reads a device value on the host: no ``.item()``, no synchronisation, no Python loop over rows or classes.
The kernels run on CUDA tensors; with ``TRITON_INTERPRET=1`` in the environment (set before the first
launch) Triton's interpreter runs them on CPU tensors instead, which is how CI tests them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rkd_engine.ops.checks import PROB_SUM_TOL
from rkd_engine.ops.constants import MAX_CLASSES, BackendUnavailableError

if TYPE_CHECKING:
    from rkd_engine.kernels.distill import FusedConfig

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_INTERPRETER_SM_COUNT = 4  # few, large programs: the interpreter runs programs one after another


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    # Found, not imported: Triton reads TRITON_INTERPRET when triton.language is first imported, so
    # asking whether this backend can run must not import it (test collection asks early).
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(device: torch.device, dtype: torch.dtype, m: int) -> str | None:
    """``None`` when these kernels can run (``device``, ``dtype``, ``m``) here, else why not."""
    if not _triton_installed():
        return "triton is not installed"
    device = torch.device(device)
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return f"the Triton kernels run on CUDA tensors, not {device.type} (TRITON_INTERPRET=1 runs them on CPU)"
    if dtype not in SUPPORTED_DTYPES:
        return f"{dtype} is not supported (float32, bfloat16 and float16 are)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is available to this torch (CPU build, or no device visible)"
        major, minor = _capability(device)
        if (major, minor) < (7, 5) or (dtype == torch.bfloat16 and major < 8):
            return f"{dtype} needs a GPU of compute capability {'8.0' if major >= 7 else '7.5'} or more, not {major}.{minor}"
    if m > MAX_CLASSES:
        return f"m={m} classes is more than the kernels' limit of {MAX_CLASSES}"
    return None


@functools.lru_cache(maxsize=16)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _kernels() -> ModuleType:
    """The kernel module, imported (with Triton) at the first launch."""
    from rkd_engine.kernels import distill

    return distill


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_vector(
    name: str, t: Tensor | None, length: int, dtype: torch.dtype, device: torch.device, *, required: bool
) -> None:
    if t is None:
        if required:
            raise TypeError(f"{name} must be a tensor, got None")
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the student's device)")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_matrix(name: str, t: Tensor, student: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != student.shape:
        raise ValueError(f"{name} must have the student's shape {tuple(student.shape)}, got {tuple(t.shape)}")
    if t.dtype != student.dtype:
        raise TypeError(f"{name} must have the student's dtype {student.dtype}, got {t.dtype}")
    if t.device != student.device:
        raise ValueError(f"{name} is on {t.device}, expected {student.device} (the student's device)")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_runnable(device: torch.device, dtype: torch.dtype, m: int) -> None:
    reason = unavailable_reason(device, dtype, m)
    if reason is not None:
        raise BackendUnavailableError("triton", device, dtype, m, reason)


def _check_inputs(student, teacher, labels, a, log_c, w, gamma, tau, teacher_is_probs, need_grad, grad_out, scale):
    """The backend contract's checks of a fused call (types, shapes, dtypes, devices, scalars), on the host."""
    if not isinstance(student, Tensor) or student.dim() != 2:
        raise ValueError(f"student must be a (B, m) tensor, got {getattr(student, 'shape', type(student).__name__)}")
    if not student.is_contiguous():
        raise ValueError("student must be contiguous")
    rows, m = student.shape
    device = student.device
    if m < 1:
        raise ValueError("student must have at least one class (m >= 1)")
    _check_runnable(device, student.dtype, m)
    if teacher is not None:
        _check_matrix("teacher", teacher, student)
    if labels is not None:
        _check_vector("labels", labels, rows, torch.int64, device, required=True)
    if teacher is None and labels is None:
        raise ValueError("fused_forward needs labels or a teacher")
    _check_vector("a", a, rows, torch.float32, device, required=True)
    _check_vector("log_c", log_c, m, torch.float32, device, required=False)
    _check_vector("w", w, m, torch.float32, device, required=False)
    if teacher is not None and not teacher_is_probs and not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if need_grad and grad_out is not None:
        _check_matrix("grad_out", grad_out, student)
    if scale is not None:
        _check_vector("scale", scale.reshape(-1), 1, torch.float32, device, required=True)


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
    config: FusedConfig | None = None,
    ignore_index: int = -100,
    scale: Tensor | None = None,
    prob_tol: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss per row, ``grad_scale * dloss/df`` and per-class ``mass``, ``risk``, ``error`` (docs/loss.md).

    The contract of ``rkd_engine.reference.fused_rows``; ``grad_out`` (may be ``student`` itself) receives
    the gradient when given. ``config``, made by ``kernels.distill.fused_config`` for these ``B`` and ``m``,
    overrides the default one, e.g. to force the two-pass path on small inputs (tests). A row labelled
    ``ignore_index`` contributes nothing; ``scale``, a 0-d fp32 tensor on the device, multiplies the
    gradient (read by the kernels, not the host).
    """
    _check_inputs(student, teacher, labels, a, log_c, w, gamma, tau, teacher_is_probs, need_grad, grad_out, scale)
    rows, m = student.shape
    device = student.device

    distill = _kernels()
    acc = torch.float32
    loss = torch.empty(rows, dtype=acc, device=device)
    new_stat = torch.zeros if rows == 0 else torch.empty  # stage 2 writes every class
    mass, risk, error = (new_stat(m, dtype=acc, device=device) for _ in range(3))
    if not need_grad:
        grad = student.new_empty(0)
    elif grad_out is not None:
        grad = grad_out
    else:
        grad = torch.empty_like(student)
    if rows == 0:
        return loss, grad, mass, risk, error

    cfg = config if config is not None else distill.fused_config(rows, m, sm_count=_sm_count(device))
    if not isinstance(cfg, distill.FusedConfig):
        raise TypeError(f"config must be a FusedConfig, got {type(cfg).__name__}")
    parts = torch.empty(cfg.n_parts, 3, m, dtype=acc, device=device)
    dummy = student
    g = teacher if teacher is not None else dummy
    flags = {
        "HAS_TEACHER": teacher is not None,
        "TEACHER_PROBS": bool(teacher_is_probs),
        "HAS_LABELS": labels is not None,
        "HAS_LOGC": log_c is not None,
        "HAS_W": w is not None,
        "HAS_TAU": float(tau) != 1.0,
    }
    tol = PROB_SUM_TOL[student.dtype] if prob_tol is None else float(prob_tol)
    extra = (scale if scale is not None else a, int(ignore_index), tol)
    inv_gamma = 1.0 / float(gamma) if gamma > 0 else 1.0
    scalars = (inv_gamma, float(tau), 1.0 / float(tau), float(grad_scale))
    grad_arg = grad if need_grad else dummy
    common = (
        g,
        g.stride(0),
        labels if labels is not None else a,
        a,
        log_c if log_c is not None else a,
        w if w is not None else a,
    )
    with _on(device):
        _launch_fused(
            distill, cfg, student, common, grad_arg, need_grad, loss, parts, mass, risk, error, flags, scalars, extra
        )
    return loss, grad, mass, risk, error


def _launch_fused(
    distill, cfg, student, common, grad_arg, need_grad, loss, parts, mass, risk, error, flags, scalars, extra
):
    """The kernels of one fused call: the narrow kernel or the two wide passes, then stage 2."""
    rows, m = student.shape
    inv_gamma, tau, inv_tau, grad_scale = scalars
    scale_arg, ignore_index, prob_tol = extra
    has_scale = scale_arg is not common[3]
    stride_o = grad_arg.stride(0) if need_grad else m
    if not cfg.wide:
        distill._fused_narrow_kernel[(cfg.programs,)](
            student, student.stride(0), *common, grad_arg, stride_o, loss, parts,
            rows, m, inv_gamma, tau, inv_tau, grad_scale, scale_arg, ignore_index, prob_tol,
            **flags, NEED_GRAD=bool(need_grad), HAS_SCALE=has_scale,
            BLOCK_R=cfg.block_r, BLOCK_M=cfg.block_m, num_warps=cfg.num_warps,
        )  # fmt: skip
    else:
        row_stats = torch.empty(rows, 8, dtype=torch.float32, device=student.device)
        distill._wide_rows_kernel[(_cdiv(rows, cfg.block_r1),)](
            student, student.stride(0), *common, loss, row_stats,
            rows, m, inv_gamma, tau, inv_tau, ignore_index, prob_tol,
            **flags, BLOCK_R=cfg.block_r1, BLOCK_N=cfg.block_n1, num_warps=cfg.num_warps1,
        )  # fmt: skip
        grid = (_cdiv(m, cfg.block_m), cfg.programs)
        distill._wide_grad_kernel[grid](
            student, student.stride(0), *common, row_stats, grad_arg, stride_o, parts,
            rows, m, cfg.rows_per_group, inv_gamma, tau, inv_tau, grad_scale, scale_arg, ignore_index,
            **flags, NEED_GRAD=bool(need_grad), HAS_SCALE=has_scale, BLOCK_R=cfg.block_r, BLOCK_N=cfg.block_m, num_warps=cfg.num_warps,
        )  # fmt: skip
    block = min(256, max(16, 1 << (m - 1).bit_length()))
    distill._sum_partials_kernel[(_cdiv(m, block),)](
        parts, mass, risk, error, cfg.n_parts, m, BLOCK=block, PARTS=16, num_warps=4
    )


def scale_rows_(grad: Tensor, go: Tensor) -> None:
    """``grad[i, :] *= go[i]`` in place; rows with ``go[i] == 1`` are skipped on device (not read, not written)."""
    if not isinstance(grad, Tensor) or grad.dim() != 2 or not grad.is_contiguous():
        raise ValueError("grad must be a contiguous (B, m) tensor")
    _check_runnable(grad.device, grad.dtype, grad.shape[1])
    _check_vector("go", go, grad.shape[0], torch.float32, grad.device, required=True)
    rows, m = grad.shape
    if rows == 0 or m == 0:
        return
    distill = _kernels()
    block, num_warps = distill.scale_rows_config(m)
    with _on(grad.device):
        distill._scale_rows_kernel[(rows,)](grad, grad.stride(0), go, m, BLOCK=block, num_warps=num_warps)
