"""Smoke test of the training-step benchmark (benchmarks/bench_train.py) on a tiny student."""

from __future__ import annotations

import csv
import json
import math

import torch
from conftest import load_benchmark

bench_train = load_benchmark("bench_train")

COLUMNS = {
    "device_name",
    "torch",
    "threads",
    "config",
    "batch",
    "m",
    "method",
    "loss_backend",
    "step_median_ms",
    "step_p10_ms",
    "step_p90_ms",
    "steps_per_s",
    "speedup_vs_reference",
    "loss_ms",
    "loss_share",
    "nonloss_step_ms",
    "loss_share_by_subtraction",
    "dro_update_ms",
    "dro_update_per_step_ms",
    "dro_total_per_step_ms",
    "max_grad_err_vs_reference",
    "max_grad_rel_vs_reference",
}


def test_bench_train_tiny(tmp_path):
    rc = bench_train.main(
        ["--device", "cpu", "--configs", "tiny", "--threads", "1", "--steps", "3", "--seconds", "0"]
        + ["--out", str(tmp_path)]
    )
    assert rc == 0
    with open(tmp_path / "bench_train_cpu.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert COLUMNS <= set(rows[0]), COLUMNS - set(rows[0])
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"fused", "reference"}
    fused = by_method["fused"]
    assert fused["loss_backend"] == "cpp"  # backend="auto" on CPU is the C++ kernel
    # The fused loss gives the student's parameters the reference's gradient.
    assert float(fused["max_grad_rel_vs_reference"]) < 1e-5
    assert float(by_method["reference"]["max_grad_err_vs_reference"]) == 0.0
    for row in rows:
        assert int(row["reps"]) >= 3 and row["threads"] == "1"
        for key in ("step_median_ms", "steps_per_s", "speedup_vs_reference", "loss_ms", "dro_update_ms"):
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (key, row[key])
        assert math.isclose(float(row["steps_per_s"]), 1e3 / float(row["step_median_ms"]), rel_tol=1e-2)
    assert float(by_method["reference"]["speedup_vs_reference"]) == 1.0
    with open(tmp_path / "bench_train_cpu.json") as fh:
        saved = json.load(fh)
    assert saved["environment"]["torch"] == torch.__version__
    assert len(saved["rows"]) == 2 and "tiny" in saved["configs"]


def test_agreement_check_catches_a_wrong_loss():
    """The gradient check is not vacuous: a loss at another teacher temperature is flagged."""
    model, x, g, _, _, crit = bench_train.make_case(bench_train.CONFIGS["tiny"], "cpu")
    fns = bench_train.loss_fns(["fused", "reference"], crit)
    assert bench_train.check_agreement(model, x, g, fns)["fused"][1] < 1e-5
    crit.temperature = 1.0  # the reference stays at bench_loss.GAMMA = 2
    assert bench_train.check_agreement(model, x, g, fns)["fused"][1] > 1e-2
