"""``rkd sweep`` and ``rkd report``: the grid, resumption after a kill, the tables and the selection rule."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SWEEP_FAST, fake_sweep_row, kill_sweep_after, write_cifar10

from rkd_engine.cli import main
from rkd_engine.training.config import ConfigError
from rkd_engine.training.report import ReportError, analyse, read_runs
from rkd_engine.training.sweep import CSV_COLUMNS, load_spec, make_spec, plan

ROOT = Path(__file__).resolve().parents[1]
# Tiny runs: the point is the bookkeeping, not the accuracy.
FAST = ["--set", "epochs=2", *SWEEP_FAST]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_plan_counts_and_dependencies():
    spec = make_spec({"alpha_t": "0,1", "alpha_s": [0, 0.5, 1], "gamma": "1,3", "seeds": 2})
    jobs = plan(spec, Path("/sweep"))
    per_seed_teachers = 1 + 2  # standard + one per alpha_t
    per_seed_students = per_seed_teachers * (1 + 3) * 2  # (standard + alpha_s) x gamma
    per_seed_baselines = 3 * 2 + 2  # ada-alpha, ada-margin, hinton per gamma; post-shift, group-dro once
    assert len(jobs) == 2 * (per_seed_teachers + per_seed_students + per_seed_baselines)
    ids = {j.id for j in jobs}
    assert len(ids) == len(jobs)
    order = {j.id: i for i, j in enumerate(jobs)}
    for j in jobs:
        if j.after is not None:
            assert j.after in ids and order[j.after] < order[j.id]
            assert j.options["teacher"].endswith(j.after)
    student = next(j for j in jobs if j.id == "seed1/g3/a1__a0.5")
    assert student.options["objective"] == "tradeoff" and student.options["alpha"] == 0.5
    assert student.options["gamma"] == 3.0 and student.options["seed"] == 1 and student.options["data_seed"] == 1
    gdro = next(j for j in jobs if j.id == "seed0/baseline-group-dro")
    assert gdro.after is None and "teacher" not in gdro.options


def test_grid_by_objective_names():
    """``objectives`` (the demo's grid) plans teachers and students by name; only a DRO student gets the DRO grid."""
    spec = make_spec({"objectives": "standard,balanced,robust", "baselines": "none", "dro_step": "0.1,0.2"})
    jobs = plan(spec)
    teachers = [j.id for j in jobs if j.command == "teacher" and j.labels["seed"] == 0]
    assert teachers == ["seed0/teacher-standard", "seed0/teacher-balanced", "seed0/teacher-robust"]
    robust = [j for j in jobs if j.id.startswith("seed0/g1/balanced__robust")]
    assert [j.options["dro_step"] for j in robust] == [0.1, 0.2]
    assert all(j.options["objective"] == "robust" and "alpha" not in j.options for j in robust)
    assert sum(j.command == "student" for j in jobs) == len(spec.seeds) * 3 * (2 + 2)
    with pytest.raises(ConfigError, match="objectives must be among"):
        make_spec({"objectives": "tradeoff"})


@pytest.mark.parametrize(
    "values, match",
    [
        ({"alpha_t": "0,1.5"}, "alpha_t"),
        ({"gamma": "0"}, "gamma"),
        ({"seeds": 0}, "seeds"),
        ({"baselines": "dropout"}, "baselines"),
        ({"common": {"objective": "robust"}}, "common may not set objective"),
        ({"common": {"lr": -1}}, "lr"),
        ({"common": {"learning_rate": 0.1}}, "unknown option 'learning_rate'"),
        ({"imbalance": "0.5"}, "imbalance"),
        ({"alphas": [0]}, "unknown sweep option"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_sweep_options_are_named(values, match):
    with pytest.raises(ConfigError, match=match):
        make_spec(values)


def test_sweep_resume_and_report(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--out", str(out), "--alpha-t", "0,1", "--alpha-s", "0,1", "--workers", "2", "--quiet", *FAST]
    assert main([*args, "--seeds", "1"]) == 0
    first = _rows(out / "runs.csv")
    assert len(first) == 3 + 9 + 5  # teachers, students, baselines of one seed
    assert set(first[0]) == set(CSV_COLUMNS)
    done = out / "runs" / "seed0" / "teacher-a1" / "metrics.json"
    stamp = done.stat().st_mtime_ns
    # A second seed: the first seed's runs are finished and are not run again.
    assert main([*args, "--seeds", "2"]) == 0
    rows = _rows(out / "runs.csv")
    assert len(rows) == 2 * 17 and done.stat().st_mtime_ns == stamp
    assert {r["seed"] for r in rows} == {"0", "1"}
    for r in rows:
        assert 0 <= float(r["test_average"]) <= 1 and 0 <= float(r["test_worst"]) <= float(r["test_average"]) + 1e-9
        recall = json.loads(r["test_recall"])
        assert len(recall) == 10 and min(recall) == pytest.approx(float(r["test_worst"]))
        if r["kind"] == "student":
            assert r["teacher_calibration_max"] != "" and float(r["wall_seconds"]) > 0
    # Another training option in the same directory would mix incompatible runs.
    assert main([*args[: -len(FAST)], "--seeds", "1", *FAST[:-2], "--set", "dro_every=3"]) == 2
    assert "other options" in capsys.readouterr().err

    assert main(["report", str(out), "--quiet"]) == 0
    for name in ("report.md", "table1.csv", "table2.csv", "pareto.png", "per_class_recall.png", "calibration.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "report.md").read_text()
    assert "Table 1" in text and "Table 2" in text and "selected trade-off" in text
    t1 = list(csv.reader(open(out / "table1.csv")))
    assert t1[0][:3] == ["gamma", "teacher \\ student", "teacher alone"] and len(t1) == 1 + 3


def test_selection_rule_and_standard_errors(tmp_path):
    rows = []
    for seed, noise in enumerate((-0.01, 0.01)):
        rows.append(fake_sweep_row("teacher", "standard", "", None, seed, 0.8, 0.2, 0.8, 0.2))
        rows.append(fake_sweep_row("student", "standard", "standard", 1.0, seed, 0.80 + noise, 0.2, 0.80 + noise, 0.2))
        # Best validation worst-class accuracy, but an average too low: not eligible.
        rows.append(fake_sweep_row("student", "standard", "a1", 1.0, seed, 0.70, 0.6, 0.70, 0.6))
        # Eligible: average within standard distillation's standard error (0.8 - 0.01).
        rows.append(fake_sweep_row("student", "a0", "a0.5", 1.0, seed, 0.795, 0.4, 0.79, 0.45))
        rows.append(fake_sweep_row("student", "a0", "a0", 1.0, seed, 0.81, 0.3, 0.81, 0.3))
    (tmp_path / "runs.csv").write_text("")
    with open(tmp_path / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    runs, _ = read_runs(tmp_path)
    rep = analyse(runs)
    assert rep.selected.key == ("student", "a0", "a0.5", 1.0)
    assert rep.standard.mean("test_average") == pytest.approx(0.8)
    assert rep.standard.se("test_average") == pytest.approx(0.01)  # stdev 0.01*sqrt(2) over sqrt(2)
    assert rep.selected.se("test_average") == 0.0  # both seeds 0.79
    assert math.isnan(rep.cells[("teacher", "standard", "", None)].se("test_average")) is False


def test_report_errors(tmp_path):
    with pytest.raises(ReportError, match="no runs.csv"):
        read_runs(tmp_path)
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def test_cifar_recipe_smoke(tmp_path):
    # The CIFAR-10-LT recipe as documented, on small generated files in the official format, with the
    # schedule cut down; every option of the recipe is parsed and used.
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, per_class_per_batch=2)
    recipe = ROOT / "benchmarks" / "recipes" / "cifar10_lt.yaml"
    spec = load_spec(recipe, {})
    assert spec.teacher["model"] == "resnet56" and spec.student["model"] == "resnet32" and len(spec.gamma) == 3
    out = tmp_path / "sweep"
    status = main(
        [
            "sweep",
            "--config",
            str(recipe),
            "--data",
            f"cifar10:{folder}",
            "--out",
            str(out),
            "--seeds",
            "1",
            "--alpha-t",
            "1",
            "--alpha-s",
            "1",
            "--gamma",
            "3",
            "--val-gamma",
            "default",
            "--baselines",
            "none",
            "--set",
            "epochs=1",
            "--set",
            "val_per_class=1",
            "--set",
            "batch_size=16",
            "--teacher-set",
            "model=resnet8",
            "--student-set",
            "model=resnet8",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    assert status == 0
    rows = _rows(out / "runs.csv")
    assert len(rows) == 2 + 2 * 2 and all(r["gamma"] in ("", "3.0") for r in rows)
    config = json.loads((out / "runs" / "seed0" / "g3" / "a1__a1" / "config.json").read_text())
    assert config["model"] == "resnet8" and config["augment"] == "on" and config["weight_decay"] == 1e-4
    assert main(["report", str(out), "--quiet"]) == 0


@pytest.mark.slow
def test_killed_sweep_continues(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "rkd_engine.cli", "sweep", "--out", str(out), "--alpha-t", "1", "--alpha-s", "1"]
    cmd += ["--seeds", "2", "--baselines", "none", "--workers", "1", "--quiet", *FAST]
    finished = kill_sweep_after(cmd, out, 3, timeout=120)
    assert 3 <= len(finished) < 12
    stamps = {run: (out / "runs" / run / "metrics.json").stat().st_mtime_ns for run in finished}
    assert subprocess.run(cmd).returncode == 0
    rows = _rows(out / "runs.csv")
    assert len(rows) == 2 * (2 + 4)
    for run, stamp in stamps.items():
        assert (out / "runs" / run / "metrics.json").stat().st_mtime_ns == stamp
