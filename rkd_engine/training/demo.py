"""``rkd demo``: the paper's Table 1 grid on long-tailed digits, in a few minutes on a laptop CPU.

For each seed (which fixes the data split, the initialisations and the batch orders): standard,
balanced and robust teachers on a long-tailed training set (docs/protocol.md), then standard,
balanced and robust students distilled from each (``a = 1``, teacher-labelled validation updates for
the robust students). Reports average (= balanced, the test set being balanced) and worst-class test
accuracy, averaged over the seeds, the teacher alone included, and checks the paper's claim: the
robust student from the best teacher (chosen by worst-class *validation* accuracy of its robust
student) has a clearly higher worst-class accuracy than standard distillation at a small cost in
average accuracy.

The grid is a sweep specification (``demo_spec``: ``SweepSpec.objectives``, one ``gamma``, no
baselines) planned by ``sweep.plan`` and run by ``sweep.run_sweep`` in this process
(``executors.InProcess``); this module adds only the protocol, the table, the check and the plot. The
runs live under ``out/runs/`` as a sweep's do, and a finished one is reused by the same command.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from rkd_engine.training.executors import InProcess
from rkd_engine.training.report import pareto_front
from rkd_engine.training.runs import RunDir, atomic_write_json
from rkd_engine.training.sweep import GRID_OBJECTIVES, Job, SweepSpec, plan, run_sweep

OBJECTIVES = GRID_OBJECTIVES  # the teachers' and the students' objectives, by name


@dataclasses.dataclass(frozen=True)
class DemoProtocol:
    """Every setting of the demo (one place, written to ``results.json``)."""

    data: str = "digits"
    imbalance: float = 100.0
    model: str = "mlp"
    hidden: int = 128
    teacher_epochs: int = 30
    student_epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    dro_every: int = 4
    dro_step: float = 0.1
    gamma: float = 1.0
    seeds: int = 5


def _entry(rep: dict[str, Any]) -> dict[str, Any]:
    return {
        "average": rep["accuracy"],
        "balanced": rep["balanced_accuracy"],
        "worst": rep["worst_accuracy"],
        "per_class": rep["per_class_recall"],
    }


def _mean_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(entries)
    per_class = []
    for values in zip(*(e["per_class"] for e in entries), strict=True):
        present = [v for v in values if v is not None]
        per_class.append(sum(present) / len(present) if present else None)
    return {
        "average": sum(e["average"] for e in entries) / n,
        "balanced": sum(e["balanced"] for e in entries) / n,
        "worst": sum(e["worst"] for e in entries) / n,
        "per_class": per_class,
    }


def run_demo(
    out: str | Path,
    *,
    seeds: int | None = None,
    imbalance: float | None = None,
    epochs: int | None = None,
    device: str = "cpu",
    backend: str = "auto",
    quiet: bool = False,
    protocol: DemoProtocol | None = None,
) -> dict[str, Any]:
    """Run the grid into ``out`` (runs under ``out/runs``), print the table, write ``results.json`` and
    ``pareto.png``; returns the results. ``seeds``, ``imbalance`` and ``epochs`` override the protocol."""
    proto = protocol or DemoProtocol()
    changes: dict[str, Any] = {}
    if seeds is not None:
        changes["seeds"] = seeds
    if imbalance is not None:
        changes["imbalance"] = imbalance
    if epochs is not None:
        changes.update(teacher_epochs=epochs, student_epochs=epochs)
    proto = dataclasses.replace(proto, **changes)
    out = Path(out)
    spec = demo_spec(proto, device=device, backend=backend)
    started = time.perf_counter()
    # The models are tiny: runs in this process (no start-up cost), one torch thread (faster, and robust
    # to a busy machine).
    run_sweep(spec, out, quiet=quiet, executor=InProcess(threads=1))
    seconds = time.perf_counter() - started
    per_seed = _collect(out, plan(spec), proto.seeds)
    results: dict[str, Any] = {}
    for key in per_seed[0]["test"]:
        results[key] = _mean_entry([s["test"][key] for s in per_seed])
        results[key]["per_seed"] = [{k: s["test"][key][k] for k in ("average", "balanced", "worst")} for s in per_seed]
    check = _check(results, per_seed)
    summary = {"protocol": dataclasses.asdict(proto), "check": check, "seconds": round(seconds, 1)}
    atomic_write_json(out / "results.json", {**results, **summary})
    table = format_table(results, proto)
    print(table)
    print(_check_line(check))
    if not quiet:
        print(
            f"{proto.seeds} seeds, {len(per_seed[0]['test'])} runs each, {seconds:.0f} s; wrote {out / 'results.json'}"
        )
    try:
        plot_pareto(results, out / "pareto.png", proto)
    except ImportError as exc:  # matplotlib is optional
        print(f"no pareto.png: {exc}", file=sys.stderr)
    return {**results, **summary}


def demo_spec(proto: DemoProtocol, *, device: str = "cpu", backend: str = "auto") -> SweepSpec:
    """The demo as a sweep: teachers and students by objective (``OBJECTIVES``), one ``gamma``, no baselines."""
    return SweepSpec(
        data=proto.data,
        imbalance=proto.imbalance,
        seeds=tuple(range(proto.seeds)),
        gamma=(proto.gamma,),
        baselines=(),
        objectives=OBJECTIVES,
        common={
            "model": proto.model,
            "model_options": {"hidden_sizes": [proto.hidden]} if proto.model == "mlp" else {},
            "batch_size": proto.batch_size,
            "lr": proto.lr,
            "weight_decay": proto.weight_decay,
            "dro_every": proto.dro_every,
            "dro_step": proto.dro_step,
            "checkpoint_every": 0,
            "eval_every": 0,
        },
        teacher={"epochs": proto.teacher_epochs},
        student={"epochs": proto.student_epochs},
        device=device,
        backend=backend,
    )


def _collect(out: Path, jobs: list[Job], seeds: int) -> list[dict[str, Any]]:
    """Per seed, the ``"T/S"`` (``"T/none"``: the teacher alone) test and validation entries of the runs."""
    per_seed: list[dict[str, Any]] = [{"test": {}, "val": {}} for _ in range(seeds)]
    for job in jobs:
        metrics = RunDir(out / job.options["out"]).read_metrics()
        lab = job.labels
        key = f"{lab['teacher']}/{lab.get('student') or 'none'}"
        seed = per_seed[lab["seed"]]
        seed["test"][key], seed["val"][key] = _entry(metrics["test"]), _entry(metrics["val"])
    for seed in per_seed:  # the table's order: each teacher alone, then its students
        for split in ("test", "val"):
            seed[split] = {f"{t}/{s}": seed[split][f"{t}/{s}"] for t in OBJECTIVES for s in ("none", *OBJECTIVES)}
    return per_seed


def _check(results: dict[str, Any], per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's claim on this data: robust student from the best teacher vs standard distillation."""

    def val_worst(t: str) -> float:
        return sum(s["val"][f"{t}/robust"]["worst"] for s in per_seed) / len(per_seed)

    best = max(OBJECTIVES, key=val_worst)
    robust, standard = results[f"{best}/robust"], results["standard/standard"]
    gain = robust["worst"] - standard["worst"]
    drop = standard["average"] - robust["average"]
    return {
        "best_teacher": best,
        "chosen_by": "worst-class validation accuracy of the robust student, averaged over seeds",
        "robust_student": f"{best}/robust",
        "standard_distillation": "standard/standard",
        "worst_gain": gain,
        "average_drop": drop,
        "holds": bool(gain >= 0.05 and drop <= 0.02),
    }


def _check_line(check: dict[str, Any]) -> str:
    verdict = "holds" if check["holds"] else "does NOT hold"
    return (
        f"robust student from the {check['best_teacher']} teacher vs standard distillation: worst-class "
        f"{100 * check['worst_gain']:+.1f} points, average {-100 * check['average_drop']:+.1f} points "
        f"(claim: >= +5 worst, >= -2 average: {verdict})"
    )


def format_table(results: dict[str, Any], proto: DemoProtocol) -> str:
    """The Table 1 grid: teacher objectives as rows, teacher alone and students as columns."""
    columns = ("none", *OBJECTIVES)
    names = {"none": "teacher alone", **{s: f"{s} student" for s in OBJECTIVES}}
    width = 17
    lines = [
        (
            f"long-tailed {proto.data} (rho = {proto.imbalance:g}), {proto.model}, mean of {proto.seeds} seed(s): "
            "test accuracy, average / worst-class (%)"
        ),
        "teacher".ljust(10) + "".join(names[c].rjust(width) for c in columns),
    ]
    for t in OBJECTIVES:
        cells = []
        for c in columns:
            e = results[f"{t}/{c}"]
            cells.append(f"{100 * e['average']:.1f} / {100 * e['worst']:.1f}".rjust(width))
        lines.append(t.ljust(10) + "".join(cells))
    return "\n".join(lines)


def plot_pareto(results: dict[str, Any], path: Path, proto: DemoProtocol) -> None:
    """Worst-class against average test accuracy of every run, with the Pareto frontier (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f"{t}/{s}" for t in OBJECTIVES for s in ("none", *OBJECTIVES)]
    points = [(100 * results[k]["average"], 100 * results[k]["worst"]) for k in keys]
    colors = {"standard": "tab:blue", "balanced": "tab:green", "robust": "tab:red"}
    markers = {"none": "*", "standard": "o", "balanced": "s", "robust": "^"}
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for k, (x, y) in zip(keys, points, strict=True):
        t, s = k.split("/")
        ax.scatter(x, y, color=colors[t], marker=markers[s], s=90 if s == "none" else 50, zorder=3)
        ax.annotate(k if s != "none" else f"{t} teacher", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(points)
    ax.plot(
        [points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=1, zorder=2, label="Pareto frontier"
    )
    for t, c in colors.items():
        ax.scatter([], [], color=c, marker="o", label=f"{t} teacher")
    for s, mk in markers.items():
        ax.scatter([], [], color="gray", marker=mk, label="teacher alone" if s == "none" else f"{s} student")
    ax.set_xlabel("average test accuracy (%)")
    ax.set_ylabel("worst-class test accuracy (%)")
    ax.set_title(f"long-tailed {proto.data}, rho = {proto.imbalance:g}, {proto.seeds} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
