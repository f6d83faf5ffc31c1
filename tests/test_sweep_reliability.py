"""``rkd sweep`` reliability (issue 10, items 3, 5, 6, 7, 8, 9, 27): stopping with Ctrl-C and SIGTERM, locks,
reports of partial sweeps, paths relative to the sweep directory, typed options, checks before writing,
a killed worker. Signals are real ``kill``s of real ``rkd sweep`` processes."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SWEEP_FAST, fake_sweep_row, sweep_rows

from rkd_engine.cli import main
from rkd_engine.training import sweep as sweep_mod
from rkd_engine.training.locks import DirLock
from rkd_engine.training.report import write_report
from rkd_engine.training.sweep import CSV_COLUMNS, make_spec, plan

ROOT = Path(__file__).resolve().parents[1]
FAST = SWEEP_FAST
TINY = ["--alpha-t", "1", "--alpha-s", "1", "--seeds", "1", "--baselines", "none", "--quiet", *FAST]
# Twelve runs long enough (a few seconds each) for a signal to land in the middle of some.
SLOW = ["--alpha-t", "0,1", "--alpha-s", "0,1", "--seeds", "1", "--baselines", "none", "--workers", "2", "--quiet"]
SLOW += [*FAST, "--set", "epochs=60", "--set", "checkpoint_every=20"]


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _workers(pid: int) -> list[int]:
    """The sweep's worker processes (spawned interpreters, not multiprocessing's resource tracker)."""
    found = []
    for child in _children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "spawn_main" in cmdline:
            found.append(child)
    return found


def _start(out: Path, extra: list[str] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rkd_engine.cli", "sweep", "--out", str(out), *SLOW, *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # A terminal's foreground process starts with Ctrl-C at its default action; the test process may have
    # inherited SIGINT ignored from something earlier in the session, which the child would inherit in turn
    # (Python then installs no KeyboardInterrupt handler and the ctrl-c case sees the sweep finish instead).
    return subprocess.Popen(
        cmd,
        env=env,
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_until_training(proc: subprocess.Popen, out: Path, runs: int = 1) -> None:
    """Until ``runs`` runs have written a checkpoint and at least one other run is training."""
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        started = list((out / "runs").rglob("checkpoint.pt")) if (out / "runs").exists() else []
        if len(started) >= runs and len(_workers(proc.pid)) == 2:
            return
        time.sleep(0.05)
    pytest.fail("the sweep did not start training in 300 s")


# ----------------------------------------------------------------------------------------- item 3
@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_stops_the_sweep_at_once_and_leaves_no_process(tmp_path, how):
    out = tmp_path / "sweep"
    proc = _start(out)
    try:
        _wait_until_training(proc, out)
        workers = _workers(proc.pid)
        before = set(sweep_rows(out / "runs.csv"))
        if how == "ctrl-c":  # a terminal's Ctrl-C: SIGINT to the whole foreground process group
            os.killpg(proc.pid, signal.SIGINT)
        else:  # SIGTERM to the sweep process alone (a scheduler, `kill PID`)
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the sweep was still running 20 s after {how}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, proc.stderr.read()
    assert "interrupted" in proc.stderr.read()
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "worker processes outlived the sweep"
    # At most the runs that were already finishing complete after the signal (the old pool took new ones).
    after = set(sweep_rows(out / "runs.csv"))
    assert len(after - before) <= 2
    if how == "sigterm":
        # The state is resumable: the same command finishes the sweep, finished runs untouched.
        stamps = {r: (out / "runs" / r / "metrics.json").stat().st_mtime_ns for r in after}
        again = _start(out)
        assert again.wait(timeout=600) == 0, again.stderr.read()
        assert len(sweep_rows(out / "runs.csv")) == 12
        assert all((out / "runs" / r / "metrics.json").stat().st_mtime_ns == s for r, s in stamps.items())


# ---------------------------------------------------------------------------------------- item 27
@pytest.mark.slow
def test_a_killed_worker_fails_only_its_run(tmp_path):
    out = tmp_path / "sweep"
    proc = _start(out)
    try:
        _wait_until_training(proc, out, runs=3)
        victim = _workers(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=600) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = proc.stderr.read()
    assert "its worker process died (killed by SIGKILL)" in err, err
    failed = int(re.search(r"(\d+) run\(s\) of the sweep failed", err).group(1))
    rows = sweep_rows(out / "runs.csv")
    # The killed run failed (with its students, if it was a teacher); every other run finished.
    assert failed in (1, 4) and len(rows) == 12 - failed, err
    again = _start(out)
    assert again.wait(timeout=600) == 0, again.stderr.read()
    assert len(sweep_rows(out / "runs.csv")) == 12


# ----------------------------------------------------------------------------------------- item 5
def test_a_locked_sweep_directory_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "sweep"
    with DirLock(out, ".sweep.lock", what="the sweep", command="rkd sweep --out elsewhere").acquire():
        assert main(["sweep", "--out", str(out), "--epochs", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert f"is in use by process {os.getpid()} on host" in err and "rkd sweep --out elsewhere" in err
    assert not (out / "runs").exists() and not (out / "sweep.json").exists()


def test_a_locked_run_is_not_trained_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_mod, "RUN_LOCK_WAIT", 0.3)
    job = next(j for j in plan(make_spec({"alpha_t": "1", "alpha_s": "1", "seeds": 1})) if j.command == "teacher")
    with DirLock(tmp_path / ".locks" / "seed0", "teacher-standard.lock", what="x", command="another worker").acquire():
        outcome = sweep_mod.execute_job(tmp_path, job)
    assert not outcome.ok and f"in use by process {os.getpid()}" in outcome.error and "another worker" in outcome.error
    assert not (tmp_path / "runs").exists()  # nothing trained


# ----------------------------------------------------------------------------------------- item 6
def test_report_of_a_partial_sweep_says_so_and_shows_seed_counts(tmp_path, capsys):
    spec = make_spec({"alpha_t": "0", "alpha_s": "0", "seeds": 2, "baselines": "none"})
    (tmp_path / "sweep.json").write_text(json.dumps(spec.to_dict()))
    rows = []
    for seed in (0, 1):
        rows.append(fake_sweep_row("teacher", "standard", "", None, seed, 0.8, 0.2, 0.8, 0.2))
        rows.append(fake_sweep_row("student", "standard", "standard", 1.0, seed, 0.8, 0.2, 0.8, 0.2))
    rows.append(fake_sweep_row("student", "standard", "a0", 1.0, 0, 0.7, 0.5, 0.7, 0.5))  # seed 1 not finished
    with open(tmp_path / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    result = write_report(tmp_path, quiet=True)
    assert result["incomplete"]
    text = (tmp_path / "report.md").read_text()
    assert "the sweep is incomplete: 5 of 12 runs have finished" in text
    assert "70.0 / 50.0 (n=1)" in text and "80.0 ± 0.0 / 20.0 ± 0.0 |" in text
    assert "incomplete" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- items 7, 8
def test_a_sweep_continues_from_another_directory_and_path(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert main(["sweep", "--out", "sweep", "--epochs", "2", *TINY, "--workers", "1"]) == 0
    # Kill-like state: a student and a teacher that started but did not finish.
    for run in ("seed0/g1/a1__a1", "seed0/teacher-a1"):
        (tmp_path / "a/sweep/runs" / run / "metrics.json").unlink()
    # Continued from elsewhere, with an absolute path, and the epochs given another way (typed: 2 == "2").
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "sweep.yaml"
    config.write_text("common:\n  epochs: 2\n")
    args = ["sweep", "--out", str(tmp_path / "a" / "sweep"), "--config", str(config), *TINY, "--workers", "1"]
    assert main(args) == 0
    # Moved to another place and continued again.
    (tmp_path / "a/sweep/runs/seed0/g1/standard__a1/metrics.json").unlink()
    os.rename(tmp_path / "a" / "sweep", tmp_path / "moved")
    assert main(["sweep", "--out", "moved", "--set", "epochs=2", *TINY, "--workers", "1"]) == 0
    rows = sweep_rows(tmp_path / "moved" / "runs.csv")
    assert len(rows) == 6 and all(r["epochs"] == "2" for r in rows.values())


def test_typed_options_equal_their_text(tmp_path):
    out = str(tmp_path / "sweep")
    assert main(["sweep", "--out", out, "--set", "epochs=1", "--set", "lr=0.05", *TINY, "--workers", "1"]) == 0
    assert main(["sweep", "--out", out, "--epochs", "1", "--set", "lr=5e-2", *TINY, "--workers", "1"]) == 0
    assert main(["sweep", "--out", out, "--epochs", "1", "--set", "lr=0.06", *TINY, "--workers", "1"]) == 2


# ----------------------------------------------------------------------------------------- item 9
@pytest.mark.parametrize(
    "flags, named",
    [
        (["--set", "model=mlpp"], "model 'mlpp'"),
        (["--student-set", "model=resnet7"], "students' model 'resnet7'"),
        (["--set", "model_options={width: 3}"], "unexpected keyword argument"),
        (["--data", "npz:no/such/file.npz"], "--data npz:"),
        (["--data", "cifar10:no/such/dir"], "--data cifar10:"),
    ],
)
def test_everything_is_checked_before_anything_is_written(tmp_path, capsys, flags, named):
    out = tmp_path / "sweep"
    args = ["sweep", "--out", str(out), "--alpha-t", "1", "--alpha-s", "1", "--seeds", "1", "--baselines", "none"]
    assert main([*args, "--quiet", "--set", "model=mlp", "--set", "epochs=1", *flags]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------- executors
@pytest.mark.parametrize(
    "flags, named",
    [
        (["--executor", "slurm"], "--executor must be local or ray, got 'slurm'"),
        (["--cpus-per-run", "2"], "--cpus-per-run only apply to --executor ray"),
        (["--executor", "ray", "--gpus-per-run", "-1"], "--gpus-per-run must be a number >= 0"),
        (["--executor", "ray", "--cpus-per-run", "0"], "--cpus-per-run must be a number > 0"),
        (["--executor", "ray", "--device", "cuda", "--gpus-per-run", "0"], "--device cuda needs --gpus-per-run > 0"),
    ],
)
def test_executor_options_are_checked_before_anything_is_written(tmp_path, capsys, flags, named):
    if "ray" in flags:
        pytest.importorskip("ray")
    out = tmp_path / "sweep"
    assert main(["sweep", "--out", str(out), "--epochs", "1", *TINY, *flags]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_ray_executor_without_ray_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["sweep", "--out", str(tmp_path / "sweep"), "--epochs", "1", *TINY, "--executor", "ray"]) == 2
    assert "pip install 'rkd-engine[ray]'" in capsys.readouterr().err


def test_a_relative_data_path_is_resolved_where_the_sweep_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert make_spec({"data": "npz:data/x.npz"}).data == f"npz:{tmp_path / 'data' / 'x.npz'}"
    assert make_spec({"data": "cifar10:c10"}).data == f"cifar10:{tmp_path / 'c10'}"
    assert make_spec({"data": "synthetic:m=3"}).data == "synthetic:m=3"
