"""Students from a teacher cache against students with their teacher online (``rkd cache-teacher``).

Four measurements, all on this machine's CPU, rows in one CSV/JSON:

1. ``step``: student training throughput (images/s), one training step = the teacher's scores for the
   batch, the student's forward, the distillation loss (``distill_loss``, ``gamma = 3``), backward and
   an SGD step. *online*: the teacher's forward on the batch (what a student does with augmentation on:
   ``engine._batch_loss``); *cache*: the batch's rows of stored scores (``TeacherCache``). Pairs:
   ResNet-56 -> ResNet-32 on 3 x 32 x 32 inputs (the CIFAR recipe's models) and the digits recipe's MLP
   (one hidden layer of 128) -> the same MLP on 8 x 8 digits. The two variants run interleaved, round by
   round, after a warm-up, so drift in the load of a shared machine hits both alike; the ratio is that
   of the median step times, with the 10th-90th percentiles of the per-round ratio.
2. ``run``: whole ``train_student`` runs (1 epoch) on generated CIFAR-10-format data (random images in
   the python-pickle batches, written here) from a ResNet-56 teacher run: augmentation off (online: the
   engine runs the teacher once over the training set, then over val and test; cache: none of that) and
   augmentation on (online: the teacher on every batch; cache: ``--cache-augmented``). Reports the wall
   time of each, the one-time ``cache_teacher`` cost, and whether the augmentation-off students have
   bitwise identical weights and equal metrics.
3. ``size``: bytes on disk per training example, dense and top-k, for m = 10 (the generated CIFAR-10)
   and m = 100 (a synthetic 100-class teacher).
4. ``sweep`` (``--sweep``): ``rkd sweep --config benchmarks/recipes/digits_lt.yaml`` with and without
   ``--cache-teachers`` (``--sweep-seeds`` seeds), wall time of each.

    python benchmarks/bench_cache.py                 # 1-3
    python benchmarks/bench_cache.py --sweep         # 1-4

Writes ``benchmarks/results/bench_cache_cpu.csv`` and ``.json``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import ROOT

from rkd_engine import distill_loss
from rkd_engine.data import load_dataset
from rkd_engine.models import build_model
from rkd_engine.training import StudentConfig, TeacherConfig, train_student, train_teacher
from rkd_engine.training.evaluation import load_model_file
from rkd_engine.training.teacher_cache import cache_teacher

GAMMA = 3.0


# -------------------------------------------------------------------------------------------- data
def write_cifar10(folder: Path, per_class: int, test_per_class: int, seed: int = 0) -> None:
    """Random images in CIFAR-10's python-pickle format (5 training batches and a test batch)."""
    gen = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def batch(path: Path, labels: np.ndarray) -> None:
        data = gen.integers(0, 256, size=(labels.size, 3072), dtype=np.uint8)
        with open(path, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, fh)

    per_batch = max(1, per_class // 5)
    for i in range(1, 6):
        batch(folder / f"data_batch_{i}", np.repeat(np.arange(10), per_batch))
    batch(folder / "test_batch", np.repeat(np.arange(10), test_per_class))


# -------------------------------------------------------------------------------------- step timing
def _step_fns(teacher, student, x, g_all, batch):
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    n = x.shape[0]
    state = {"i": 0}

    def rows():
        i = state["i"]
        state["i"] = (i + batch) % (n - batch + 1)
        return torch.arange(i, i + batch)

    def step(g):
        f = student(xb_holder[0])
        out = distill_loss(f, teacher_logits=g, temperature=GAMMA, validate=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    xb_holder = [None]

    def online():
        r = rows()
        xb_holder[0] = x[r]
        with torch.no_grad():
            g = teacher(xb_holder[0]).float()
        step(g)

    def cached():
        r = rows()
        xb_holder[0] = x[r]
        step(g_all[r])

    return online, cached


def bench_step(name, teacher_spec, student_spec, input_shape, m, batch, rounds, steps_per_round, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher = build_model(*teacher_spec[:1], input_shape, m, **teacher_spec[1]).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_model(*student_spec[:1], input_shape, m, **student_spec[1]).train()
    n = batch * 4
    x = torch.randn(n, *input_shape)
    with torch.no_grad():
        g_all = torch.cat([teacher(x[i : i + 256]).float() for i in range(0, n, 256)])
    online, cached = _step_fns(teacher, student, x, g_all, batch)
    for fn in (online, cached, online, cached):  # warm-up
        fn()
    times = {"online": [], "cache": []}
    for r in range(rounds):
        order = [("online", online), ("cache", cached)]
        for label, fn in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for _ in range(steps_per_round):
                fn()
            times[label].append((time.perf_counter() - start) / steps_per_round)
    ratios = sorted(o / c for o, c in zip(times["online"], times["cache"], strict=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "kind": "step",
        "case": name,
        "batch": batch,
        "threads": threads,
        "online_ms": round(1e3 * med["online"], 2),
        "cache_ms": round(1e3 * med["cache"], 2),
        "online_img_per_s": round(batch / med["online"], 1),
        "cache_img_per_s": round(batch / med["cache"], 1),
        "speedup": round(med["online"] / med["cache"], 3),
        "speedup_p10": round(ratios[len(ratios) // 10], 3),
        "speedup_p90": round(ratios[(9 * len(ratios)) // 10], 3),
        "rounds": rounds,
    }


# ---------------------------------------------------------------------------------------- run timing
def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_runs(work: Path, per_class: int, batch: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    folder = work / "cifar"
    write_cifar10(folder, per_class=per_class, test_per_class=max(2, per_class // 10))
    spec = f"cifar10:{folder}"
    data = load_dataset(spec, imbalance=1.0, seed=0)
    common = {"epochs": 1, "batch_size": batch, "checkpoint_every": 0, "eval_every": 0, "device": "cpu"}
    teacher_dir = work / "teacher"
    train_teacher(
        TeacherConfig(data=spec, imbalance=1.0, model="resnet56", augment="off", out=str(teacher_dir), **common),
        dataset=data,
        quiet=True,
    )
    cache, cache_s = _timed(lambda: cache_teacher(teacher_dir, work / "cache", dataset=data, quiet=True))
    rows = [{"kind": "run", "case": "cache-teacher resnet56", "rows": len(data.train), "seconds": round(cache_s, 2)}]
    student = {**common, "model": "resnet32"}
    results = {}
    for augment in ("off", "on"):
        variants = [
            ("online", {"teacher": str(teacher_dir)}),
            ("cache", {"teacher_cache": str(cache.path), "cache_augmented": augment == "on"}),
        ]
        for label, opts in variants:
            cfg = StudentConfig(**student, **opts, augment=augment, out=str(work / f"s-{augment}-{label}"))
            res, secs = _timed(lambda cfg=cfg: train_student(cfg, dataset=data, quiet=True))
            results[(augment, label)] = (res, secs)
        (on, t_on), (ca, t_ca) = results[(augment, "online")], results[(augment, "cache")]
        row = {
            "kind": "run",
            "case": f"resnet56->resnet32 1 epoch, augment {augment}",
            "rows": len(data.train),
            "batch": batch,
            "threads": threads,
            "online_s": round(t_on, 2),
            "cache_s": round(t_ca, 2),
            "speedup": round(t_on / t_ca, 3),
        }
        if augment == "off":
            a, b = load_model_file(on.path)[0].state_dict(), load_model_file(ca.path)[0].state_dict()
            row["identical_weights"] = all(torch.equal(a[k], b[k]) for k in a)
            row["identical_metrics"] = on.metrics == ca.metrics
        rows.append(row)
    rows.extend(size_rows(teacher_dir, work, data, "cifar10-format m=10"))
    return rows


def size_rows(teacher_dir: Path, work: Path, data, label: str) -> list[dict]:
    out = []
    m = data.num_classes
    for k in (None, 1, 5, 20):
        if k is not None and k >= m:
            continue
        cache = cache_teacher(teacher_dir, work / f"size-{label[:5]}-{k}", top_k=k, dataset=data, quiet=True)
        files = [e for key, e in cache.manifest["files"].items() if key.startswith("train.")]
        out.append(
            {
                "kind": "size",
                "case": f"{label} {'dense' if k is None else f'top-{k}'}",
                "m": m,
                "k": cache.k,
                "temperatures": len(cache.temperatures),
                "bytes_per_example": round(sum(e["bytes"] for e in files) / len(data.train), 1),
            }
        )
    return out


def bench_size_m100(work: Path) -> list[dict]:
    spec = "synthetic:m=100,d=32,n=30"
    data = load_dataset(spec, imbalance=1.0, seed=0)
    tdir = work / "t100"
    train_teacher(
        TeacherConfig(data=spec, imbalance=1.0, model="mlp", epochs=1, checkpoint_every=0, out=str(tdir)),
        dataset=data,
        quiet=True,
    )
    return size_rows(tdir, work, data, "synthetic m=100")


# ------------------------------------------------------------------------------------------- sweep
def bench_sweep(work: Path, seeds: int, workers: int) -> list[dict]:
    rows = []
    for label, extra in (("online", []), ("cache", ["--cache-teachers"])):
        cmd = [
            sys.executable,
            "-m",
            "rkd_engine.cli",
            "sweep",
            "--config",
            str(ROOT / "benchmarks" / "recipes" / "digits_lt.yaml"),
            "--seeds",
            str(seeds),
            "--workers",
            str(workers),
            "--out",
            str(work / f"sweep-{label}"),
            "--quiet",
            *extra,
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        _, secs = _timed(lambda cmd=cmd, env=env: subprocess.run(cmd, check=True, env=env))
        runs = sum(1 for _ in open(work / f"sweep-{label}" / "runs.csv")) - 1
        rows.append({"kind": "sweep", "case": f"digits_lt.yaml seeds={seeds} {label}", "runs": runs, "seconds": secs})
    rows.append(
        {
            "kind": "sweep",
            "case": "digits_lt.yaml speed-up",
            "speedup": round(rows[0]["seconds"] / rows[1]["seconds"], 3),
        }
    )
    for r in rows:
        if "seconds" in r:
            r["seconds"] = round(r["seconds"], 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per step case")
    parser.add_argument("--per-class", type=int, default=100, help="generated CIFAR images per class")
    parser.add_argument("--sweep", action="store_true", help="also time the digits recipe sweep")
    parser.add_argument("--sweep-seeds", type=int, default=1)
    parser.add_argument("--sweep-workers", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: step,run,size")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_cache_cpu"))
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    rows: list[dict] = []
    if "step" not in skip:
        for case in (
            ("resnet56->resnet32", ("resnet56", {}), ("resnet32", {}), (3, 32, 32), 10, 32, 2),
            (
                "digits mlp128->mlp128",
                ("mlp", {"hidden_sizes": [128]}),
                ("mlp", {"hidden_sizes": [128]}),
                (1, 8, 8),
                10,
                64,
                50,
            ),
        ):
            name, t, s, shape, m, batch, steps = case
            rows.append(bench_step(name, t, s, shape, m, batch, args.rounds, steps, args.threads))
            print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "run" not in skip:
            for row in bench_runs(work, args.per_class, 32, args.threads):
                rows.append(row)
                print(json.dumps(row), flush=True)
        if "size" not in skip:
            for row in bench_size_m100(work):
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.sweep:
            for row in bench_sweep(work, args.sweep_seeds, args.sweep_workers):
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_name": platform.processor() or platform.machine(),
        "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), ""),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
    }
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(f"{args.out}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with open(f"{args.out}.json", "w") as fh:
        json.dump({**meta, "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}.csv and .json")


if __name__ == "__main__":
    main()
