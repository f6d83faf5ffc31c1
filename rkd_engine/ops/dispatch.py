"""Backend selection: a fixed order per device, each backend saying why it cannot take the inputs.

``auto`` on CUDA tensors tries ``cuda`` and ``triton`` (in the order that measured faster for the
shape, see ``_cuda_order``), then ``reference``; on CPU tensors ``cpp`` then ``reference``. An explicit
backend that cannot run raises ``RuntimeError`` with its reason; it never silently falls back. The
environment variable ``RKD_BACKEND`` forces a backend wherever ``backend="auto"`` is passed.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

import torch

from rkd_engine.ops.constants import BACKENDS, BackendUnavailableError

_log = logging.getLogger("rkd_engine.ops")


@functools.cache
def backend_module(name: str) -> ModuleType:
    """The module implementing backend ``name`` (imported lazily: a missing toolchain never breaks import;
    memoised: the op looks it up on every call)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {name!r}")
    return importlib.import_module(f"rkd_engine.ops.{name}_backend")


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype, m: int) -> str | None:
    """``None`` when backend ``name`` can run these inputs, else why not."""
    try:
        module = backend_module(name)
    except ImportError as exc:  # a backend module whose own imports fail
        return f"its module could not be imported: {exc}"
    return module.unavailable_reason(device, dtype, m)


_CUDA_FIRST_MAX_CLASSES = 4096
"""Up to this many classes the CUDA kernel goes first, above it Triton. Measured on an H100 (forward+backward,
benchmarks/results/bench_loss_cuda.csv): (8192, 1000) CUDA 0.81 ms vs Triton 1.26 ms in bf16 (0.89 vs 1.14
in fp32); (8192, 32000) Triton 1.38 vs CUDA 2.42 ms; (8192, 131072) Triton 5.05 vs CUDA 8.42 ms."""


def _cuda_order(m: int) -> tuple[str, ...]:
    """Which GPU backend to try first for rows of ``m`` classes (see ``_CUDA_FIRST_MAX_CLASSES``)."""
    return ("cuda", "triton") if m <= _CUDA_FIRST_MAX_CLASSES else ("triton", "cuda")


def candidate_order(device: torch.device) -> tuple[str, ...]:
    """Backends ``auto`` tries, best first, for tensors on ``device``."""
    if device.type == "cuda":
        return ("triton", "cuda", "reference")
    if device.type == "cpu":
        return ("cpp", "reference")
    return ("reference",)


def explain_backends(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, m: int = 1000
) -> dict[str, str | None]:
    """For every backend, ``None`` if it can run (``device``, ``dtype``, ``m``) here, else the reason."""
    device = torch.device(device)
    return {name: unavailable_reason(name, device, dtype, m) for name in BACKENDS}


def available_backends(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, m: int = 1000
) -> list[str]:
    """Names of the backends that can run (``device``, ``dtype``, ``m``) here."""
    return [name for name, reason in explain_backends(device, dtype, m).items() if reason is None]


def select_backend(requested: str, device: torch.device, dtype: torch.dtype, m: int) -> str:
    """Resolve ``requested`` (``"auto"`` or a backend name) to a backend that can run the inputs.

    The answer depends only on its arguments and the environment, so ``torch.compile`` treats it as a
    constant of the traced graph.
    """
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, got {type(requested).__name__}")
    return _resolve(requested, device, dtype, m)


@torch.compiler.assume_constant_result
def _resolve(requested: str, device: torch.device, dtype: torch.dtype, m: int) -> str:
    if requested == "auto":
        requested = os.environ.get("RKD_BACKEND", "auto") or "auto"
    return _resolve_cached(requested, device, dtype, m)


@functools.lru_cache(maxsize=256)
def _resolve_cached(requested: str, device: torch.device, dtype: torch.dtype, m: int) -> str:
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {requested!r}")
        reason = unavailable_reason(requested, device, dtype, m)
        if reason is not None:
            raise BackendUnavailableError(requested, device, dtype, m, reason)
        return requested
    passed_over = []
    if device.type == "cuda":
        order = (*_cuda_order(m), "reference")
    else:
        order = candidate_order(device)
    for name in order:
        reason = unavailable_reason(name, device, dtype, m)
        if reason is None:
            if passed_over:
                _log.debug("backend auto -> %s (passed over: %s)", name, "; ".join(passed_over))
            return name
        passed_over.append(f"{name}: {reason}")
    raise RuntimeError("no backend can run these inputs: " + "; ".join(passed_over))
