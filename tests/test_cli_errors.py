"""The CLI's errors (issue 10 items 1, 4, 13-16, 18, 24, 25; issue 11 item 5): one line for a user error,
a traceback with a hint where to report for a bug. Real ``rkd`` processes; a real SIGKILL for a failed start.

A few cases that need a fault the test cannot cause from outside (a full disk, a read-only directory
as root, a bug) run ``main`` in this process with the fault injected.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_flags, rkd_command, rkd_env, run_rkd, tiny_run

from rkd_engine.cli import main

TINY = [*cli_flags(tiny_run("synthetic:m=3,d=4,n=30", imbalance=2, hidden=8, epochs=1, eval_every=0)), "--quiet"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("RKD_DEBUG", raising=False)
    monkeypatch.delenv("RKD_BACKEND", raising=False)


def _one_line(proc: subprocess.CompletedProcess, status: int) -> str:
    """The single stderr line of a failed command (no traceback), after checking its exit status."""
    err = proc.stderr.strip()
    assert proc.returncode == status, (proc.returncode, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------ bad options and data
def _npz_cases(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = np.repeat(np.arange(3), 20)
    good = tmp_path / "good.npz"
    np.savez(good, x=x, y=y)
    files = {"truncated": tmp_path / "truncated.npz", "npy": tmp_path / "array.npz"}
    files["truncated"].write_bytes(good.read_bytes()[:300])
    np.save(tmp_path / "array.npy", x)
    (tmp_path / "array.npy").rename(files["npy"])
    files["random"] = tmp_path / "random.npz"
    files["random"].write_bytes(bytes(rng.integers(0, 256, 4096, dtype=np.uint8)))
    for name, label in (("huge", 10**12), ("big", 10**6)):
        files[name] = tmp_path / f"{name}.npz"
        np.savez(files[name], x=x, y=np.concatenate([y[:-1], [label]]))
    return files


def _main_one_line(capsys, argv: list[str], status: int) -> str:
    """``main(argv)`` in this process (same code path as the ``rkd`` script, without the start-up cost)."""
    assert main(argv) == status
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_npz_files_are_one_line(tmp_path, capsys):
    """Items 13, 18: a truncated npz, an npy or random bytes given as npz, labels of 10^12 (an 8 TB
    allocation) and 10^6 (a 7.9 MB message) were tracebacks or enormous. Two in real processes."""
    files = _npz_cases(tmp_path)
    for case, path in files.items():
        argv = ["teacher", *TINY, "--data", f"npz:{path}", "--out", str(tmp_path / "t")]
        if case in ("truncated", "huge"):
            err = _one_line(run_rkd(*argv), 2)
        else:
            err = _main_one_line(capsys, argv, 2)
        assert path.name in err and len(err) < 600, (case, err)
        assert not (tmp_path / "t").exists()  # nothing created for a run that cannot start


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--backend", "triton"], {}, "--backend triton"),
        (["--seed", "99999999999999999999999"], {}, "--seed"),
        (["--data", ""], {}, "--data"),
        ([], {"RKD_BACKEND": "bogus"}, "RKD_BACKEND=bogus"),
        (["--model-option", "bogus=1"], {}, "--model mlp"),
    ],
)
def test_bad_options_are_one_line_and_leave_no_run(tmp_path, monkeypatch, capsys, args, env, needle):
    """Items 13, 15, 18: a backend the machine lacks was a traceback after creating the run directory; the
    seed overflow did not name --seed; --data "" silently used digits; RKD_BACKEND was not named."""
    out = tmp_path / "t"
    argv = ["teacher", *TINY, *args, "--out", str(out)]
    if args[:1] == ["--backend"] or env:  # these two in real processes
        err = _one_line(run_rkd(*argv, env=rkd_env(**env)), 2)
    else:
        err = _main_one_line(capsys, argv, 2)
    assert needle in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_backend_cuda_without_gpu(tmp_path):
    err = _one_line(run_rkd("teacher", *TINY, "--backend", "cuda", "--out", str(tmp_path / "t")), 2)
    assert "--backend cuda" in err


def test_out_that_is_a_file_or_under_a_file(tmp_path, capsys):
    """Item 13: --out a file, or under a file, was a traceback."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert "not a directory" in _main_one_line(capsys, ["teacher", *TINY, "--out", str(afile)], 2)
    err = _one_line(run_rkd("teacher", *TINY, "--out", str(afile / "run")), 1)
    assert "afile" in err
    assert afile.read_text() == "mine"


def _fake_run(path: Path, config: object) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_damaged_run_config_and_wrong_command(tmp_path, capsys):
    """Items 13, 18: a config.json that is a list or lacks keys was a traceback; resuming a student run with
    `rkd teacher` gave an unrelated error."""
    listed = _fake_run(tmp_path / "listed", [1, 2])
    assert "must hold a JSON object" in _one_line(run_rkd("eval", str(listed)), 2)
    assert "must hold a JSON object" in _main_one_line(capsys, ["teacher", "--out", str(listed), "--resume"], 2)
    partial = _fake_run(tmp_path / "partial", {"model": "mlp"})
    assert "lacks the option(s) data" in _main_one_line(capsys, ["eval", str(partial)], 2)
    student = _fake_run(tmp_path / "student", {"teacher": "t", "method": "distill", "data": "digits"})
    assert "rkd student --out" in _one_line(run_rkd("teacher", "--out", str(student), "--resume"), 2)


def test_config_report_and_sweep_files(tmp_path, capsys):
    """Items 13, 18, 25: binary config, runs.csv without columns, `baselines: 5`, duplicate keys."""
    binary = tmp_path / "c.yaml"
    binary.write_bytes(bytes(range(256)))
    assert "c.yaml" in _one_line(run_rkd("teacher", "--config", str(binary), "--out", str(tmp_path / "t")), 2)
    dup = tmp_path / "d.yaml"
    dup.write_text("epochs: 1\nepochs: 2\n")
    assert "given twice" in _main_one_line(capsys, ["teacher", "--config", str(dup), "--out", str(tmp_path / "t")], 2)
    sweep = tmp_path / "s.yaml"
    sweep.write_text("baselines: 5\n")
    assert "baselines must be" in _one_line(run_rkd("sweep", "--config", str(sweep), "--out", str(tmp_path / "sw")), 2)
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "runs.csv").write_text("seed,alpha_t\n0,0.5\n")
    assert "lacks the column(s)" in _one_line(run_rkd("report", str(rep)), 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_eval_on_cuda_without_gpu_is_not_called_corrupt(tmp_path):
    """Item 1: `rkd eval RUN --device cuda` without a GPU said the good model.pt was corrupt."""
    out = tmp_path / "t"
    assert main(["teacher", *TINY, "--out", str(out)]) == 0
    err = _one_line(run_rkd("eval", str(out), "--device", "cuda"), 2)
    assert "no CUDA GPU" in err and "corrupt" not in err
    assert (out / "model.pt").exists()


# ------------------------------------------------------------------------------------------- run directories
def test_overwrite_refuses_a_foreign_directory(tmp_path):
    """Item 4: --overwrite deleted plots/, eval*.json and config.json of a directory rkd did not write."""
    out = tmp_path / "mine"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "a.png").write_bytes(b"png")
    (out / "config.json").write_text("{}")
    err = _one_line(run_rkd("teacher", *TINY, "--out", str(out), "--overwrite"), 2)
    assert "did not create" in err
    assert (out / "plots" / "a.png").exists() and (out / "config.json").read_text() == "{}"


def test_killed_before_its_first_checkpoint_the_corrected_command_runs(tmp_path):
    """Item 15 with a real SIGKILL: a run killed before saving anything no longer blocks a new start with
    other options ('already exists', then 'different options')."""
    out = tmp_path / "t"
    args = [*TINY, "--epochs", "400", "--checkpoint-every", "0", "--out", str(out)]
    proc = subprocess.Popen(
        rkd_command("teacher", *args),
        env=rkd_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").exists() or not (out / "log.jsonl").stat().st_size:
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (out / "checkpoint.pt").exists()
    fixed = run_rkd("teacher", *TINY, "--epochs", "1", "--out", str(out))
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads((out / "config.json").read_text())["epochs"] == 1


def test_resume_of_a_finished_run_without_checkpoint(tmp_path):
    """Item 16: --resume retrained a finished run whose checkpoint was deleted and deleted its eval files."""
    out = tmp_path / "t"
    assert main(["teacher", *TINY, "--out", str(out)]) == 0
    assert main(["eval", str(out)]) == 0
    (out / "checkpoint.pt").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = run_rkd("teacher", "--out", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "has finished; nothing to resume" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_divergence_is_one_line_with_advice(tmp_path):
    """Item 14: a NaN loss trained on and ended with 'logits_or_preds contains NaN' and exit status 2."""
    out = tmp_path / "t"
    args = [*TINY, "--epochs", "3", "--lr", "1e30", "--momentum", "0", "--warmup-epochs", "0", "--out", str(out)]
    err = _one_line(run_rkd("teacher", *args), 1)
    assert "training diverged at step" in err and "lower --lr" in err


# ------------------------------------------------------------------------ faults injected in this process
def test_full_disk_names_the_file_and_the_cause(tmp_path, monkeypatch, capsys):
    """Item 13: the disk-full message did not mention disk space."""
    import rkd_engine.training.runs as runs

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runs.os, "fsync", no_space)
    assert main(["teacher", *TINY, "--out", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "disk is full" in err and str(tmp_path / "t") in err


def test_eval_prints_before_writing(tmp_path, monkeypatch, capsys):
    """Item 13: `rkd eval` on a read-only run computed the metrics and lost them."""
    import rkd_engine.training.evaluation as evaluation

    out = tmp_path / "t"
    assert main(["teacher", *TINY, "--out", str(out)]) == 0

    def read_only(path: Path, obj: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(evaluation, "atomic_write_json", read_only)
    capsys.readouterr()
    assert main(["eval", str(out)]) == 1
    captured = capsys.readouterr()
    assert "worst" in captured.out and "per-class recall" in captured.out
    assert len(captured.err.strip().splitlines()) == 1 and "eval.json" in captured.err


@pytest.mark.parametrize("exc", [ValueError("a bug"), TypeError("a bug"), KeyError("a bug")])
def test_a_bug_shows_its_traceback_and_where_to_report(tmp_path, monkeypatch, capsys, exc):
    """Issue 11 item 5: a bug's ValueError/TypeError was turned into a one-line 'error' like a user's."""
    import rkd_engine.training.evaluation as evaluation

    def broken(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(evaluation, "evaluate_run", broken)
    _fake_run(tmp_path / "r", {"data": "digits"})
    assert main(["eval", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "a bug" in err and "internal error of rkd" in err and "report" in err
