"""The C++ CPU backend: the fused kernel of ``csrc/cpu`` (extension ``rkd_engine._C``) behind the backend contract.

One pass per row computes ``loss_i``, ``grad_scale * dloss_i/df_i`` and the per-class ``mass``, ``risk`` and
``error`` of docs/loss.md (see ``csrc/cpu/distill_cpu.cpp`` for the math), with OpenMP over rows and
AVX2 vector code where the CPU has it. The extension is imported on first use, so a checkout or
installation without it still imports; ``unavailable_reason`` then says why the backend cannot run.
"""

from __future__ import annotations

import importlib
import sys
import threading
from types import ModuleType

import torch
from torch import Tensor

from rkd_engine.ops.checks import PROB_SUM_TOL

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_extension: ModuleType | None = None
_import_error: str | None = None


def _load() -> ModuleType | None:
    """``rkd_engine._C``, or ``None`` (with the reason kept) when it cannot be imported."""
    global _extension, _import_error
    if _extension is None and _import_error is None:
        try:
            _extension = importlib.import_module("rkd_engine._C")
        except ImportError as exc:  # not built, or built against another torch
            _import_error = f"{type(exc).__name__}: {exc}"
    return _extension


def _require() -> ModuleType:
    module = _load()
    if module is None:
        raise RuntimeError(f"the C++ extension rkd_engine._C is not built: {_import_error}")
    return module


def unavailable_reason(device: torch.device, dtype: torch.dtype, m: int) -> str | None:
    """``None`` if the C++ kernel can run (``device``, ``dtype``, ``m``) here, else why not."""
    if torch.device(device).type != "cpu":
        return f"the C++ backend runs on CPU tensors only, got {torch.device(device)}"
    if dtype not in DTYPES:
        return f"the C++ backend supports float32, bfloat16, float16 and float64, got {dtype}"
    if m < 1:
        return f"the C++ backend needs at least one class, got m={m}"
    if _load() is None:
        return f"the C++ extension rkd_engine._C is not built: {_import_error}"
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
    prob_tol: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad, mass, risk, error)`` for CPU tensors; the contract of ``rkd_engine.reference.fused_rows``.

    ``loss`` (B,), ``mass``/``risk``/``error`` (m,) are in the accumulation dtype (float64 for float64
    inputs, else float32); ``grad`` (B, m) is ``grad_scale * dloss_i/df_i`` in the student dtype, written
    into ``grad_out`` when given (it may be ``student`` itself), or an empty tensor when ``need_grad`` is
    false. Invalid shapes, dtypes or labels raise ``RuntimeError`` from the extension. A row labelled
    ``ignore_index`` gets loss 0, a zero gradient row and adds nothing to the statistics; ``scale``, a
    0-d CPU tensor, multiplies the gradient (read on the host: free on CPU). A row whose teacher values
    are invalid gets a NaN loss, whatever its ``a`` (``rkd_engine.ops.checks``: the call's status); ``prob_tol``
    (default ``checks.PROB_SUM_TOL`` of the dtype) is how far a row of teacher probabilities may sum from 1.
    """
    grad_scale = host_grad_scale(grad_scale, scale)
    prob_tol = PROB_SUM_TOL.get(student.dtype, 0.0) if prob_tol is None else float(prob_tol)
    return with_kept_gradient(
        lambda out: _require().fused_forward(
            student, teacher, labels, a, log_c, w, gamma=float(gamma), tau=float(tau),
            teacher_is_probs=bool(teacher_is_probs), grad_scale=float(grad_scale), need_grad=bool(need_grad),
            prob_tol=prob_tol, grad_out=out, ignore_index=int(ignore_index),
        ),
        student, need_grad, grad_out,
    )  # fmt: skip


# Gradients of REUSE_GRAD_BYTES or more: the memory of the last one this thread returned is kept and
# written again by the next call of its shape and dtype once no tensor uses it any more (the caller dropped
# the gradient: the usual ``optimizer.zero_grad()`` between steps, or ``f.grad = None``). A fresh
# allocation that large is memory the C library maps anew and the OS faults in page by page (each fault
# zeroes a page) on every call: at (1024, 32000) fp32 that cost more than the kernel. Kept is one
# gradient's memory per thread at most, which the next step needs anyway; ``release_buffers`` drops it.
REUSE_GRAD_BYTES = 8 << 20
_buffers = threading.local()


def with_kept_gradient(run, student: Tensor, need_grad: bool, grad_out: Tensor | None) -> tuple:
    """``run(grad_out)``, a kernel call returning ``(loss, grad, ...)`` with its gradient written into
    ``grad_out`` (allocated by the kernel when ``None``): for a large gradient the caller did not place, into
    this thread's kept memory when it is free, and the new gradient's memory is kept afterwards. The
    memory only, not the tensor: autograd hands a gradient tensor that nothing else holds to the parameter
    as its ``.grad`` (no copy), and the next call finds out whether that ``.grad`` was dropped."""
    if not need_grad or grad_out is not None or student.numel() * student.element_size() < REUSE_GRAD_BYTES:
        return tuple(run(grad_out))
    out = run(_free_gradient(student))
    _buffers.grad = (out[1].shape, out[1].dtype, out[1].untyped_storage())
    return tuple(out)


def _free_gradient(student: Tensor) -> Tensor | None:
    """A tensor on this thread's kept gradient memory, if it was a gradient of ``student``'s shape and dtype
    and nothing uses that memory any more: no tensor (the storage's only C++ reference is its Python
    object's) and no other Python reference to that storage object (the cache's tuple, ``storage`` here
    and ``getrefcount``'s argument)."""
    kept = getattr(_buffers, "grad", None)
    if kept is None:
        return None
    shape, dtype, storage = kept
    if shape != student.shape or dtype != student.dtype:
        return None
    if torch._C._storage_Use_Count(storage._cdata) != 1 or sys.getrefcount(storage) != 3:
        return None
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def release_buffers() -> None:
    """Drop this thread's kept gradient buffer (see ``REUSE_GRAD_BYTES``)."""
    _buffers.grad = None


def host_grad_scale(grad_scale: float, scale: Tensor | None) -> float:
    """``grad_scale`` times ``scale`` (a 0-d CPU tensor, read on the host: free on CPU) when given."""
    return float(grad_scale) if scale is None else float(grad_scale) * float(scale)


def scale_rows_(grad: Tensor, go: Tensor) -> None:
    """``grad[i, :] *= go[i]`` in place; rows with ``go[i] == 1`` are neither read nor written."""
    _require().scale_rows_(grad, go)


def sum_rows(loss: Tensor, factor: float) -> Tensor:
    """``factor * loss.sum()`` as a 0-d tensor, summed in float64: the reduced loss of a call, without the
    fixed cost of an ATen reduction (an optional entry point of the backend contract, see ``ops.op``)."""
    return _require().sum_rows(loss, float(factor))
