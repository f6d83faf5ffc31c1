"""Sweep the Triton wide-path tiles and warps on the GPU present; prints median times (ms) per config.

    python benchmarks/tune_triton.py [--shape 8192x131072] [--dtypes bfloat16,float32]

Used to choose the constants of ``kernels/distill.py::fused_config``; results go to
benchmarks/results/tune_triton_<gpu>.csv.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses

import torch
import triton
import triton.testing
from _common import ROOT
from bench_loss import GAMMA, make_case

from rkd_engine.kernels import distill
from rkd_engine.ops import triton_backend


def wide_variant(base, rows, m, sms, bn1, w1, bn, w):
    slots = max(1, 16 // w) * sms
    n_col = triton.cdiv(m, bn)
    groups = max(1, min(triton.cdiv(rows, 128), triton.cdiv(8 * slots, n_col)))
    rpg = triton.cdiv(rows, groups)
    groups = triton.cdiv(rows, rpg)
    return dataclasses.replace(
        base, block_n1=bn1, num_warps1=w1, block_m=bn, num_warps=w, programs=groups, rows_per_group=rpg
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8192x131072")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    args = parser.parse_args()
    rows, m = (int(v) for v in args.shape.split("x"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out_rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        f, g, costs = make_case(rows, m, dtype, "cuda")
        f = f.detach()
        a = torch.ones(rows, device="cuda")
        log_c = costs.log().float()
        grad = torch.empty_like(f)
        base = distill.fused_config(rows, m, sm_count=sms)
        print(dtype_name, base, flush=True)
        variants = [("base", base)]
        if base.wide:
            for bn1, w1 in [(4096, 8), (8192, 16), (4096, 16), (2048, 8)]:
                for bn, w in [(2048, 8), (4096, 16), (1024, 4), (2048, 4)]:
                    variants.append((f"p1={bn1}/{w1} p2={bn}/{w}", wide_variant(base, rows, m, sms, bn1, w1, bn, w)))
        for name, cfg in variants:

            def run(cfg=cfg, f=f, g=g, a=a, log_c=log_c, grad=grad):  # bound: deleted after the dtype
                triton_backend.fused_forward(
                    f,
                    g,
                    None,
                    a,
                    log_c,
                    None,
                    gamma=GAMMA,
                    tau=1.0,
                    teacher_is_probs=False,
                    grad_scale=1.0 / rows,
                    need_grad=True,
                    grad_out=grad,
                    config=cfg,
                )

            try:
                ms = triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median")
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                print(f"{dtype_name} {name}: failed {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            gbps5 = 5 * rows * m * f.element_size() / (ms * 1e-3) / 1e9
            print(f"{dtype_name:9} {name:28} {ms:8.3f} ms  {gbps5:7.0f} GB/s (5-pass)", flush=True)
            out_rows.append(
                {
                    "gpu": torch.cuda.get_device_name(),
                    "rows": rows,
                    "m": m,
                    "dtype": dtype_name,
                    "config": name,
                    "median_ms": ms,
                    "GBps_5pass": gbps5,
                }
            )
        del f, g, grad, run  # free this dtype's tensors before the next dtype's are made
    path = ROOT / "benchmarks" / "results" / f"tune_triton_{torch.cuda.get_device_name().replace(' ', '_')}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(out_rows[0]))
        writer.writeheader()
        writer.writerows(out_rows)


if __name__ == "__main__":
    main()
