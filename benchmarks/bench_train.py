"""A whole student training step with the fused loss against the same step with the eager reference loss.

One step (the paper's robust student, docs/loss.md and docs/dro.md): the teacher's logits ``g`` for the batch
are a fixed tensor computed beforehand (what the step gets from the teacher's forward), then the student's
forward ``f = model(x)``, the robust distillation loss (``q = p = softmax(g / gamma)``, ``gamma = 2``, class
costs ``c = lambda / pi_t`` from ``RobustDistillationLoss(objective="robust")``, mean over rows), backward,
and an SGD step with momentum 0.9 and weight decay. Methods, each with its own copy of the same model and
the same batch:

- ``fused``: ``RobustDistillationLoss`` -> ``distill_loss(..., backend="auto")`` (the C++ kernel on CPU);
- ``reference``: the same loss in eager PyTorch autograd (``reference.loss_rows``, as ``bench_loss.py``);
- ``compile`` (opt-in, ``--methods``): the reference loss under ``torch.compile``.

Before timing, the gradient of every student parameter after one step's backward is compared with the
reference's (``max_grad_err_vs_reference``, absolute; ``max_grad_rel_vs_reference``, over the largest
gradient entry), so a fast wrong loss cannot hide in the table.

Timing. CPU: everything below (the methods' steps, the trivial-loss step, the losses alone and the DRO
parts) runs interleaved, round by round (the order reversed every other round), after a warm-up, so drift in
the load of a shared machine hits all of them alike. ``speedup_vs_reference`` is the ratio of median step
times; ``speedup_paired_median``, ``speedup_p10`` and ``speedup_p90`` are the median and quantiles of the
per-round ratio reference step / fused step (paired, so less moved by drift in the load). GPU:
``triton.testing.do_bench`` per function (``_common.time_fn``). Step times are medians with 10th and
90th percentiles.

Threads. By default on CPU every configuration runs twice: at torch's default thread count (all cores) and
at one thread (``--threads 0,1``; a ``threads`` column tells them apart). On a virtual machine whose cores
are shared, a parallel region can wait for a descheduled core for whole scheduler ticks (4 ms at 250 Hz):
then small steps take multiples of 4 ms at two threads and far less at one, and the one-thread rows are
the ones that measure the code rather than the host.

Share of the step spent in the loss, measured two ways (both in the CSV):

- ``loss_ms`` / ``loss_share``: the loss's forward+backward timed in isolation on logits of the step's
  shape (a leaf tensor, as ``bench_loss.py``), divided by the method's median step time;
- ``nonloss_step_ms`` / ``loss_share_by_subtraction``: the same step with a trivial loss (0, with a dense
  zero gradient into ``f``: the same forward, backward and optimizer work, no loss cost), timed in the same
  rounds; ``(step - trivial step) / step``. Noisier: it is a difference of two step times.

DRO weight update (docs/dro.md, every ``K = 32`` steps): ``dro_update_ms`` is one
``RobustDistillationLoss.update_weights(error, mass)`` call (``ClassDRO.update``); the validation pass it
needs is the student's forward on ``val_rows`` rows (``dro_val_forward_ms``) and the fused loss without
gradient on those logits for the per-class ``error`` and ``mass`` (``dro_val_stats_ms``).
``dro_update_per_step_ms = dro_update_ms / K`` and ``dro_total_per_step_ms`` (all three / K) are their cost
amortised over the steps, with their shares of the method's step time.

    python benchmarks/bench_train.py                              # default configurations, this device
    python benchmarks/bench_train.py --configs mlp-32k --threads 1 --methods fused,reference,compile

Writes ``benchmarks/results/bench_train_<device>[_<tag>].csv`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import ROOT, environment, sync, time_fn, write_results
from bench_loss import GAMMA, reference_step
from torch import nn

from rkd_engine import RobustDistillationLoss, distill_loss
from rkd_engine.models import build_model
from rkd_engine.ops import select_backend

K = 32  # steps between DRO updates (docs/dro.md, the reference code's value)
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4


@dataclasses.dataclass(frozen=True)
class Config:
    """A student and its batch: ``build_model(model, input_shape, m, **options)`` on ``batch`` rows."""

    model: str
    input_shape: tuple[int, ...]
    m: int
    batch: int
    val_rows: int = 4096
    options: dict = dataclasses.field(default_factory=dict)
    note: str = ""


CONFIGS: dict[str, Config] = {
    # The demo's student on long-tailed digits (8x8 images, 10 classes): MLP 64-128-10, batch 64.
    "mlp-digits": Config("mlp", (64,), 10, 64, options={"hidden_sizes": (128,)}, note="demo student, digits"),
    # Wider outputs, where the loss is a real part of the step.
    "mlp-1k": Config("mlp", (256,), 1000, 1024, options={"hidden_sizes": (512, 512)}, note="MLP, 1000 classes"),
    "mlp-32k": Config(
        "mlp", (128,), 32000, 256, val_rows=1024, options={"hidden_sizes": (256,)}, note="MLP, 32000-way head"
    ),
    # The paper's CIFAR compression student size class (ResNet-20 here, for CPU time), CIFAR-100.
    "resnet20-c100": Config("resnet20", (3, 32, 32), 100, 128, val_rows=512, note="CIFAR ResNet-20, CIFAR-100"),
    # Not in the default set.
    "resnet32-c100": Config("resnet32", (3, 32, 32), 100, 128, val_rows=512, note="CIFAR ResNet-32, CIFAR-100"),
    "tiny": Config("mlp", (8,), 5, 16, val_rows=32, options={"hidden_sizes": (16,)}, note="smoke test"),
}
DEFAULT_CONFIGS = ["mlp-digits", "mlp-1k", "mlp-32k", "resnet20-c100"]
METHODS = ("fused", "reference", "compile")


# ------------------------------------------------------------------------------------------------ case
def make_case(cfg: Config, device: str, seed: int = 0):
    """The student, its batch ``x``, the teacher's logits ``g`` for it and the robust loss module."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.input_shape, cfg.m, **cfg.options).to(device)
    x = torch.randn(cfg.batch, *cfg.input_shape, generator=gen).to(device)
    g = (torch.randn(cfg.batch, cfg.m, generator=gen) * 3).to(device)
    x_val = torch.randn(cfg.val_rows, *cfg.input_shape, generator=gen).to(device)
    g_val = (torch.randn(cfg.val_rows, cfg.m, generator=gen) * 3).to(device)
    pi_t = torch.softmax(torch.randn(cfg.m, generator=gen), 0)  # the teacher marginal
    crit = RobustDistillationLoss(cfg.m, "robust", temperature=GAMMA, prior=pi_t, backend="auto").to(device)
    # A lambda away from uniform, as after some DRO updates.
    crit.dro.weights.copy_(torch.softmax(torch.randn(cfg.m, generator=gen), 0).to(device))
    return model, x, g, x_val, g_val, crit


def loss_fns(methods: list[str], crit: RobustDistillationLoss) -> dict[str, Callable]:
    """name -> ``loss(f, g)``: a scalar to call ``backward`` on. Costs are read from ``crit`` every call."""
    out: dict[str, Callable] = {}
    if "fused" in methods:
        out["fused"] = lambda f, g: crit(f, teacher_logits=g).loss
    if "reference" in methods:
        out["reference"] = lambda f, g: reference_step(f, g, crit.costs)
    if "compile" in methods:
        compiled = torch.compile(reference_step)
        out["compile"] = lambda f, g: compiled(f, g, crit.costs)
    return out


def make_step(model: nn.Module, x, g, loss_fn) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), g).backward()
        opt.step()

    return step, opt


class _ZeroLoss(torch.autograd.Function):
    """Loss 0 whose backward writes a contiguous zero gradient into ``f`` (the least any loss must write)."""

    @staticmethod
    def forward(ctx, f):
        ctx.shape, ctx.dtype, ctx.device = f.shape, f.dtype, f.device
        return f.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)


def trivial_loss(f, g):
    """The step without the loss's cost: loss 0, gradient a contiguous zero (B, m) tensor. (``0 * f.sum()``
    would hand the student's backward a stride-0 gradient, which the linear layer's backward handles more
    slowly than a dense one.)"""
    return _ZeroLoss.apply(f)


def check_agreement(model: nn.Module, x, g, fns: dict[str, Callable]) -> dict[str, tuple[float, float]]:
    """Max |grad - reference grad| over every parameter of the student after one backward, absolute and
    relative to the largest reference gradient entry."""
    grads = {}
    for name, fn in fns.items():
        model.zero_grad(set_to_none=True)
        fn(model(x), g).backward()
        grads[name] = [p.grad.detach().float().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    want = grads["reference"]
    scale = max(float(w.abs().max()) for w in want)
    out = {}
    for name, got in grads.items():
        err = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
        out[name] = (err, err / scale if scale > 0 else err)
    return out


# ------------------------------------------------------------------------------------------------ timing
def time_interleaved(
    fns: dict[str, Callable[[], None]], device: str, *, min_reps: int, min_seconds: float, warmup: int = 2
) -> dict[str, list[float]]:
    """Per-call times in ms of each function. CPU: after a warm-up, round-robin rounds (the order reversed
    every other round) until ``min_reps`` rounds and ``min_seconds`` in all have passed (or, on a slow host,
    3 rounds and ``4 x min_seconds``), so every function is timed under the same load. GPU: ``_common.time_fn`` (``triton.testing.do_bench``) per function."""
    if device == "cuda":
        return {name: time_fn(fn, device) for name, fn in fns.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_reps or time.perf_counter() - start < min_seconds:
        if rounds >= 3 and time.perf_counter() - start > 4 * min_seconds:
            break  # a slow host: at least 3 rounds, at most about 4 x min_seconds
        for name in names if rounds % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if rounds >= 1000:
            break
    return times


def quantiles(times: list[float]) -> tuple[float, float, float]:
    med = statistics.median(times)
    if len(times) < 2:
        return med, med, med
    q = statistics.quantiles(times, n=10, method="inclusive")
    return med, q[0], q[-1]


def loss_alone(loss_fn: Callable, f_shape, g, device: str) -> Callable[[], None]:
    """Forward+backward of the loss alone on a leaf tensor of the step's logits shape."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    f = (torch.randn(*f_shape, generator=gen) * 2).to(device).requires_grad_()

    def run() -> None:
        f.grad = None
        loss_fn(f, g).backward()

    return run


def dro_parts(model, crit, x_val, g_val) -> dict[str, Callable[[], None]]:
    """The DRO update every K steps: validation forward, fused statistics on its logits, ``update_weights``."""
    with torch.no_grad():
        f_val = model(x_val)
        stats = distill_loss(f_val, teacher_logits=g_val, temperature=GAMMA, validate=False)
    # Equal per-class risks (error = mass / 2) keep lambda where it is under repeated calls (every class is
    # scaled by the same factor, then renormalised), so a long timing loop does not drive lambda into
    # denormals; the update does the same arithmetic as with any other risks.
    error, mass = stats.mass * 0.5, stats.mass.clone()

    def forward():
        with torch.no_grad():
            model(x_val)

    def val_stats():
        with torch.no_grad():
            distill_loss(f_val, teacher_logits=g_val, temperature=GAMMA, validate=False)

    return {
        "dro:update": lambda: crit.update_weights(error, mass),
        "dro:val_forward": forward,
        "dro:val_stats": val_stats,
    }


# ------------------------------------------------------------------------------------------------ main
def run_config(name: str, cfg: Config, device: str, methods: list[str], args) -> list[dict]:
    load_before = os.getloadavg()[0]
    model, x, g, x_val, g_val, crit = make_case(cfg, device)
    fns = loss_fns(methods, crit)
    errors = check_agreement(model, x, g, fns)
    timed: dict[str, Callable[[], None]] = {}
    for method, loss_fn in fns.items():
        timed[method], _ = make_step(copy.deepcopy(model), x, g, loss_fn)
    timed["trivial"], _ = make_step(copy.deepcopy(model), x, g, trivial_loss)
    for method, loss_fn in fns.items():
        timed[f"loss:{method}"] = loss_alone(loss_fn, (cfg.batch, cfg.m), g, device)
    timed.update(dro_parts(model, crit, x_val, g_val))
    times = time_interleaved(timed, device, min_reps=args.steps, min_seconds=args.seconds)
    dro = {key: statistics.median(times[f"dro:{key}"]) for key in ("update", "val_forward", "val_stats")}
    triv_ms = statistics.median(times["trivial"])
    ref_ms = statistics.median(times["reference"])
    paired = (
        [r / f for r, f in zip(times["reference"], times["fused"], strict=False)]
        if device == "cpu" and "fused" in times
        else []
    )
    sp_med, sp_p10, sp_p90 = quantiles(paired) if paired else (float("nan"),) * 3
    n_params = sum(p.numel() for p in model.parameters())
    load = f"{load_before:.2f}/{os.getloadavg()[0]:.2f}"  # 1-minute load average before / after (shared host)
    rows = []
    for method in fns:
        med, p10, p90 = quantiles(times[method])
        loss_ms = statistics.median(times[f"loss:{method}"])
        dro_total = dro["update"] + dro["val_forward"] + dro["val_stats"]
        row = {
            **args.env,
            "device": device,
            "config": name,
            "model": cfg.model,
            "params": n_params,
            "batch": cfg.batch,
            "m": cfg.m,
            "method": method,
            "loss_backend": select_backend("auto", torch.device(device), torch.float32, cfg.m)
            if method == "fused"
            else ("torch.compile" if method == "compile" else "eager"),
            "step_median_ms": round(med, 3),
            "step_p10_ms": round(p10, 3),
            "step_p90_ms": round(p90, 3),
            "reps": len(times[method]),
            "steps_per_s": round(1e3 / med, 2),
            "speedup_vs_reference": round(ref_ms / med, 3),
            "speedup_paired_median": round(sp_med, 3) if method == "fused" else "",
            "speedup_p10": round(sp_p10, 3) if method == "fused" else "",
            "speedup_p90": round(sp_p90, 3) if method == "fused" else "",
            "loss_ms": round(loss_ms, 3),
            "loss_share": round(loss_ms / med, 3),
            "nonloss_step_ms": round(triv_ms, 3),
            "loss_share_by_subtraction": round((med - triv_ms) / med, 3),
            "dro_K": K,
            "val_rows": cfg.val_rows,
            "dro_update_ms": round(dro["update"], 4),
            "dro_val_forward_ms": round(dro["val_forward"], 3),
            "dro_val_stats_ms": round(dro["val_stats"], 3),
            "dro_update_per_step_ms": round(dro["update"] / K, 5),
            "dro_update_share": round(dro["update"] / K / med, 5),
            "dro_total_per_step_ms": round(dro_total / K, 4),
            "dro_total_share": round(dro_total / K / med, 4),
            "max_grad_err_vs_reference": errors[method][0],
            "max_grad_rel_vs_reference": errors[method][1],
            "load_avg_1m_before_after": load,
        }
        rows.append(row)
        print(
            f"{name:<14} {method:<10} {med:9.2f} ms/step [{p10:.2f}, {p90:.2f}] n={len(times[method]):<4}"
            f" {row['steps_per_s']:8.2f} steps/s  x{row['speedup_vs_reference']:<6}"
            + (f"(paired {sp_med:.2f}, p10-p90 {sp_p10:.2f}-{sp_p90:.2f}) " if method == "fused" and paired else "")
            + f" loss {loss_ms:.2f} ms = {row['loss_share']:.1%} of step"
            f" (by subtraction {row['loss_share_by_subtraction']:.1%}, trivial-loss step {triv_ms:.2f} ms)"
            f"  DRO update {dro['update'] * 1e3:.0f} us/call = {row['dro_update_share']:.3%}/step at K={K}"
            f" (+val {dro_total / K:.2f} ms/step)  grad err {errors[method][0]:.1e}  load {load}",
            flush=True,
        )
    return rows


def _extension_built() -> str:
    """When the loaded C++ extension was built (its file's modification time, UTC): the kernel timed."""
    try:
        import rkd_engine._C as ext

        mtime = os.path.getmtime(ext.__file__)
    except (ImportError, OSError, TypeError):
        return "absent"
    return _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).isoformat(timespec="seconds")


def run_meta(env: dict, configs: dict) -> dict:
    """What the JSON file says besides the rows: the environment, the step and the configurations."""
    return {
        "environment": env,
        "step": {
            "gamma": GAMMA,
            "objective": "robust",
            "optimizer": f"SGD lr={LR} momentum={MOMENTUM} weight_decay={WEIGHT_DECAY}",
            "dro_K": K,
            "loss_share": "loss forward+backward timed alone on logits of the step's shape / step time",
            "loss_share_by_subtraction": "(step - same step with a zero loss and a dense zero gradient) / step",
        },
        "configs": {k: dataclasses.asdict(v) for k, v in configs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated, from {', '.join(CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument("--methods", default="fused,reference", help="comma-separated from fused,reference,compile")
    parser.add_argument("--steps", type=int, default=10, help="minimum timed rounds (steps per method), CPU")
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum timing seconds per configuration, CPU")
    parser.add_argument(
        "--threads",
        default=None,
        help="comma-separated torch.set_num_threads values to run, 0 = torch's default (all cores); default on "
        "CPU: 0,1 (all cores, then one thread) where the default is more than one thread, else 0",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    args = parser.parse_args(argv)

    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    methods = [m for m in args.methods.split(",") if m]
    if not set(methods) <= set(METHODS) or "reference" not in methods:
        parser.error(f"--methods must be a subset of {METHODS} including reference")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    default_threads = torch.get_num_threads()
    if args.threads is None:
        args.threads = "0,1" if device == "cpu" and default_threads > 1 else "0"
    thread_counts = [int(t) or default_threads for t in args.threads.split(",") if t]
    env = environment(device)
    env["default_threads"] = str(default_threads)
    env["extension_built"] = _extension_built()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_train_{device}{'_' + args.tag if args.tag else ''}"
    rows: list[dict] = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        args.env = {**env, "threads": str(torch.get_num_threads())}
        print(f"# {env['device_name']} | torch {env['torch']} | {args.env['threads']} threads", flush=True)
        for name in names:
            rows += run_config(name, CONFIGS[name], device, methods, args)
            sync(device)
            write_results(rows, run_meta(env, {n: CONFIGS[n] for n in names}), stem)  # a cut-off run keeps what it has
    torch.set_num_threads(default_threads)
    print(f"wrote {stem}.csv, .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
