"""Forward+backward of the distillation loss: eager reference, torch.compile of the reference, rkd backends.

The case is the paper's robust student (docs/loss.md): teacher logits ``g`` at temperature
``gamma = 2``, target ``q = p`` (``a = 1``), class costs ``c = lambda / pi_t``, mean over rows, and
``loss.backward()`` into the student scores. Every method computes the same gradient; speed-ups are
measured in the same run. Bandwidth is judged against a memory copy measured in the same run
(docs/performance.md): the floor moves ``3 x B x m`` elements (read ``f`` and ``g``, write the
gradient); a two-pass kernel over rows too wide for the chip moves ``5 x``.

    python benchmarks/bench_loss.py                      # the issue's shapes for the device present
    python benchmarks/bench_loss.py --device cpu --shapes 4096x1000 --dtypes float32
    python benchmarks/bench_loss.py --logit-scale 20     # peaked rows, as a trained model gives (see below)

``--logit-scale S`` multiplies both models' logits (standard deviations 2 and 3) by ``S``: at 20 a row's
spread is some 100, so most of its probabilities lie far below float32's smallest normal number, where a
kernel that makes subnormal intermediates slows down severalfold on many x86 cores.

Writes ``benchmarks/results/bench_loss_<device>.csv`` and ``.json`` and a plot ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import ROOT, PeakMemory, environment, pyplot, time_fn, write_results

import rkd_engine
from rkd_engine import distill_loss, reference
from rkd_engine.ops import cpp_backend

CPU_SHAPES = [(4096, 10), (4096, 100), (4096, 1000), (1024, 32000), (256, 131072)]
CUDA_SHAPES = [(8192, 1000), (8192, 32000), (8192, 131072)]
GAMMA = 2.0


# ----------------------------------------------------------------------------------------------- timing
def time_interleaved(
    methods: dict[str, Callable[[], None]], device: str, *, min_reps: int = 15, min_seconds: float = 3.0
) -> dict[str, list[float]]:
    """Per-call times in milliseconds of every method, measured in rounds (one call of each method per
    round, in turn) so that a shared machine's load changes hit every method alike; GPU: ``time_fn``.

    Each round runs the methods in a new random order (seeded), so every method follows every other about
    equally often: a call leaves the caches and the allocator in its method's state (a compiled graph's
    temporaries, say), and a fixed order, or a rotation of one, would charge that to whichever method
    comes after it most.
    """
    if device == "cuda":
        return {name: time_fn(fn, device) for name, fn in methods.items()}
    for fn in methods.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = random.Random(0)
    start = time.perf_counter()
    rounds = 0
    while rounds < min_reps or time.perf_counter() - start < min_seconds * len(methods):
        names = list(methods)
        order.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            methods[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if rounds >= 2000:
            break
    return times


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device copy, counting bytes read and written."""
    n = 64 * 2**20 if device == "cpu" else 512 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), device, min_reps=20)
    return 2 * n / (statistics.median(times) * 1e-3)


# ------------------------------------------------------------------------------------------- methods
def make_case(rows: int, m: int, dtype: torch.dtype, device: str, seed: int = 0, logit_scale: float = 1.0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    f = (torch.randn(rows, m, generator=gen) * (2 * logit_scale)).to(device=device, dtype=dtype).requires_grad_()
    g = (torch.randn(rows, m, generator=gen) * (3 * logit_scale)).to(device=device, dtype=dtype)
    lam = torch.softmax(torch.randn(m, generator=gen), 0)
    pi_t = torch.softmax(torch.randn(m, generator=gen), 0)
    costs = (lam / pi_t).to(device)
    return f, g, costs


def reference_step(f, g, costs):
    """The eager PyTorch reference: ``reference.loss_rows`` and autograd."""
    a = torch.ones(f.shape[0], dtype=f.dtype, device=f.device)
    return reference.loss_rows(f, teacher=g, a=a, gamma=GAMMA, log_c=costs.log()).mean()


def methods_for(device: str, f, g, costs) -> dict[str, Callable[[], None]]:
    """name -> a closure doing one forward+backward into ``f.grad``."""

    def run(loss_fn):
        def step():
            f.grad = None
            loss_fn().backward()

        return step

    out: dict[str, Callable[[], None]] = {"eager": run(lambda: reference_step(f, g, costs))}
    compiled = torch.compile(reference_step)
    out["compile"] = run(lambda: compiled(f, g, costs))
    if device == "cuda":
        autotuned = torch.compile(reference_step, mode="max-autotune")
        out["compile-max-autotune"] = run(lambda: autotuned(f, g, costs))
    m = f.shape[1]
    for name in rkd_engine.available_backends(device, f.dtype, m):
        if name == "reference":
            continue
        # What a user gets with the documented defaults (validate=True: the in-kernel status is read) ...
        out[f"rkd-{name}-default"] = run(
            lambda b=name: distill_loss(f, teacher_logits=g, temperature=GAMMA, class_costs=costs, backend=b).loss
        )
        # ... and with the checks off (validate=False): nothing is read after the kernel.
        out[f"rkd-{name}"] = run(
            lambda b=name: (
                distill_loss(f, teacher_logits=g, temperature=GAMMA, class_costs=costs, backend=b, validate=False).loss
            )
        )
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError:
        LigerKLDIVLoss = None
    if LigerKLDIVLoss is not None and device == "cuda":
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        log_c = costs.log()

        def liger_loss():
            # Same gradient in f: KL(p || s) differs from the soft cross-entropy by H(p), constant in f.
            log_s = torch.log_softmax(f.float() - log_c, dim=-1).to(f.dtype)
            with torch.no_grad():
                log_p = torch.log_softmax(g.float() / GAMMA, dim=-1).to(f.dtype)
            return kl(log_s, log_p)

        out["liger-kldiv"] = run(liger_loss)
    return out


def check_agreement(methods: dict[str, Callable[[], None]], f) -> dict[str, float]:
    """Max |grad - eager grad| per method, so a fast wrong kernel cannot hide in the table."""
    methods["eager"]()
    want = f.grad.float().clone()
    errors = {}
    for name, fn in methods.items():
        fn()
        errors[name] = float((f.grad.float() - want).abs().max())
    return errors


# ------------------------------------------------------------------------------------------------ main
def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", type=parse_shapes, default=None, help="comma-separated BxM, e.g. 4096x1000")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--methods", default=None, help="comma-separated subset, e.g. eager,rkd-cpp")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--logit-scale", type=float, default=1.0, help="multiply both models' logits (20: peaked rows)")
    parser.add_argument("--peak-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_child:
        return _peak_child(args)

    device = args.device
    shapes = args.shapes or (CUDA_SHAPES if device == "cuda" else CPU_SHAPES)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    env = environment(device)
    bandwidth = copy_bandwidth(device)
    print(f"# {env['device_name']} | torch {env['torch']} | triton {env['triton']} | copy {bandwidth / 1e9:.1f} GB/s")
    rows_out = []
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_loss_{device}{'_' + args.tag if args.tag else ''}"
    for rows, m in shapes:
        for dtype in dtypes:
            f, g, costs = make_case(rows, m, dtype, device, logit_scale=args.logit_scale)
            methods = methods_for(device, f, g, costs)
            if args.methods:
                keep = set(args.methods.split(",")) | {"eager"}
                methods = {k: v for k, v in methods.items() if k in keep}
            errors = check_agreement(methods, f)
            peaks = cpu_peaks(rows, m, dtype, list(methods), args.logit_scale) if device == "cpu" else {}
            results = {}
            all_times = time_interleaved(methods, device)
            for name, fn in methods.items():
                times = all_times[name]
                if device == "cpu":
                    results[name] = (times, peaks.get(name))
                    continue
                with PeakMemory(device) as mem:
                    fn()
                results[name] = (times, mem.peak_bytes)
            eager_ms = statistics.median(results["eager"][0])
            compile_ms = statistics.median(results["compile"][0]) if "compile" in results else float("nan")
            floor_bytes = 3 * rows * m * f.element_size()
            for name, (times, peak) in results.items():
                med = statistics.median(times)
                q = statistics.quantiles(times, n=10) if len(times) >= 2 else [med] * 9
                row = {
                    **env,
                    "device": device,
                    "rows": rows,
                    "m": m,
                    "dtype": str(dtype).replace("torch.", ""),
                    "logit_scale": args.logit_scale,
                    "method": name,
                    "median_ms": round(med, 4),
                    "p10_ms": round(q[0], 4),
                    "p90_ms": round(q[-1], 4),
                    "reps": len(times),
                    "speedup_vs_eager": round(eager_ms / med, 3),
                    "speedup_vs_compile": round(compile_ms / med, 3),
                    "copy_GBps": round(bandwidth / 1e9, 2),
                    "GBps_3pass": round(floor_bytes / (med * 1e-3) / 1e9, 2),
                    "frac_copy_3pass": round(floor_bytes / (med * 1e-3) / bandwidth, 3),
                    "frac_copy_5pass": round(floor_bytes * 5 / 3 / (med * 1e-3) / bandwidth, 3),
                    "x_memory_floor": round(med * 1e-3 / (floor_bytes / bandwidth), 3),
                    "peak_MB": None if peak is None else round(peak / 2**20, 1),
                    "max_grad_err_vs_eager": errors[name],
                }
                rows_out.append(row)
                print(
                    f"{rows:>6}x{m:<7} {row['dtype']:<8} {name:<22} {med:9.3f} ms  [{q[0]:.3f}, {q[-1]:.3f}]"
                    f"  x{row['speedup_vs_eager']:<7} vs eager  x{row['speedup_vs_compile']:<7} vs compile"
                    f"  {row['frac_copy_3pass']:.2f} of copy (3-pass)  {row['x_memory_floor']:.2f}x floor"
                    f"  peak {row['peak_MB']} MB  err {errors[name]:.2e}",
                    flush=True,
                )
            del f, g, costs, methods
            write_results(
                rows_out, {"environment": env, "copy_GBps": bandwidth / 1e9}, stem
            )  # after every case: a cut-off run keeps what it measured
    plot(rows_out, f"{stem}.png")
    print(f"wrote {stem}.csv, .json, .png")
    return 0


def cpu_peaks(rows: int, m: int, dtype: torch.dtype, names: list[str], logit_scale: float) -> dict[str, int | None]:
    """Peak resident memory of one call of each method, measured in a child process that returns large
    buffers to the system when they are freed (see ``_common.PeakMemory``)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, __file__, "--peak-child", "--device", "cpu", "--shapes", f"{rows}x{m}"]
    cmd += ["--dtypes", str(dtype).replace("torch.", ""), "--methods", ",".join(names)]
    cmd += ["--logit-scale", str(logit_scale)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"peak memory child failed: {proc.stderr[-500:]}", file=sys.stderr)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_child(args) -> int:
    (rows, m), dtype = args.shapes[0], getattr(torch, args.dtypes)
    f, g, costs = make_case(rows, m, dtype, "cpu", logit_scale=args.logit_scale)
    methods = methods_for("cpu", f, g, costs)
    peaks = {}
    for name in args.methods.split(","):
        methods[name]()  # warm-up (compilation, first-touch of the inputs)
        f.grad = None
        # The C++ backend keeps the memory of its last large gradient for the next call (docs/performance.md,
        # "Gradient memory"): dropped here, so that the figure includes the gradient a call needs.
        cpp_backend.release_buffers()
        with PeakMemory("cpu") as mem:
            methods[name]()
        peaks[name] = mem.peak_bytes
    print(json.dumps(peaks))
    return 0


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        sub = [r for r in rows if r["dtype"] == dtype]
        shapes = sorted({(r["rows"], r["m"]) for r in sub}, key=lambda s: s[0] * s[1])
        methods = list(dict.fromkeys(r["method"] for r in sub))
        width = 0.8 / len(methods)
        for k, method in enumerate(methods):
            vals = [
                next((r["speedup_vs_eager"] for r in sub if (r["rows"], r["m"]) == s and r["method"] == method), 0)
                for s in shapes
            ]
            ax.bar([i + k * width for i in range(len(shapes))], vals, width, label=method)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], [f"{b}x{m}" for b, m in shapes], rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("speed-up over eager (fwd+bwd)")
        ax.set_title(f"{rows[0]['device_name']} {dtype}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
