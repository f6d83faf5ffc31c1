"""Shared test helpers: the (backend, device) pairs present here, input regimes and tolerances."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton's interpreter runs the Triton kernels on CPU tensors (tests/test_triton_backend.py).
# Triton reads TRITON_INTERPRET when triton.language is first imported, which importing torch._dynamo
# already does, so it is set here, before rkd_engine is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rkd_engine.ops import explain_backends

# Absolute tolerance per dtype for values of order 1 (loss, gradient, statistics per row).
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def backend_devices() -> list:
    """Every (backend, device) pair that can run here; GPU pairs only where a GPU is present.

    The Triton interpreter (CPU) is exercised in tests/test_triton_backend.py on small shapes only.
    """
    pairs = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for name, reason in explain_backends(device, torch.float32, 16).items():
            if reason is None and not (name == "triton" and device == "cpu"):
                pairs.append(pytest.param(name, device, id=f"{name}-{device}"))
    return pairs


def make_inputs(rows: int, m: int, dtype: torch.dtype, device: str, regime: str, seed: int):
    """Student and teacher scores and labels for one input regime (see CONTRIBUTING.md, Tests)."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(rows, m, generator=gen, dtype=torch.float64)
    g = torch.randn(rows, m, generator=gen, dtype=torch.float64)
    y = torch.randint(0, m, (rows,), generator=gen)
    if regime == "peaked":
        f = f * 15
        g = g * 15
    elif regime == "equal":
        g = f.clone()
    elif regime == "huge":
        f = f + 1e4
        g = g * 30 - 1e4
    elif regime == "masked" and m > 1:
        masked = torch.rand(m, generator=gen) < 0.3
        masked[0] = False
        g[:, masked] = float("-inf")
        y = torch.where(masked[y], torch.zeros_like(y), y)
    return f.to(dtype).to(device), g.to(dtype).to(device), y.to(device)
