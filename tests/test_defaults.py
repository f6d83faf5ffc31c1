"""Defaults that work (issue 12): per-source protocols, one imbalance default, the DRO schedule, lambda
logged and moving, and the sweep's val_gamma / dro_step grid picked on validation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rkd_engine.cli import main
from rkd_engine.data import load_dataset
from rkd_engine.data.defaults import DEFAULT_IMBALANCE, default_protocol
from rkd_engine.training.config import ConfigError, StudentConfig, TeacherConfig, resolve_defaults, validate
from rkd_engine.training.demo import DemoProtocol
from rkd_engine.training.report import analyse, selection_diagnostics
from rkd_engine.training.schedule import default_dro_every, default_dro_step, distance_from_uniform
from rkd_engine.training.sweep import SweepSpec, make_spec, plan

# The demo protocol's standard teacher on long-tailed digits (rho = 100, 5 seeds), as committed in the
# README's demo table: test average / worst-class accuracy in %.
DEMO_TEACHER = (77.0, 11.0)


def test_one_imbalance_default_for_every_command():
    teacher = resolve_defaults(TeacherConfig(), cuda_available=False)
    assert teacher.imbalance == DEFAULT_IMBALANCE == 100.0
    assert SweepSpec().imbalance == DEFAULT_IMBALANCE
    assert DemoProtocol().imbalance == DEFAULT_IMBALANCE


def test_per_source_protocols(tmp_path):
    digits = default_protocol(load_dataset("digits", imbalance=100.0, seed=0))
    demo = DemoProtocol()
    assert (digits.model, digits.model_options["hidden_sizes"], digits.epochs, digits.batch_size) == (
        demo.model,
        [demo.hidden],
        demo.teacher_epochs,
        demo.batch_size,
    )
    # Derived from the data: feature vectors -> an MLP; epochs give about 3000 steps, within 30..200.
    feats = default_protocol(load_dataset("synthetic:m=4,d=6,n=60", imbalance=2.0, seed=0))
    assert feats.model == "mlp" and 30 <= feats.epochs <= 200 and "feature vectors" in feats.origin
    rng = np.random.default_rng(0)
    path = tmp_path / "img.npz"
    np.savez(path, x=rng.random((400, 3, 20, 20), dtype=np.float32), y=np.repeat(np.arange(4), 100))
    images = default_protocol(load_dataset(f"npz:{path}", imbalance=2.0, seed=0))
    assert images.model == "resnet20" and "3x20x20 images" in images.origin
    n = len(load_dataset(f"npz:{path}", imbalance=2.0, seed=0).train)
    assert images.epochs == min(200, max(30, math.ceil(3000 / math.ceil(n / 64))))
    with pytest.raises(TypeError, match="dataset must be"):
        default_protocol("digits")


def test_dro_schedule():
    assert default_dro_step(10, 100) == pytest.approx(0.1)  # the paper's setting keeps its step
    assert default_dro_step(10, 400) == pytest.approx(0.05)  # sqrt(1 / T)
    assert default_dro_step(100, 100) == pytest.approx(0.1 * math.sqrt(2))  # sqrt(log m)
    assert default_dro_step(10, 0) == 0.1 and default_dro_step(1, 10) == default_dro_step(2, 10)
    assert [default_dro_every(s) for s in (1, 5, 8, 97, 1000)] == [1, 1, 2, 24, 32]
    for bad in ((10, -1), (0, 5), (10, 2.5)):
        with pytest.raises(ValueError):
            default_dro_step(*bad)
    with pytest.raises(ValueError, match="steps_in_epoch"):
        default_dro_every(0)
    assert float(distance_from_uniform(torch.full((4,), 0.25))) == 0.0
    assert float(distance_from_uniform(torch.tensor([1.0, 0.0, 0.0, 0.0]))) == pytest.approx(0.75)


def test_default_teacher_reaches_the_demo_teacher(tmp_path):
    """`rkd teacher` with no training option on digits: mean over the demo's 5 seeds >= 77 / 11 %."""
    average, worst = [], []
    for seed in range(5):
        out = tmp_path / f"t{seed}"
        assert main(["teacher", "--out", str(out), "--seed", str(seed), "--quiet"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        average.append(100 * metrics["test"]["accuracy"])
        worst.append(100 * metrics["test"]["worst_accuracy"])
    config = json.loads((tmp_path / "t0" / "config.json").read_text())
    assert config["data"] == "digits" and config["imbalance"] == 100.0 and config["model"] == "mlp"
    assert sum(average) / 5 >= DEMO_TEACHER[0] and sum(worst) / 5 >= DEMO_TEACHER[1], (average, worst)


def test_lambda_moves_in_a_default_robust_student(tmp_path, capsys):
    teacher = tmp_path / "t"
    assert main(["teacher", "--out", str(teacher), "--quiet"]) == 0
    student = tmp_path / "s"
    assert main(["student", "--teacher", str(teacher), "--objective", "robust", "--out", str(student)]) == 0
    err = capsys.readouterr().err
    assert "defaults for digits" in err and "dro_every=1" in err and "dro_updates=150" in err
    metrics = json.loads((student / "metrics.json").read_text())
    dro = metrics["dro"]
    assert dro["every"] == 1 and dro["updates"] == 150
    assert dro["step_size"] == pytest.approx(default_dro_step(10, 150))
    records = [json.loads(line) for line in (student / "log.jsonl").read_text().splitlines()]
    trace = [(r["step"], r["dro_distance"]) for r in records if r.get("event") == "train" and "dro_distance" in r]
    assert len(trace) == 30  # one record an epoch
    assert all(len(r["dro_weights"]) == 10 for r in records if "dro_weights" in r and r["event"] == "train")
    # lambda leaves uniform and keeps moving: far from it at the end, farther than a tenth of the way through.
    assert dro["distance_from_uniform"] > 0.2
    assert trace[-1][1] > trace[2][1] > 0
    assert dro["distance_from_uniform"] == pytest.approx(trace[-1][1])


def test_derived_defaults_are_printed_for_npz(tmp_path, capsys):
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 40)
    x = (rng.normal(size=(120, 5)) + y[:, None]).astype(np.float32)
    path = tmp_path / "f.npz"
    np.savez(path, x=x, y=y)
    out = tmp_path / "t"
    assert main(["teacher", "--data", f"npz:{path}", "--epochs", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "derived from the data" in err and "feature vectors, 3 classes" in err and "model=mlp" in err
    assert "epochs=" not in err  # given, so not a default
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 2 and config["batch_size"] == 64 and config["model"] == "mlp"


def test_student_options_left_to_the_source(tmp_path):
    cfg = StudentConfig(teacher=str(tmp_path), lr=0.05)
    assert cfg.epochs is None and cfg.lr == 0.05 and cfg.dro_every is None and cfg.dro_step is None
    validate(cfg)
    for bad, message in (({"dro_every": 0}, "--dro-every must be an integer >= 1"), ({"lr": 0.0}, "--lr must be")):
        with pytest.raises(ConfigError, match=message):
            validate(TeacherConfig(**bad))


def test_sweep_grid_over_val_gamma_and_dro_step():
    spec = make_spec({"alpha_t": "1", "alpha_s": "0,0.5,1", "seeds": 1, "val_gamma": "0.1,1", "dro_step": [0.05, 0.5]})
    jobs = plan(spec, Path("/sweep"))
    students = [j for j in jobs if j.labels["kind"] == "student"]
    # per teacher (standard, a1): standard + balanced once, 2 DRO students x 2 val_gamma x 2 dro_step
    assert len(students) == 2 * (2 + 2 * 4)
    job = next(j for j in jobs if j.id == "seed0/g1/a1__a0.5__vg0.1__eta0.5")
    assert job.options["val_gamma"] == 0.1 and job.options["dro_step"] == 0.5
    assert job.labels["val_gamma"] == 0.1 and job.labels["dro_step"] == 0.5
    balanced = next(j for j in jobs if j.id == "seed0/g1/a1__a0")
    assert "val_gamma" not in balanced.options and balanced.labels["val_gamma"] is None
    # Without the dimensions the ids are those of earlier sweeps (a sweep directory stays resumable).
    plain = {j.id for j in plan(make_spec({"alpha_t": "1", "alpha_s": "1", "seeds": 1}), Path("/s"))}
    assert "seed0/g1/a1__a1" in plain
    with pytest.raises(ConfigError, match="val_gamma must hold numbers > 0"):
        make_spec({"val_gamma": "0,1"})
    with pytest.raises(ConfigError, match="dro_step is a grid dimension of this sweep: drop it from common"):
        make_spec({"dro_step": "0.1", "common": {"dro_step": 0.2}})


def _row(seed, teacher, student, gamma, val_avg, val_worst, test_worst, val_gamma=None, dro_step=None):
    kind = "teacher" if student == "" else "student"
    return {
        "run": f"seed{seed}/{teacher}__{student}__{val_gamma}",
        "kind": kind,
        "seed": seed,
        "teacher": teacher,
        "student": student,
        "alpha_t": None,
        "alpha_s": None,
        "gamma": gamma,
        "val_gamma": val_gamma,
        "dro_step": dro_step,
        "method": "teacher" if kind == "teacher" else "distill",
        "test_recall": "",
        **{f"val_{m}": v for m, v in (("average", val_avg), ("balanced", val_avg), ("worst_k", val_worst))},
        "val_worst": val_worst,
        **{f"test_{m}": v for m, v in (("average", val_avg), ("balanced", val_avg), ("worst_k", test_worst))},
        "test_worst": test_worst,
    }


def _val_gamma_rows(balanced: bool = False) -> list[dict]:
    """Two seeds of standard distillation and a robust student at val_gamma 1 and 0.1 (+ a balanced one)."""
    rows = []
    for seed, jitter in ((0, 0.0), (1, 0.01)):
        rows.append(_row(seed, "standard", "standard", 1.0, 0.80 + jitter, 0.10, 0.10))
        rows.append(_row(seed, "standard", "a1", 1.0, 0.80 + jitter, 0.30 + jitter, 0.20, val_gamma=1.0))
        # Better on validation, worse on test: the rule must not look at test.
        rows.append(_row(seed, "standard", "a1", 1.0, 0.80 + jitter, 0.50 + jitter, 0.15, val_gamma=0.1))
        if balanced:  # the best worst class, but an average too low to be eligible
            rows.append(_row(seed, "standard", "a0", 1.0, 0.60 + jitter, 0.60 + jitter, 0.60))
    return rows


def test_selection_picks_over_val_gamma_on_validation():
    rep = analyse(_val_gamma_rows())
    assert rep.selected.variant == (0.1, None)
    assert "val γ=0.1" in rep.table2[-1][0]
    assert rep.cells[("student", "standard", "a1", 1.0)].variant == (0.1, None)


def test_committed_default_sweep_is_what_the_bare_command_runs():
    """benchmarks/results/default_sweep/ backs the README's `rkd sweep --out sweeps/digits` (no option):
    its sweep.json must be the bare command's spec and its runs.csv hold every run of that plan."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "default_sweep"
    committed = json.loads((results / "sweep.json").read_text())
    assert committed == make_spec({}).to_dict()
    with open(results / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in rows) == sorted(j.id for j in plan(make_spec({}), Path("/s")))
    # The default robust students moved lambda (schedule: 150 updates at rho = 100).
    robust = [r for r in rows if r["kind"] == "student" and r["alpha_s"] and float(r["alpha_s"]) == 1.0]
    assert robust and all(int(r["dro_updates"]) == 150 and float(r["lambda_distance"]) > 0.2 for r in robust)


def test_report_keeps_the_eligible_candidates_for_the_oracle_line():
    """`analyse` hands its eligible candidates to the report, so selection_diagnostics prints the oracle."""
    rep = analyse(_val_gamma_rows(balanced=True))
    assert rep.planned_runs is None
    assert sorted(c.variant for c in rep.eligible) == [(0.1, None), (1.0, None)]
    oracle = [line for line in selection_diagnostics(rep) if line.startswith("Oracle")]
    assert len(oracle) == 1 and "among the 2 eligible" in oracle[0] and "val γ=1:" in oracle[0]
