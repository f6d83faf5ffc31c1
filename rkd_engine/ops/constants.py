"""Constants of the fused op, written once (issue: "single-sourced constants").

Imported by the backends, the Triton kernels and the user API without importing Triton or an extension;
``tests/test_constants.py`` checks that the compiled kernels' own limits (the CUDA header's
``kMaxClasses``, ``kernels.distill.MAX_CLASSES``) agree with these.
"""

from __future__ import annotations

MAX_CLASSES: int = 262_144
"""Widest row (``m``) the GPU kernels (Triton and CUDA) take; the C++ CPU kernel has no limit."""

BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpp", "reference")
"""Every backend, in the order ``explain_backends`` lists them; ``"auto"`` chooses among them."""

OBJECTIVES: tuple[str, ...] = ("standard", "balanced", "robust", "tradeoff")
"""The objectives of ``RobustDistillationLoss`` and the CLI (docs/objectives.md)."""

REDUCTIONS: tuple[str, ...] = ("none", "sum", "mean")
"""``reduction`` of ``distill_loss``."""


class BackendUnavailableError(RuntimeError):
    """A backend cannot run these inputs (device, dtype, width, missing toolchain): one type and one
    message format, ``backend='NAME' cannot run DTYPE inputs with m=M on DEVICE: REASON``, on every backend."""

    def __init__(self, backend: str, device: object, dtype: object, m: int, reason: str) -> None:
        super().__init__(f"backend={backend!r} cannot run {dtype} inputs with m={m} on {device}: {reason}")
        self.backend = backend
        self.reason = reason
