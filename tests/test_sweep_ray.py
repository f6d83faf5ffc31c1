"""``rkd sweep --executor ray`` on a local Ray cluster (2 CPUs) started by the tests: the same runs.csv as
the local pool, a failing run reported while the rest complete, a killed sweep that continues."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'rkd-engine[ray]')")

from conftest import SWEEP_FAST, kill_sweep_after, sweep_rows  # noqa: E402

from rkd_engine.cli import main  # noqa: E402
from rkd_engine.training.sweep import CSV_COLUMNS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "epochs=2", *SWEEP_FAST]
SMALL = ["--alpha-t", "1", "--alpha-s", "1", "--seeds", "1", "--baselines", "hinton", "--quiet", *FAST]
# The metric columns of runs.csv (val_average ... teacher_calibration): the same whichever executor ran.
METRICS = CSV_COLUMNS[CSV_COLUMNS.index("val_average") : CSV_COLUMNS.index("teacher_calibration") + 1]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module; yields its address."""
    env = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env) if p)  # the workers import rkd_engine
    info = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        yield info.address_info["address"]
    finally:
        ray.shutdown()
        os.environ["PYTHONPATH"] = env


def test_ray_sweep_equals_local_pool(tmp_path, cluster):
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert main(["sweep", "--out", str(local), "--workers", "2", *SMALL]) == 0
    assert main(["sweep", "--out", str(remote), "--executor", "ray", *SMALL]) == 0
    a, b = sweep_rows(local / "runs.csv"), sweep_rows(remote / "runs.csv")
    assert len(a) == 2 + 4 + 1 and set(a) == set(b)
    for run in a:
        assert {m: a[run][m] for m in METRICS} == {m: b[run][m] for m in METRICS}, run
    # The student's stored teacher is relative to the sweep directory, whichever executor ran it.
    assert '"teacher": "runs/seed0/teacher-a1"' in (remote / "runs/seed0/g1/a1__a1/config.json").read_text()
    # Run again: everything is finished, nothing runs.
    stamp = (remote / "runs/seed0/teacher-a1/metrics.json").stat().st_mtime_ns
    assert main(["sweep", "--out", str(remote), "--executor", "ray", *SMALL]) == 0
    assert (remote / "runs/seed0/teacher-a1/metrics.json").stat().st_mtime_ns == stamp


def test_ray_failing_runs_are_reported_and_the_rest_complete(tmp_path, cluster, capsys):
    out = tmp_path / "sweep"
    # A teacher and a student whose run directories are broken (config.json not JSON): they fail, the
    # teacher's students are not run, everything else completes.
    for run in ("runs/seed0/teacher-a1", "runs/seed0/g1/standard__a1"):
        (out / run).mkdir(parents=True)
        (out / run / "config.json").write_text("{not json")
    assert main(["sweep", "--out", str(out), "--executor", "ray", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "4 run(s) of the sweep failed" in err and "errors/seed0/teacher-a1.log" in err
    rows = sweep_rows(out / "runs.csv")
    assert set(rows) == {"seed0/teacher-standard", "seed0/g1/standard__standard", "seed0/g1/baseline-hinton"}
    log = (out / "errors/seed0/g1/standard__a1.log").read_text()
    assert "Traceback" in log and "config.json is not valid JSON" in log
    # Fixed, the same command finishes the sweep and clears the error logs.
    for run in ("runs/seed0/teacher-a1", "runs/seed0/g1/standard__a1"):
        (out / run / "config.json").unlink()
    assert main(["sweep", "--out", str(out), "--executor", "ray", *SMALL]) == 0
    assert len(sweep_rows(out / "runs.csv")) == 7 and not list((out / "errors").rglob("*.log"))


@pytest.mark.slow
def test_ray_killed_sweep_continues(tmp_path, cluster, monkeypatch):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "rkd_engine.cli", "sweep", "--out", str(out), "--executor", "ray"]
    cmd += ["--address", cluster, "--alpha-t", "0,1", "--alpha-s", "1", "--seeds", "1", "--baselines", "none"]
    cmd += ["--quiet", *FAST[:-2], "--set", "epochs=6", "--set", "checkpoint_every=3"]
    finished = kill_sweep_after(cmd, out, 2, timeout=240, cwd=tmp_path)
    assert 2 <= len(finished) < 9
    stamps = {run: (out / "runs" / run / "metrics.json").stat().st_mtime_ns for run in finished}
    # Continued by another driver, from another working directory, with the path written differently.
    monkeypatch.chdir(out.parent)
    assert main(["sweep", "--out", "sweep", "--executor", "ray", *cmd[cmd.index("--alpha-t") :]]) == 0
    rows = sweep_rows(out / "runs.csv")
    assert len(rows) == 3 + 3 * 2
    for run, stamp in stamps.items():
        assert (out / "runs" / run / "metrics.json").stat().st_mtime_ns == stamp
