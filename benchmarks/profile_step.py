"""Per-kernel GPU times of one fused forward+backward (torch.profiler), for each rkd GPU backend.

python benchmarks/profile_step.py 8192x131072 bfloat16
"""

from __future__ import annotations

import sys

import torch
from bench_loss import GAMMA, make_case

from rkd_engine import distill_loss

shape, dtype_name = sys.argv[1], sys.argv[2]
rows, m = (int(v) for v in shape.split("x"))
f, g, costs = make_case(rows, m, getattr(torch, dtype_name), "cuda")
for backend in ("triton", "cuda"):

    def step(backend=backend):
        f.grad = None
        distill_loss(
            f, teacher_logits=g, temperature=GAMMA, class_costs=costs, backend=backend, validate=False
        ).loss.backward()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(f"== {backend} {shape} {dtype_name}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
