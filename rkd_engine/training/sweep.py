"""``rkd sweep``: the paper's grid over ``alpha_t``, ``alpha_s``, ``gamma`` and seeds, with its baselines.

For each seed (which fixes the data split, initialisations and batch orders) the sweep trains the
teachers once, a standard one and one trade-off teacher per ``alpha_t`` (``alpha = 0`` is the balanced
objective, ``alpha = 1`` the robust one), then distils from each teacher, at each ``gamma``, a standard
student and one trade-off student per ``alpha_s``; the standard teacher also feeds the baselines of
METHOD.md section 5 (post-shift, AdaAlpha, AdaMargin, Hinton), and Group DRO runs without a teacher.
Standard distillation, the balanced student and the robust student of NM'21 are grid points
(standard teacher with the standard, ``alpha_s = 0`` and ``alpha_s = 1`` students).

Runs go to ``DIR/runs/<id>`` and are executed by worker processes (one thread each on CPU), a student
as soon as its teacher is done. A finished run (``metrics.json``) is skipped, a killed one resumes from
its checkpoint, so running the same command again continues a killed sweep. ``DIR/runs.csv`` holds one
row per finished run (rewritten after each); ``rkd report DIR`` turns it into the paper's tables.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import io
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from rkd_engine.training.config import (
    STUDENT_METHODS,
    ConfigError,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    load_config_file,
    merge,
    validate,
)
from rkd_engine.training.runs import RunDir, atomic_write, atomic_write_json

BASELINES = tuple(m for m in STUDENT_METHODS if m != "distill")
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Options every run of a sweep shares that the sweep itself sets (per run), so `common`, `teacher`
# and `student` may not: they are the grid.
_GRID_OPTIONS = frozenset({"out", "objective", "alpha", "seed", "data_seed", "teacher", "method", "gamma"})
# Options that do not change what a run computes.
_NON_SEMANTIC = ("workers", "device", "backend")

CSV_COLUMNS = (
    "run",
    "kind",
    "seed",
    "teacher",
    "alpha_t",
    "student",
    "alpha_s",
    "gamma",
    "method",
    "data",
    "imbalance",
    "model",
    "epochs",
    "val_average",
    "val_balanced",
    "val_worst",
    "val_worst_k",
    "test_average",
    "test_balanced",
    "test_worst",
    "test_worst_k",
    "k",
    "test_ece",
    "test_recall",
    "teacher_calibration_max",
    "teacher_calibration_mean",
    "teacher_calibration",
    "wall_seconds",
)


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep runs. ``common`` holds options (of ``rkd teacher``/``rkd student``) for every run,
    ``teacher`` and ``student`` options for the teachers or the students only (e.g. a smaller student
    model, other epochs)."""

    data: str = "digits"
    imbalance: float = 100.0
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha_t: tuple[float, ...] = DEFAULT_ALPHAS
    alpha_s: tuple[float, ...] = DEFAULT_ALPHAS
    gamma: tuple[float, ...] = (1.0,)
    baselines: tuple[str, ...] = BASELINES
    common: dict = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)
    workers: int | None = None
    device: str = "cpu"
    backend: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Job:
    """One run of the sweep: its id (the directory under ``runs/``), command, options and labels."""

    id: str
    command: str  # "teacher" or "student"
    options: dict
    labels: dict  # kind, seed, teacher, alpha_t, student, alpha_s, gamma, method
    after: str | None = None  # the id of the teacher run it needs


# ------------------------------------------------------------------------------------------- spec
def _floats(name: str, value: Any, *, lo: float | None = None, hi: float | None = None, pos: bool = False) -> tuple:
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        try:
            v = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a list of numbers, got {value!r}") from None
        bad = not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi) or (pos and v <= 0)
        if bad:
            want = "numbers in [0, 1]" if hi is not None else "numbers > 0" if pos else "finite numbers"
            raise ConfigError(f"{name} must hold {want}, got {item!r}")
        out.append(v)
    if not out:
        raise ConfigError(f"{name} must not be empty")
    return tuple(dict.fromkeys(out))


def _seeds(value: Any) -> tuple[int, ...]:
    """``5`` -> seeds 0..4; ``"0,3,7"`` or ``[0, 3, 7]`` -> those seeds."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"seeds must be a count >= 1 or a list of seeds, got {value!r}")
        return tuple(range(value))
    if isinstance(value, str) and "," not in value:
        try:
            return _seeds(int(value))
        except ValueError:
            raise ConfigError(f"seeds must be a count >= 1 or a list of seeds, got {value!r}") from None
    items = value.split(",") if isinstance(value, str) else value
    try:
        seeds = tuple(dict.fromkeys(int(s) for s in items))
    except (TypeError, ValueError):
        raise ConfigError(f"seeds must be a count >= 1 or a list of integer seeds, got {value!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"seeds must be non-negative integers, got {value!r}")
    return seeds


def _options(name: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a mapping of training options, got {type(value).__name__}")
    out = {str(k).replace("-", "_"): v for k, v in value.items()}
    clash = sorted(set(out) & _GRID_OPTIONS)
    if clash:
        raise ConfigError(f"{name} may not set {', '.join(clash)}: the sweep sets them per run")
    return out


def make_spec(values: Mapping[str, Any]) -> SweepSpec:
    """A checked ``SweepSpec`` from a mapping (a config file and flags); bad values raise ``ConfigError``."""
    known = {f.name for f in dataclasses.fields(SweepSpec)}
    values = {str(k).replace("-", "_"): v for k, v in values.items() if v is not None}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown sweep option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kw: dict[str, Any] = {}
    if "data" in values:
        kw["data"] = str(values["data"])
    if "imbalance" in values:
        ratios = _floats("imbalance", values["imbalance"], lo=1.0)
        if len(ratios) != 1:
            raise ConfigError("imbalance must be one number (run one sweep per imbalance ratio)")
        kw["imbalance"] = ratios[0]
    if "seeds" in values:
        kw["seeds"] = _seeds(values["seeds"])
    for name in ("alpha_t", "alpha_s"):
        if name in values:
            kw[name] = _floats(name, values[name], lo=0.0, hi=1.0)
    if "gamma" in values:
        kw["gamma"] = _floats("gamma", values["gamma"], pos=True)
    if "baselines" in values:
        raw = values["baselines"]
        if not isinstance(raw, (str, list, tuple)) or not all(isinstance(s, str) for s in raw):
            raise ConfigError(
                f"baselines must be all, none or a list of names among {', '.join(BASELINES)}, got {raw!r}"
            )
        items = [s.strip() for s in raw.split(",")] if isinstance(raw, str) else list(raw)
        items = [s for s in items if s and s != "none"]
        if items == ["all"]:
            items = list(BASELINES)
        bad = [s for s in items if s not in BASELINES]
        if bad:
            raise ConfigError(f"baselines must be among {', '.join(BASELINES)} (or all, none), got {', '.join(bad)}")
        kw["baselines"] = tuple(dict.fromkeys(items))
    for name in ("common", "teacher", "student"):
        if name in values:
            kw[name] = _options(name, values[name])
    if "workers" in values:
        raw = values["workers"]
        try:
            kw["workers"] = (
                0 if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()) else int(raw)
            )
        except (TypeError, ValueError, OverflowError):
            kw["workers"] = 0
        if kw["workers"] < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {values['workers']!r}")
    for name, choices in (("device", ("cpu", "cuda")), ("backend", ("auto", "cuda", "triton", "cpp", "reference"))):
        if name in values:
            if values[name] not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {values[name]!r}")
            kw[name] = values[name]
    spec = SweepSpec(**kw)
    # Every run's options must be valid: build one of each kind now rather than fail in a worker.
    for job in plan(dataclasses.replace(spec, seeds=spec.seeds[:1]), Path(".")):
        _config(job)
    return spec


def load_spec(path: str | Path | None, flags: Mapping[str, Any]) -> SweepSpec:
    """The sweep of a config file (YAML or JSON, keys as in ``SweepSpec``) overlaid by flags."""
    values: dict[str, Any] = dict(load_config_file(path)) if path else {}
    for key, value in flags.items():
        if value is None:
            continue
        if key in ("common", "teacher", "student"):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value
    return make_spec(values)


# ------------------------------------------------------------------------------------------- plan
def _tag(x: float) -> str:
    return f"{x:g}"


def plan(spec: SweepSpec, root: Path) -> list[Job]:
    """Every run of the sweep, teachers first."""
    runs = root / "runs"
    shared = {
        **spec.common,
        "data": spec.data,
        "imbalance": spec.imbalance,
        "device": spec.device,
        "backend": spec.backend,
    }
    jobs: list[Job] = []
    for seed in spec.seeds:
        base = {**shared, "seed": seed, "data_seed": seed}
        teachers = [("standard", None)] + [(f"a{_tag(a)}", a) for a in spec.alpha_t]
        tid: dict[str, str] = {}
        for name, alpha in teachers:
            run_id = f"seed{seed}/teacher-{name}"
            tid[name] = run_id
            objective = {"objective": "standard"} if alpha is None else {"objective": "tradeoff", "alpha": alpha}
            jobs.append(
                Job(
                    run_id,
                    "teacher",
                    {**base, **spec.teacher, **objective, "out": str(runs / run_id)},
                    {"kind": "teacher", "seed": seed, "teacher": name, "alpha_t": alpha, "method": "teacher"},
                )
            )
        students = [("standard", None)] + [(f"a{_tag(a)}", a) for a in spec.alpha_s]
        for gamma in spec.gamma:
            for tname, alpha_t in teachers:
                for sname, alpha_s in students:
                    run_id = f"seed{seed}/g{_tag(gamma)}/{tname}__{sname}"
                    objective = (
                        {"objective": "standard"} if alpha_s is None else {"objective": "tradeoff", "alpha": alpha_s}
                    )
                    jobs.append(
                        Job(
                            run_id,
                            "student",
                            {
                                **base,
                                **spec.student,
                                **objective,
                                "teacher": str(runs / tid[tname]),
                                "gamma": gamma,
                                "out": str(runs / run_id),
                            },
                            {
                                "kind": "student",
                                "seed": seed,
                                "teacher": tname,
                                "alpha_t": alpha_t,
                                "student": sname,
                                "alpha_s": alpha_s,
                                "gamma": gamma,
                                "method": "distill",
                            },
                            after=tid[tname],
                        )
                    )
            for method in spec.baselines:
                if method in ("group-dro", "post-shift") and gamma != spec.gamma[0]:
                    continue  # no teacher temperature: once per seed
                where = f"seed{seed}/baseline-{method}" if method in ("group-dro", "post-shift") else None
                run_id = where or f"seed{seed}/g{_tag(gamma)}/baseline-{method}"
                opts = {**base, **spec.student, "method": method, "out": str(runs / run_id)}
                if method != "group-dro":
                    opts.update(teacher=str(runs / tid["standard"]), gamma=gamma if method != "post-shift" else 1.0)
                jobs.append(
                    Job(
                        run_id,
                        "student",
                        opts,
                        {
                            "kind": "baseline",
                            "seed": seed,
                            "teacher": None if method == "group-dro" else "standard",
                            "student": method,
                            "gamma": None if method == "group-dro" else opts["gamma"],
                            "method": method,
                        },
                        after=None if method == "group-dro" else tid["standard"],
                    )
                )
    return jobs


def _config(job: Job) -> TrainConfig:
    """The run's config, checked (the checks that do not need a teacher on disk)."""
    cls = TeacherConfig if job.command == "teacher" else StudentConfig
    cfg = merge(cls, job.options, source=f"sweep run {job.id}")
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------- workers
@lru_cache(maxsize=4)
def _dataset(data: str, imbalance: float, seed: int, val_per_class: int | None, test_per_class: int | None):
    from rkd_engine.data import load_dataset

    return load_dataset(
        data, imbalance=imbalance, seed=seed, val_per_class=val_per_class, test_per_class=test_per_class
    )


def execute_job(job: Job, threads: int) -> dict[str, Any]:
    """Run (or resume, or skip) one job in this process; returns ``{"id", "wall_seconds", "skipped"}``."""
    import torch

    from rkd_engine.training.engine import train_student, train_teacher

    if threads > 0:
        torch.set_num_threads(threads)
    run = RunDir(job.options["out"])
    if run.metrics_path.exists():
        return {"id": job.id, "skipped": True}
    cfg = _config(job)
    resume = run.config_path.exists()
    dataset = _dataset(cfg.data, cfg.imbalance, cfg.data_seed, cfg.val_per_class, cfg.test_per_class)
    started = time.perf_counter()
    train = train_teacher if job.command == "teacher" else train_student
    train(cfg, resume=resume, overwrite=not resume, dataset=dataset, quiet=True)
    wall = time.perf_counter() - started
    atomic_write_json(run.path / "sweep.json", {"wall_seconds": wall, "resumed": resume})
    return {"id": job.id, "wall_seconds": wall, "skipped": False}


def _worker_init(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- rows
def _num(x: Any) -> Any:
    return "" if x is None else x


def row_for(job: Job) -> dict[str, Any] | None:
    """The CSV row of a finished job (``None`` if it has not finished)."""
    run = RunDir(job.options["out"])
    if not run.metrics_path.exists():
        return None
    metrics = run.read_metrics()
    config = run.read_config()
    timing_path = run.path / "sweep.json"
    wall = json.loads(timing_path.read_text()).get("wall_seconds") if timing_path.exists() else None
    val, test = metrics["val"], metrics["test"]
    if job.command == "teacher":
        calib = metrics.get("calibration") or {}
    else:
        calib = (metrics.get("teacher_calibration") or {}).get("test") or {}
    lab = job.labels
    row = {
        "run": job.id,
        "kind": lab["kind"],
        "seed": lab["seed"],
        "teacher": _num(lab.get("teacher")),
        "alpha_t": _num(lab.get("alpha_t")),
        "student": _num(lab.get("student")),
        "alpha_s": _num(lab.get("alpha_s")),
        "gamma": _num(lab.get("gamma")),
        "method": lab["method"],
        "data": config.get("data"),
        "imbalance": config.get("imbalance"),
        "model": config.get("model"),
        "epochs": config.get("epochs"),
        "k": test.get("k"),
        "test_ece": test.get("ece"),
        "test_recall": json.dumps(test.get("per_class_recall")),
        "teacher_calibration_max": _num(calib.get("max")),
        "teacher_calibration_mean": _num(calib.get("mean")),
        "teacher_calibration": json.dumps(calib.get("per_class")) if calib else "",
        "wall_seconds": "" if wall is None else round(wall, 2),
    }
    for split, rep in (("val", val), ("test", test)):
        row[f"{split}_average"] = rep["accuracy"]
        row[f"{split}_balanced"] = rep["balanced_accuracy"]
        row[f"{split}_worst"] = rep["worst_accuracy"]
        row[f"{split}_worst_k"] = rep["worst_k_accuracy"]
    return {c: row[c] for c in CSV_COLUMNS}


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    data = buf.getvalue().encode()
    atomic_write(path, lambda fh: fh.write(data))


# -------------------------------------------------------------------------------------------- run
def _check_stored(root: Path, spec: SweepSpec) -> None:
    """A sweep directory keeps its data and training options; the grid (seeds, alphas, gammas,
    baselines) may grow or shrink between invocations (runs are keyed by their grid point)."""
    path = root / "sweep.json"
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); delete it or choose another --out") from None
    now = spec.to_dict()
    differ = [k for k in ("data", "imbalance", "common", "teacher", "student") if stored.get(k) != now.get(k)]
    if differ:
        detail = ", ".join(f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise ConfigError(
            f"sweep {root} was started with other options ({detail}); its runs would not match: use another --out"
        )


def default_workers(spec: SweepSpec) -> int:
    if spec.device == "cuda":
        return 1
    return max(1, os.cpu_count() or 1)


def run_sweep(spec: SweepSpec, out: str | Path, *, quiet: bool = False) -> dict[str, Any]:
    """Run every job of ``spec`` into ``out`` (skipping finished ones); returns a summary.

    Raises ``RuntimeError`` at the end if any run failed (the others still ran; their rows are in
    ``runs.csv``)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _check_stored(root, spec)
    atomic_write_json(root / "sweep.json", spec.to_dict())
    jobs = plan(spec, root)
    workers = spec.workers or default_workers(spec)
    threads = 1 if spec.device == "cpu" and workers > 1 else 0
    rows: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    done = {j.id for j in jobs if RunDir(j.options["out"]).metrics_path.exists()}
    todo = [j for j in jobs if j.id not in done]
    for j in jobs:
        if j.id in done:
            rows[j.id] = row_for(j)
    started = time.perf_counter()
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"sweep {root}: {len(jobs)} runs, {len(done)} already finished, {len(todo)} to run on {workers} worker(s)")
    csv_path = root / "runs.csv"

    def flush() -> None:
        write_csv(csv_path, [rows[j.id] for j in jobs if j.id in rows])

    flush()
    if todo:

        def ready(j: Job) -> bool:
            return j.after is None or j.after in done

        waiting = list(todo)
        if workers == 1:  # one run at a time: in this process (no start-up cost, CUDA stays in one process)
            pool_cm: cf.Executor = cf.ThreadPoolExecutor(1)
        else:  # fresh interpreters: no OpenMP or CUDA state inherited through fork
            ctx = multiprocessing.get_context("spawn")
            pool_cm = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,))
        with pool_cm as pool:
            running: dict[cf.Future, Job] = {}

            def submit() -> None:
                for j in [j for j in waiting if ready(j)]:
                    waiting.remove(j)
                    running[pool.submit(execute_job, j, threads)] = j

            submit()
            finished = 0
            while running:
                complete, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in complete:
                    job = running.pop(fut)
                    finished += 1
                    try:
                        info = fut.result()
                    except Exception as exc:  # a failed run must not stop the others
                        failed[job.id] = (
                            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                        )
                        log(f"[{finished}/{len(todo)}] {job.id} FAILED: {failed[job.id]}")
                        # Its dependants cannot run.
                        for j in [j for j in waiting if j.after == job.id]:
                            waiting.remove(j)
                            failed[j.id] = f"its teacher {job.id} failed"
                        continue
                    done.add(job.id)
                    rows[job.id] = row_for(job)
                    r = rows[job.id]
                    log(
                        f"[{finished}/{len(todo)}] {job.id}: test average {100 * r['test_average']:.1f}  "
                        f"worst {100 * r['test_worst']:.1f}  ({info.get('wall_seconds', 0):.1f} s)"
                    )
                    flush()
                submit()
    flush()
    seconds = time.perf_counter() - started
    summary = {
        "runs": len(jobs),
        "finished": len(rows),
        "failed": failed,
        "seconds": round(seconds, 1),
        "csv": str(csv_path),
    }
    log(f"sweep {root}: {len(rows)}/{len(jobs)} runs finished in {seconds:.0f} s; wrote {csv_path}")
    if failed:
        raise RuntimeError(
            f"{len(failed)} run(s) of the sweep failed (the rest are in {csv_path}); first: "
            + "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:3])
        )
    return summary
