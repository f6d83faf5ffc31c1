"""``rkd sweep``: the paper's grid over ``alpha_t``, ``alpha_s``, ``gamma`` and seeds, with its baselines.

For each seed (which fixes the data split, initialisations and batch orders) the sweep trains the
teachers once, a standard one and one trade-off teacher per ``alpha_t`` (``alpha = 0`` is the balanced
objective, ``alpha = 1`` the robust one), then distils from each teacher, at each ``gamma``, a standard
student and one trade-off student per ``alpha_s``; the standard teacher also feeds the baselines of
docs/baselines.md (post-shift, AdaAlpha, AdaMargin, Hinton), and Group DRO runs without a teacher.
Standard distillation, the balanced student and the robust student of NM'21 are grid points
(standard teacher with the standard, ``alpha_s = 0`` and ``alpha_s = 1`` students).

One planner, two executors. This module owns the plan (``plan``: which runs, which teacher each
student depends on), the checks made before anything is written, the skipping of finished runs,
``runs.csv`` and the summary (``run_sweep``); an executor (``rkd_engine.training.executors``: a local
process pool, the default, or Ray) only runs ``execute_job`` for each planned job, a student after its
teacher, and reports each outcome. Runs go to ``DIR/runs/<id>``; every path a run stores is relative to
the sweep directory (runs execute with it as working directory), so a sweep may be continued from any
working directory, through any path to it, or on another machine that mounts it elsewhere.

A finished run (``metrics.json``) is skipped, a killed one resumes from its checkpoint, so running the
same command again continues a killed or interrupted sweep. ``DIR/runs.csv`` holds one row per finished
run (rewritten after each); ``rkd report DIR`` turns it into the paper's tables. A sweep directory is
locked while a sweep runs in it, and each run while a worker trains it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
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
    convert,
    load_config_file,
    merge,
    option_fields,
    validate,
)
from rkd_engine.training.locks import DirLock
from rkd_engine.training.runs import RunDir, atomic_write, atomic_write_json

BASELINES = tuple(m for m in STUDENT_METHODS if m != "distill")
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
GRID_OBJECTIVES = ("standard", "balanced", "robust")  # objectives a grid may name (SweepSpec.objectives)
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
    "val_gamma",
    "dro_step",
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
    "lambda_distance",
    "dro_updates",
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
    # Student grid dimensions of the DRO students (alpha_s > 0); empty: the run's default (val_gamma =
    # gamma, dro_step from the DRO schedule), one run per point as before.
    val_gamma: tuple[float, ...] = ()
    dro_step: tuple[float, ...] = ()
    baselines: tuple[str, ...] = BASELINES
    # Teachers and students by objective name (standard, balanced, robust) instead of the standard
    # objective and the trade-off points of alpha_t / alpha_s (the demo's grid); empty: the alphas.
    objectives: tuple[str, ...] = ()
    common: dict = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)
    workers: int | None = None
    device: str = "cpu"
    backend: str = "auto"
    cache_teachers: bool = False  # cache each teacher's outputs once trained; its students read the cache

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON values; ``objectives`` only when set (the demo's grid), so that a sweep.json
        written before that field existed still equals the spec of the same command."""
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        if not out["objectives"]:
            del out["objectives"]
        return out


class SweepFailed(RuntimeError):
    """Some runs of a sweep failed (the others finished); the message names the first few and their logs."""


@dataclass(frozen=True)
class Job:
    """One run of the sweep: its id (the directory under ``runs/``), command, options and labels."""

    id: str
    command: str  # "teacher" or "student"
    options: dict
    labels: dict  # kind, seed, teacher, alpha_t, student, alpha_s, gamma, method
    after: str | None = None  # the id of the teacher run it needs
    cache: str | None = None  # a teacher's output cache, written once it is trained (cache_teachers)


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


def _objectives(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise ConfigError(f"objectives must be a list of names among {', '.join(GRID_OBJECTIVES)}, got {value!r}")
    items = [s.strip() for s in items if s.strip()]
    bad = [s for s in items if s not in GRID_OBJECTIVES]
    if bad:
        raise ConfigError(f"objectives must be among {', '.join(GRID_OBJECTIVES)}, got {', '.join(bad)}")
    return tuple(dict.fromkeys(items))


def _options(name: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a mapping of training options, got {type(value).__name__}")
    out = {str(k).replace("-", "_"): v for k, v in value.items()}
    clash = sorted(set(out) & _GRID_OPTIONS)
    if clash:
        raise ConfigError(f"{name} may not set {', '.join(clash)}: the sweep sets them per run")
    return {k: _typed(k, v) for k, v in out.items()}


_KINDS = {f.name: f.metadata["kind"] for f in option_fields(StudentConfig)}


def _typed(key: str, value: Any) -> Any:
    """An option's value in its type (``"2"`` -> ``2`` for ``epochs``), as JSON stores it; unknown keys and
    unconvertible values are kept as given (``merge`` names them later)."""
    if key not in _KINDS:
        return value
    try:
        typed = convert(key, _KINDS[key], value)
    except ConfigError:
        return value
    return json.loads(json.dumps(typed))


def _absolute_data(data: str) -> str:
    """``npz:x.npz`` -> ``npz:/abs/x.npz``: a data path is resolved once, where the sweep is started (its runs
    execute in the sweep directory)."""
    kind, sep, arg = data.partition(":")
    if sep and kind.strip().lower() in ("npz", "cifar10", "cifar100") and arg.strip():
        return f"{kind}:{Path(arg.strip()).expanduser().resolve()}"
    return data


def make_spec(values: Mapping[str, Any]) -> SweepSpec:
    """A checked ``SweepSpec`` from a mapping (a config file and flags); bad values raise ``ConfigError``."""
    known = {f.name for f in dataclasses.fields(SweepSpec)}
    values = {str(k).replace("-", "_"): v for k, v in values.items() if v is not None}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown sweep option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kw: dict[str, Any] = {}
    if "data" in values:
        kw["data"] = _absolute_data(str(values["data"]))
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
    for name in ("val_gamma", "dro_step"):  # grid dimensions of the DRO students; "default" or [] for none
        raw = values.get(name)
        if raw is not None and raw not in ("", "default", [], ()):
            kw[name] = _floats(name, raw, pos=True)
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
    if "objectives" in values:
        kw["objectives"] = _objectives(values["objectives"])
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
    if "cache_teachers" in values:
        from rkd_engine.training.config import convert

        kw["cache_teachers"] = convert("cache_teachers", "bool", values["cache_teachers"])
    spec = SweepSpec(**kw)
    for name in ("val_gamma", "dro_step"):
        clash = [where for where in ("common", "student") if getattr(spec, name) and name in getattr(spec, where)]
        if clash:
            raise ConfigError(f"{name} is a grid dimension of this sweep: drop it from {' and '.join(clash)}")
    # Every run's options must be valid: build one of each kind now rather than fail in a worker.
    for job in plan(dataclasses.replace(spec, seeds=spec.seeds[:1])):
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


@dataclass(frozen=True)
class GridPoint:
    """A teacher or student objective of the grid: its name in run ids, its options and its ``alpha``
    label; ``dro``: whether ``lambda`` moves (then the ``val_gamma`` x ``dro_step`` grid applies)."""

    name: str
    options: dict
    alpha: float | None = None
    dro: bool = False


def grid_points(spec: SweepSpec, alphas: tuple[float, ...]) -> list[GridPoint]:
    """The standard objective and one trade-off point per ``alpha`` (``alpha = 0`` is balanced, ``1``
    robust); or, when ``spec.objectives`` is set, those objectives by name (the demo's grid)."""
    if spec.objectives:
        return [GridPoint(o, {"objective": o}, None, o in ("robust", "tradeoff")) for o in spec.objectives]
    standard = GridPoint("standard", {"objective": "standard"})
    return [standard] + [GridPoint(f"a{_tag(a)}", {"objective": "tradeoff", "alpha": a}, a, a != 0) for a in alphas]


def plan(spec: SweepSpec, root: Path | None = None) -> list[Job]:
    """Every run of the sweep, teachers first. Paths (``out``, ``teacher``) are relative to the sweep
    directory, so a job does not depend on where the sweep lives (``root`` is accepted and unused)."""
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
        teachers = _teacher_jobs(spec, seed, base)
        jobs += [job for _, job in teachers]
        for gamma in spec.gamma:
            jobs += _student_jobs(spec, seed, base, gamma, teachers)
            jobs += _baseline_jobs(spec, seed, base, gamma, first_gamma=gamma == spec.gamma[0])
    if spec.cache_teachers:
        jobs = _with_caches(jobs)
    return jobs


_RUNS = Path("runs")


def _teacher_jobs(spec: SweepSpec, seed: int, base: dict) -> list[tuple[GridPoint, Job]]:
    """The seed's teachers: ``seed<seed>/teacher-<name>``."""
    out = []
    for point in grid_points(spec, spec.alpha_t):
        run_id = f"seed{seed}/teacher-{point.name}"
        labels = {"kind": "teacher", "seed": seed, "teacher": point.name, "alpha_t": point.alpha, "method": "teacher"}
        options = {**base, **spec.teacher, **point.options, "out": str(_RUNS / run_id)}
        out.append((point, Job(run_id, "teacher", options, labels)))
    return out


def _student_jobs(
    spec: SweepSpec, seed: int, base: dict, gamma: float, teachers: list[tuple[GridPoint, Job]]
) -> list[Job]:
    """Every student of every teacher at ``gamma``: ``seed<seed>/g<gamma>/<teacher>__<student>[__vg..][__eta..]``."""
    jobs = []
    for teacher, teacher_job in teachers:
        for student, val_gamma, dro_step in _dro_points(spec, grid_points(spec, spec.alpha_s)):
            run_id = f"seed{seed}/g{_tag(gamma)}/{teacher.name}__{student.name}"
            objective = dict(student.options)
            if val_gamma is not None:
                run_id += f"__vg{_tag(val_gamma)}"
                objective["val_gamma"] = val_gamma
            if dro_step is not None:
                run_id += f"__eta{_tag(dro_step)}"
                objective["dro_step"] = dro_step
            options = {**base, **spec.student, **objective, "teacher": teacher_job.options["out"], "gamma": gamma}
            labels = {
                "kind": "student",
                "seed": seed,
                "teacher": teacher.name,
                "alpha_t": teacher.alpha,
                "student": student.name,
                "alpha_s": student.alpha,
                "gamma": gamma,
                "val_gamma": val_gamma,
                "dro_step": dro_step,
                "method": "distill",
            }
            jobs.append(Job(run_id, "student", {**options, "out": str(_RUNS / run_id)}, labels, after=teacher_job.id))
    return jobs


def _baseline_jobs(spec: SweepSpec, seed: int, base: dict, gamma: float, *, first_gamma: bool) -> list[Job]:
    """The baselines from the seed's standard teacher at ``gamma``; Group DRO and post-shift (no teacher
    temperature) once per seed."""
    jobs = []
    teacher_id = f"seed{seed}/teacher-standard"
    for method in spec.baselines:
        once = method in ("group-dro", "post-shift")
        if once and not first_gamma:
            continue
        run_id = f"seed{seed}/baseline-{method}" if once else f"seed{seed}/g{_tag(gamma)}/baseline-{method}"
        opts = {**base, **spec.student, "method": method, "out": str(_RUNS / run_id)}
        if method != "group-dro":
            opts.update(teacher=str(_RUNS / teacher_id), gamma=gamma if method != "post-shift" else 1.0)
        labels = {
            "kind": "baseline",
            "seed": seed,
            "teacher": None if method == "group-dro" else "standard",
            "student": method,
            "gamma": None if method == "group-dro" else opts["gamma"],
            "method": method,
        }
        jobs.append(Job(run_id, "student", opts, labels, after=None if method == "group-dro" else teacher_id))
    return jobs


def _dro_points(spec: SweepSpec, students: list[GridPoint]) -> list[tuple]:
    """``(student, val_gamma, dro_step)`` of every student at one teacher and ``gamma``: the DRO
    students once per point of the ``val_gamma`` x ``dro_step`` grid, the others (standard, balanced:
    ``lambda`` has no effect on them) once. ``None``: the run's default."""
    points = []
    for student in students:
        if not student.dro:
            points.append((student, None, None))
            continue
        for val_gamma in spec.val_gamma or (None,):
            for dro_step in spec.dro_step or (None,):
                points.append((student, val_gamma, dro_step))
    return points


def _with_caches(jobs: list[Job]) -> list[Job]:
    """Teachers write ``caches/<teacher id>`` (relative to the sweep directory, as ``runs/`` is) once
    trained; their students (not post-shift) read it."""
    caches = {j.id: str(Path("caches") / j.id) for j in jobs if j.command == "teacher"}
    out = []
    for j in jobs:
        if j.command == "teacher":
            j = dataclasses.replace(j, cache=caches[j.id])
        elif j.after in caches and j.options.get("method") != "post-shift":
            j = dataclasses.replace(j, options={**j.options, "teacher_cache": caches[j.after]})
        out.append(j)
    return out


def _config(job: Job) -> TrainConfig:
    """The run's config, checked (the checks that do not need a teacher on disk)."""
    cls = TeacherConfig if job.command == "teacher" else StudentConfig
    cfg = merge(cls, job.options, source=f"sweep run {job.id}")
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------------- jobs
# Kept in the sweep directory, not in the runs (a run directory holds only what training writes):
LOCKS = ".locks"  # .locks/<run id>.lock, held by the worker that trains the run
ERRORS = "errors"  # errors/<run id>.log, the traceback of the run's last failure (removed when it finishes)
RUN_LOCK_WAIT = 30.0  # seconds a worker waits for a run held by another (e.g. a task of a sweep just killed)


@dataclass(frozen=True)
class Outcome:
    """What became of one job: finished (``ok``; ``skipped`` if it had finished before), or failed with a
    one-line ``error`` and the path of its ``log`` (relative to the sweep directory) when there is one."""

    id: str
    ok: bool
    skipped: bool = False
    wall_seconds: float | None = None
    resumed: bool = False
    error: str = ""
    log: str | None = None


@lru_cache(maxsize=4)
def _dataset(data: str, imbalance: float, seed: int, val_per_class: int | None, test_per_class: int | None):
    from rkd_engine.data import load_dataset

    return load_dataset(
        data, imbalance=imbalance, seed=seed, val_per_class=val_per_class, test_per_class=test_per_class
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def execute_job(root: str | Path, job: Job, threads: int = 0, teacher: Outcome | None = None) -> Outcome:
    """Run (or resume, or skip) one job in this process, the body every executor runs for a job.

    ``root`` is the sweep directory (the job runs with it as working directory), ``threads`` the torch
    threads (0: leave as is), ``teacher`` the outcome of the job's teacher (a failed one: the job is not
    run). Never raises for a failed run: the traceback goes to ``errors/<run id>.log`` in the sweep directory
    and the outcome says so."""
    if teacher is not None and not teacher.ok:
        return Outcome(job.id, ok=False, error=f"not run: its teacher {teacher.id} failed")
    here = os.getcwd()
    os.chdir(root)
    try:
        return _execute_here(job, threads)
    finally:
        os.chdir(here)


def _execute_here(job: Job, threads: int) -> Outcome:
    run = RunDir(job.options["out"])
    if run.metrics_path.exists():
        return Outcome(job.id, ok=True, skipped=True)
    error_log = Path(ERRORS) / f"{job.id}.log"
    lock_dir = (Path(LOCKS) / job.id).parent
    try:
        lock = DirLock(lock_dir, f"{Path(job.id).name}.lock", what=f"run {job.id}", command=f"rkd sweep (run {job.id})")
        with lock.acquire(wait=RUN_LOCK_WAIT):
            if run.metrics_path.exists():  # finished by whoever held the lock before
                return Outcome(job.id, ok=True, skipped=True)
            import torch

            from rkd_engine.training.engine import train_student, train_teacher
            from rkd_engine.training.teacher_cache import cache_teacher

            if threads > 0:
                torch.set_num_threads(threads)
            cfg = _config(job)
            resume = run.config_path.exists()
            dataset = _dataset(cfg.data, cfg.imbalance, cfg.data_seed, cfg.val_per_class, cfg.test_per_class)
            started = time.perf_counter()
            train = train_teacher if job.command == "teacher" else train_student
            cache = cfg.teacher_cache if job.command == "student" else None
            if cache is not None and not (Path(cache) / "manifest.json").exists():  # its teacher's caching was killed
                cache_teacher(cfg.teacher, cache, dataset=dataset, device=cfg.device, overwrite=True, quiet=True)
            train(cfg, resume=resume, overwrite=not resume, dataset=dataset, quiet=True)
            if job.cache is not None:
                cache_teacher(run.path, job.cache, dataset=dataset, device=cfg.device, overwrite=True, quiet=True)
            wall = time.perf_counter() - started
            atomic_write_json(run.path / "sweep.json", {"wall_seconds": wall, "resumed": resume})
            error_log.unlink(missing_ok=True)
            return Outcome(job.id, ok=True, wall_seconds=wall, resumed=resume)
    except Exception as exc:  # reported, never raised: the other runs go on
        text = "".join(traceback.format_exception(exc)).encode()
        try:
            error_log.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(error_log, lambda fh: fh.write(text))
            log = str(error_log)
        except OSError:
            log = None
        return Outcome(job.id, ok=False, error=_one_line(exc), log=log)


# ------------------------------------------------------------------------------------------- rows
def _num(x: Any) -> Any:
    return "" if x is None else x


def row_for(root: str | Path, job: Job) -> dict[str, Any] | None:
    """The CSV row of a finished job of the sweep in ``root`` (``None`` if it has not finished)."""
    run = RunDir(Path(root) / job.options["out"])
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
        "val_gamma": _num(lab.get("val_gamma")),
        "dro_step": _num(lab.get("dro_step")),
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
        "lambda_distance": _num((metrics.get("dro") or {}).get("distance_from_uniform")),
        "dro_updates": _num((metrics.get("dro") or {}).get("updates")),
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


# ------------------------------------------------------------------------------------------ checks
def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _check_stored(root: Path, spec: SweepSpec) -> None:
    """A sweep directory keeps its data and training options; the grid (seeds, alphas, gammas,
    baselines) may grow or shrink between invocations (runs are keyed by their grid point). Options
    are compared as typed values (``epochs: 2`` equals ``--set epochs=2``)."""
    path = root / "sweep.json"
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); delete it or choose another --out") from None
    if not isinstance(stored, dict):
        raise ConfigError(f"{path} is not a sweep description (a JSON object); delete it or choose another --out")
    now = json.loads(json.dumps(spec.to_dict(), default=str))
    for name in ("common", "teacher", "student"):
        if isinstance(stored.get(name), Mapping):
            stored[name] = {k: _typed(k, v) for k, v in stored[name].items()}
    differ = [
        k
        for k in ("data", "imbalance", "common", "teacher", "student")
        if _canonical(stored.get(k)) != _canonical(now[k])
    ]
    if differ:
        detail = ", ".join(f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise ConfigError(
            f"sweep {root} was started with other options ({detail}); its runs would not match: use another --out"
        )


def check_runnable(spec: SweepSpec) -> None:
    """Everything that can be checked before a run starts, before anything is written: the data source
    loads, and every model of the sweep builds on it with its options. ``ConfigError`` names the culprit."""
    import torch

    from rkd_engine.data.defaults import DEFAULT_IMBALANCE, default_protocol
    from rkd_engine.models import build_model

    seen: set[str] = set()
    for job in plan(dataclasses.replace(spec, seeds=spec.seeds[:1])):
        cfg = _config(job)
        if getattr(cfg, "method", None) == "post-shift":
            continue  # post-shift wraps its teacher's model
        try:
            data = _dataset(
                cfg.data or "digits",
                cfg.imbalance or DEFAULT_IMBALANCE,
                cfg.data_seed or 0,
                cfg.val_per_class,
                cfg.test_per_class,
            )
        except (ValueError, TypeError, OSError) as exc:
            raise ConfigError(f"--data {cfg.data}: {_one_line(exc)}") from None
        name, options = cfg.model, cfg.model_options
        if name == "auto":  # the data source's default protocol, as the run will resolve it
            protocol = default_protocol(data)
            name, options = protocol.model, options or protocol.model_options
        key = _canonical([job.command, name, options])
        if key in seen:
            continue
        seen.add(key)
        try:
            with torch.device("meta"):
                build_model(name, data.input_shape, data.num_classes, **options)
        except (ValueError, TypeError) as exc:
            which = "teachers'" if job.command == "teacher" else "students'"
            raise ConfigError(
                f"the {which} model {name!r} with options {options or {}} cannot be built: {_one_line(exc)}"
            ) from None
    _dataset.cache_clear()  # the workers load their own


# --------------------------------------------------------------------------------------------- run
def default_workers(spec: SweepSpec) -> int:
    if spec.device == "cuda":
        return 1
    return max(1, os.cpu_count() or 1)


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into the interrupt Ctrl-C gives."""


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise _Interrupted(f"signal {signum}")


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    quiet: bool = False,
    executor: str | Any = "local",
    address: str | None = None,
    cpus_per_run: float | None = None,
    gpus_per_run: float | None = None,
) -> dict[str, Any]:
    """Run every job of ``spec`` into ``out`` (skipping finished ones); returns a summary.

    ``executor`` is ``"local"`` (a process pool of ``spec.workers`` processes, the default), ``"ray"``
    (each run a Ray task asking for ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs, on the cluster at
    ``address`` or a local one; ``out`` must be a directory every node sees at the same path) or an
    ``Executor`` object. Ctrl-C or SIGTERM stops every run within seconds and leaves the directory as a
    kill would (the same command continues it). Raises ``SweepFailed`` (a ``RuntimeError``) at the end if any run failed
    (the others still ran; their rows are in ``runs.csv``, each failure's traceback in ``errors/<run id>.log``)."""
    from rkd_engine.training.executors import make_executor

    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root} exists and is not a directory")
    ex = make_executor(
        executor, spec, address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run
    )  # checks its options (Ray installed, numbers) before anything is written
    check_runnable(spec)
    root.mkdir(parents=True, exist_ok=True)
    with DirLock(root, ".sweep.lock", what=f"sweep {root}").acquire():
        _check_stored(root, spec)
        atomic_write_json(root / "sweep.json", spec.to_dict())
        handler_set = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) if handler_set else None
        try:
            return _schedule(spec, root, ex, quiet=quiet)
        finally:
            if handler_set:
                signal.signal(signal.SIGTERM, previous)


def _schedule(spec: SweepSpec, root: Path, ex: Any, *, quiet: bool) -> dict[str, Any]:
    """Hand the unfinished jobs to ``ex`` (a student with its teacher as dependency), collect outcomes,
    keep ``runs.csv`` current; on interrupt, stop the executor and re-raise."""
    jobs = plan(spec)
    rows: dict[str, dict[str, Any]] = {}
    failed: dict[str, Outcome] = {}
    for j in jobs:
        row = row_for(root, j)
        if row is not None:
            rows[j.id] = row
    todo = [j for j in jobs if j.id not in rows]
    by_id = {j.id: j for j in todo}
    pending = set(by_id)
    started = time.perf_counter()
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"sweep {root}: {len(jobs)} runs, {len(rows)} already finished, {len(todo)} to run on {ex.describe()}")
    csv_path = root / "runs.csv"

    def flush() -> None:
        write_csv(csv_path, [rows[j.id] for j in jobs if j.id in rows])

    flush()
    finished = 0
    try:
        if todo:
            ex.start(root.resolve())
            for j in todo:  # plan order: a teacher is submitted before its students
                ex.submit(j, after=j.after if j.after in pending else None)
        while pending:
            for outcome in ex.wait(1.0):
                if outcome.id not in pending:
                    continue
                pending.discard(outcome.id)
                finished += 1
                job = by_id[outcome.id]
                if not outcome.ok:
                    failed[job.id] = outcome
                    where = f" (log: {root / outcome.log})" if outcome.log else ""
                    log(f"[{finished}/{len(todo)}] {job.id} FAILED: {outcome.error}{where}")
                    continue
                row = row_for(root, job)
                if row is None:  # reported finished without metrics: treat as a failure
                    failed[job.id] = dataclasses.replace(outcome, ok=False, error="finished without metrics.json")
                    continue
                rows[job.id] = row
                log(
                    f"[{finished}/{len(todo)}] {job.id}: test average {100 * row['test_average']:.1f}  "
                    f"worst {100 * row['test_worst']:.1f}  ({outcome.wall_seconds or 0:.1f} s)"
                )
                flush()
    except BaseException:
        ex.close(cancel=True)
        flush()
        raise
    ex.close(cancel=False)
    flush()
    seconds = time.perf_counter() - started
    summary = {
        "runs": len(jobs),
        "finished": len(rows),
        "failed": {k: o.error for k, o in failed.items()},
        "seconds": round(seconds, 1),
        "csv": str(csv_path),
    }
    log(f"sweep {root}: {len(rows)}/{len(jobs)} runs finished in {seconds:.0f} s; wrote {csv_path}")
    if failed:
        first = [o for o in failed.values() if o.log] or list(failed.values())
        raise SweepFailed(
            f"{len(failed)} run(s) of the sweep failed (the rest are in {csv_path}); first: "
            + "; ".join(f"{o.id}: {o.error}" + (f" (log: {root / o.log})" if o.log else "") for o in first[:3])
        )
    return summary
