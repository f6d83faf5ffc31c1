"""The bench_loss cases under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Not part of the test run (``testpaths`` is ``tests/``). Same shapes, methods and case as
``bench_loss.py``; compare forward+backward totals with ``--benchmark-group-by=param:shape``.
"""

from __future__ import annotations

import pytest
import torch
from bench_loss import CPU_SHAPES, CUDA_SHAPES, make_case, methods_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = CUDA_SHAPES if DEVICE == "cuda" else CPU_SHAPES
METHODS = ["eager", "compile", "rkd-cpp-default", "rkd-cpp", "rkd-triton", "rkd-cuda", "liger-kldiv"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [f"{b}x{m}" for b, m in SHAPES])
@pytest.mark.parametrize("method", METHODS)
def test_forward_backward(benchmark, method, shape, dtype):
    rows, m = (int(v) for v in shape.split("x"))
    f, g, costs = make_case(rows, m, getattr(torch, dtype), DEVICE)
    methods = methods_for(DEVICE, f, g, costs)
    if method not in methods:
        pytest.skip(f"{method} is not available here")
    fn = methods[method]
    fn()
    if DEVICE == "cuda":

        def step():
            fn()
            torch.cuda.synchronize()

        benchmark(step)
    else:
        benchmark(fn)
