"""Wide heads (docs/wide_heads.md): the output layer fused with the loss, and top-k teachers.

Two families of cases, forward+backward, every method computing the same gradients:

* ``layer``: ``(rows, hidden, m)``, the student's output layer ``f = X W^T + b`` and the loss, into the
  gradients of ``X``, ``W`` and ``b``. Methods: ``eager`` (``nn.Linear`` + ``reference.loss_rows`` +
  autograd), ``compile`` (``torch.compile`` of it), ``rkd-dense`` (``nn.Linear`` then ``distill_loss``) and
  ``rkd-fused`` (``fused_linear_distill_loss``: chunks of rows, no (B, m) matrix). Teachers: dense logits
  (``logits``), a teacher head on its own features (``head``, ``H_t = H``), or top-k probabilities
  (``topk16``, ``topk128``; the eager methods use the dense target ``reference.topk_target``).
* ``loss``: ``(rows, m)``, the loss alone into the student scores: a dense teacher (``dense-logits``,
  ``dense-probs``) against the top-k teacher (``topk16``, ``topk128``) for ``eager``, ``compile``, ``rkd``
  (on CPU the sparse top-k kernel, which reads k entries a row) and, for top-k, ``rkd-expand`` (the dense
  expansion: a dense target per chunk of rows, then the dense kernel; backends without a sparse kernel).

Time is the median of interleaved rounds (every method once per round, so load on a shared machine hits
all alike); the load average is recorded. Peak memory is measured as ``bench_loss.py`` does (resident
set above the start of one call, in a child process that returns freed buffers to the system). Teacher
bytes per row: ``m x 4`` for dense fp32, ``k x (4 + 4)`` for top-k with int32 indices and fp32 probabilities
(what a teacher cache stores; int64 indices cost ``k x 12``), ``H_t x 4`` for a teacher head's features.
The robust student of ``bench_loss.py``: temperature 2 on logits, class costs ``c = lambda / pi_t``, mean.

    python benchmarks/bench_wide.py                      # the issue's CPU cases (long on 2 cores)
    python benchmarks/bench_wide.py --layer 4096x1024x32000 --teachers head --loss none

Writes ``benchmarks/results/bench_wide_<device>.csv``, ``.json`` and ``.png``. On CUDA (GPU issue) the same
cases run with ``triton.testing.do_bench``; Liger-Kernel's ``LigerFusedLinearJSDLoss`` (beta 0) is added
when installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import ROOT, PeakMemory, environment, load_average, pyplot, sync, write_results

from rkd_engine import distill_loss, reference, wide
from rkd_engine.wide import fused_linear_distill_loss

GAMMA = 2.0
LAYER_SHAPES = [(4096, 1024, 32000), (1024, 512, 131072)]
LOSS_SHAPES = [(4096, 32000)]
LAYER_TEACHERS = ["logits", "head", "topk16", "topk128"]
LOSS_TEACHERS = ["dense-logits", "dense-probs", "topk16", "topk128"]


# ------------------------------------------------------------------------------------------ cases
def _teacher_topk(rows: int, m: int, k: int, gen: torch.Generator, device: str):
    """Top-k of a tempered teacher softmax, as a cache stores them: int32 indices, fp32 probabilities."""
    out_i, out_p = [], []
    for start in range(0, rows, 512):  # not the whole (B, m) teacher at once
        g = torch.randn(min(512, rows - start), m, generator=gen) * 3
        p, i = torch.softmax(g / GAMMA, -1).topk(k, -1)
        out_i.append(i.to(torch.int32))
        out_p.append(p)
    return torch.cat(out_i).to(device), torch.cat(out_p).to(device)


def _costs(m: int, gen: torch.Generator, device: str) -> torch.Tensor:
    lam = torch.softmax(torch.randn(m, generator=gen), 0)
    pi_t = torch.softmax(torch.randn(m, generator=gen), 0)
    return (lam / pi_t).to(device)


def layer_case(rows: int, hidden: int, m: int, teacher: str, dtype: torch.dtype, device: str):
    """Parameters, inputs and the closures of every method for one layer case."""
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden, m, device=device, dtype=dtype)
    x = (torch.randn(rows, hidden, generator=gen) * 2).to(device, dtype).requires_grad_()
    costs = _costs(m, gen, device)
    log_c = costs.log()
    state: dict = {}
    if teacher == "logits":
        state["g"] = (torch.randn(rows, m, generator=gen) * 3).to(device, dtype)
        teacher_bytes = m * 4
    elif teacher == "head":
        state["thead"] = torch.nn.Linear(hidden, m, device=device, dtype=dtype).requires_grad_(False)
        state["xt"] = torch.randn(rows, hidden, generator=gen).to(device, dtype)
        teacher_bytes = hidden * 4
    else:
        k = int(teacher.removeprefix("topk"))
        state["topk"] = _teacher_topk(rows, m, k, gen, device)
        teacher_bytes = k * 8
    a = torch.ones(rows, dtype=dtype, device=device)

    def eager_loss():
        f = head(x)
        if teacher == "logits":
            return reference.loss_rows(f, teacher=state["g"], a=a, gamma=GAMMA, log_c=log_c).mean()
        if teacher == "head":
            with torch.no_grad():
                g = state["thead"](state["xt"])
            return reference.loss_rows(f, teacher=g, a=a, gamma=GAMMA, log_c=log_c).mean()
        idx, p = state["topk"]
        target = reference.topk_target(idx, p, m, "renormalize")
        return reference.loss_rows(f, teacher=target, teacher_is_probs=True, a=a, log_c=log_c).mean()

    def dense_loss():
        f = head(x)
        if teacher == "logits":
            out = distill_loss(f, teacher_logits=state["g"], temperature=GAMMA, class_costs=costs, validate=False)
        elif teacher == "head":
            with torch.no_grad():
                g = state["thead"](state["xt"])
            out = distill_loss(f, teacher_logits=g, temperature=GAMMA, class_costs=costs, validate=False)
        else:
            out = distill_loss(f, teacher_topk=state["topk"], class_costs=costs, validate=False)
        return out.loss

    def fused_loss():
        kw: dict = dict(class_costs=costs, validate=False)
        if teacher == "logits":
            kw.update(teacher_logits=state["g"], temperature=GAMMA)
        elif teacher == "head":
            t = state["thead"]
            kw.update(teacher_input=state["xt"], teacher_head_weight=t.weight, teacher_head_bias=t.bias)
            kw.update(temperature=GAMMA)
        else:
            kw.update(teacher_topk=state["topk"])
        return fused_linear_distill_loss(x, head.weight, head.bias, **kw).loss

    compiled = torch.compile(eager_loss)

    def run(loss_fn):
        def step():
            x.grad = None
            head.zero_grad(set_to_none=True)
            loss_fn().backward()

        return step

    methods = {
        "eager": run(eager_loss),
        "compile": run(compiled),
        "rkd-dense": run(dense_loss),
        "rkd-fused": run(fused_loss),
    }
    liger = _liger_fused_jsd() if device == "cuda" and teacher == "head" else None
    if liger is not None:
        labels = torch.zeros(rows, dtype=torch.long, device=device)

        def liger_loss():
            # beta = 0, hard weight 0, soft weight 1: forward KL(p || s), whose gradient in the student is the
            # soft cross-entropy's (equal work but for the class costs, which Liger does not take)
            t = state["thead"]
            return liger(x, head.weight, state["xt"], t.weight, labels, head.bias, t.bias)

        methods["liger-fused-jsd"] = run(liger_loss)
    return methods, (x, head), teacher_bytes


def _liger_fused_jsd():
    """Liger-Kernel's chunked fused-linear JSD at beta = 0 (GPU runs only), or ``None`` when not installed."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=GAMMA)


def loss_case(rows: int, m: int, teacher: str, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(0)
    f = (torch.randn(rows, m, generator=gen) * 2).to(device, dtype).requires_grad_()
    costs = _costs(m, gen, device)
    log_c = costs.log()
    a = torch.ones(rows, dtype=dtype, device=device)
    state: dict = {}
    if teacher == "dense-logits":
        state["g"] = (torch.randn(rows, m, generator=gen) * 3).to(device, dtype)
        teacher_bytes = m * 4
    elif teacher == "dense-probs":
        state["p"] = torch.softmax(torch.randn(rows, m, generator=gen) * 3 / GAMMA, -1).to(device, dtype)
        teacher_bytes = m * 4
    else:
        k = int(teacher.removeprefix("topk"))
        state["topk"] = _teacher_topk(rows, m, k, gen, device)
        teacher_bytes = k * 8

    def eager_loss():
        if teacher == "dense-logits":
            return reference.loss_rows(f, teacher=state["g"], a=a, gamma=GAMMA, log_c=log_c).mean()
        if teacher == "dense-probs":
            return reference.loss_rows(f, teacher=state["p"], teacher_is_probs=True, a=a, log_c=log_c).mean()
        idx, p = state["topk"]
        target = reference.topk_target(idx, p, m, "renormalize")
        return reference.loss_rows(f, teacher=target, teacher_is_probs=True, a=a, log_c=log_c).mean()

    def rkd_loss():
        kw: dict = dict(class_costs=costs, validate=False)
        if teacher == "dense-logits":
            kw.update(teacher_logits=state["g"], temperature=GAMMA)
        elif teacher == "dense-probs":
            kw.update(teacher_probs=state["p"])
        else:
            kw.update(teacher_topk=state["topk"])
        return distill_loss(f, **kw).loss

    compiled = torch.compile(eager_loss)

    def run(loss_fn):
        def step():
            f.grad = None
            loss_fn().backward()

        return step

    methods = {"eager": run(eager_loss), "compile": run(compiled), "rkd": run(rkd_loss)}
    if "topk" in state:

        def expanded_loss():
            with _topk_expansion():
                return rkd_loss()

        methods["rkd-expand"] = run(expanded_loss)
    return methods, (f,), teacher_bytes


@contextlib.contextmanager
def _topk_expansion():
    """Run the top-k teacher through the dense expansion (a dense target per chunk of rows, then the dense
    kernel: the path of backends without a sparse top-k kernel, and of every backend before it), to compare."""
    saved = wide.has_sparse_topk
    wide.has_sparse_topk = lambda backend: False
    try:
        yield
    finally:
        wide.has_sparse_topk = saved


# ------------------------------------------------------------------------------------- measuring
def grads_of(params) -> list[torch.Tensor]:
    return [p.weight.grad if isinstance(p, torch.nn.Module) else p.grad for p in params]


def check_agreement(methods, params) -> dict[str, float]:
    """Max |grad - eager grad| over the differentiated tensors, per method."""
    methods["eager"]()
    want = [g.float().clone() for g in grads_of(params)]
    errors = {}
    for name, fn in methods.items():
        fn()
        errors[name] = max(float((g.float() - w).abs().max()) for g, w in zip(grads_of(params), want, strict=True))
    return errors


def interleaved(methods: dict[str, Callable[[], None]], device: str, rounds: int) -> dict[str, list[float]]:
    """Per-call milliseconds, every method once per round (``check_agreement`` was the warm-up call)."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def peaks_in_child(kind: str, shape: str, teacher: str, dtype: str, names: list[str]) -> dict[str, int | None]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, __file__, "--peak-child", kind, shape, teacher, dtype, ",".join(names)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"peak memory child failed: {proc.stderr[-800:]}", file=sys.stderr)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _build(kind: str, shape: tuple[int, ...], teacher: str, dtype: torch.dtype, device: str):
    if kind == "layer":
        return layer_case(*shape, teacher, dtype, device)
    return loss_case(*shape, teacher, dtype, device)


def _peak_child(kind: str, shape: str, teacher: str, dtype: str, names: str) -> int:
    dims = tuple(int(v) for v in shape.split("x"))
    methods, params, _ = _build(kind, dims, teacher, getattr(torch, dtype), "cpu")
    peaks = {}
    for name in names.split(","):
        if name == "compile":
            methods[name]()  # compilation; eager methods allocate afresh each call (freed buffers go back)
        with PeakMemory("cpu") as mem:
            methods[name]()
        peaks[name] = mem.peak_bytes
    print(json.dumps(peaks))
    return 0


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    if text.lower() == "none":
        return []
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--peak-child":
        return _peak_child(*sys.argv[2:7])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layer", type=parse_shapes, default=LAYER_SHAPES, help="RxHxM,... or none")
    parser.add_argument("--loss", type=parse_shapes, default=LOSS_SHAPES, help="RxM,... or none")
    parser.add_argument("--teachers", default=None, help="subset of " + ",".join(LAYER_TEACHERS + LOSS_TEACHERS))
    parser.add_argument("--methods", default=None, help="subset, e.g. eager,rkd-fused (eager is always run)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)
    env = environment(device)
    print(f"# {env['device_name']} | torch {env['torch']} | threads {env['threads']} | load {load_average():.1f}")
    stem = args.out / f"bench_wide_{device}{'_' + args.tag if args.tag else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = None if args.teachers is None else set(args.teachers.split(","))
    cases = [("layer", s, t) for s in args.layer for t in LAYER_TEACHERS]
    cases += [("loss", s, t) for s in args.loss for t in LOSS_TEACHERS]
    rows_out: list[dict] = []
    for kind, shape, teacher in cases:
        if wanted is not None and teacher not in wanted:
            continue
        methods, params, teacher_bytes = _build(kind, shape, teacher, dtype, device)
        if args.methods:
            keep = set(args.methods.split(",")) | {"eager"}
            methods = {k: v for k, v in methods.items() if k in keep}
        load_before = load_average()
        errors = check_agreement(methods, params)
        times = interleaved(methods, device, args.rounds)
        load_after = load_average()
        shape_text = "x".join(str(v) for v in shape)
        peaks: dict = {}
        if device == "cpu" and not args.no_peak:
            peaks = peaks_in_child(kind, shape_text, teacher, args.dtype, list(methods))
        elif device == "cuda":
            for name, fn in methods.items():
                with PeakMemory(device) as mem:
                    fn()
                peaks[name] = mem.peak_bytes
        eager_ms = statistics.median(times["eager"])
        compile_ms = statistics.median(times["compile"]) if "compile" in times else float("nan")
        eager_peak = peaks.get("eager")
        for name, ts in times.items():
            med = statistics.median(ts)
            peak = peaks.get(name)
            row = {
                **env,
                "device": device,
                "kind": kind,
                "shape": shape_text,
                "teacher": teacher,
                "dtype": args.dtype,
                "method": name,
                "median_ms": round(med, 2),
                "min_ms": round(min(ts), 2),
                "max_ms": round(max(ts), 2),
                "rounds": len(ts),
                "speedup_vs_eager": round(eager_ms / med, 3),
                "speedup_vs_compile": round(compile_ms / med, 3),
                "peak_MB": None if peak is None else round(peak / 2**20, 1),
                "peak_vs_eager": None if peak is None or not eager_peak else round(peak / eager_peak, 4),
                "teacher_bytes_per_row": teacher_bytes,
                "max_grad_err_vs_eager": errors[name],
                "load_avg_1m": f"{load_before:.1f}-{load_after:.1f}",
            }
            rows_out.append(row)
            print(
                f"{kind:<5} {shape_text:<17} {teacher:<12} {name:<10} {med:10.1f} ms [{min(ts):.0f}, {max(ts):.0f}]"
                f"  x{row['speedup_vs_eager']:<6} vs eager  peak {row['peak_MB']} MB ({row['peak_vs_eager']} of eager)"
                f"  teacher {teacher_bytes} B/row  err {errors[name]:.1e}  load {row['load_avg_1m']}",
                flush=True,
            )
        del methods, params
        write_results(rows_out, {"environment": env}, stem)
    if rows_out:
        plot(rows_out, f"{stem}.png")
        print(f"wrote {stem}.csv, .json, .png")
    return 0


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    cases = list(dict.fromkeys((r["kind"], r["shape"], r["teacher"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(methods)
    for ax, key, label in ((axes[0], "median_ms", "time per step (ms)"), (axes[1], "peak_MB", "peak memory (MB)")):
        for k, method in enumerate(methods):
            vals = [
                next(
                    (r[key] or 0 for r in rows if (r["kind"], r["shape"], r["teacher"]) == c and r["method"] == method),
                    0,
                )
                for c in cases
            ]
            ax.bar([i + k * width for i in range(len(cases))], vals, width, label=method)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], [f"{s}\n{t}" for _, s, t in cases], fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"{rows[0]['device_name']} {rows[0]['dtype']}: forward+backward, wide heads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
