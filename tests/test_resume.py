"""Resume after a kill: a real ``rkd`` process killed with SIGKILL mid-epoch, then ``--resume``d, ends
exactly like a run that was never stopped (same metrics.json, same log, same weights)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import rkd_command, rkd_env, run_rkd

from rkd_engine.training import TeacherConfig, train_teacher

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        rkd_command(*args), env=rkd_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _wait(proc: subprocess.Popen, timeout: float = 300) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err


def _kill_after_first_checkpoint(args: list[str], run_dir: Path, timeout: float = 120) -> None:
    proc = subprocess.Popen(rkd_command(*args), env=rkd_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not (run_dir / "checkpoint.pt").exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before its first checkpoint: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint appeared in time")
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists(), "the run finished before it was killed: make it longer"


def _compare(killed: Path, clean: Path) -> None:
    ck = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert json.loads((killed / "metrics.json").read_text()) == json.loads((clean / "metrics.json").read_text())
    log_a = [json.loads(x) for x in (killed / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (clean / "log.jsonl").read_text().splitlines()]
    assert log_a == log_b
    a = torch.load(killed / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(clean / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ck["step"] == json.loads((clean / "metrics.json").read_text())["steps"]


def _mid_epoch_checkpoint(run_dir: Path) -> dict:
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert 0 < ck["batch"], f"expected a checkpoint inside an epoch, got {ck['step']=} {ck['epoch']=} {ck['batch']=}"
    return ck


def _kill_resume_and_compare(args: list[str], tmp_path: Path) -> dict:
    """``rkd ARGS`` killed after its first checkpoint (inside an epoch) and resumed ends like the same run
    never stopped; returns that mid-epoch checkpoint."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    uninterrupted = _start(*args, "--out", str(clean))
    _kill_after_first_checkpoint([*args, "--out", str(killed)], killed)
    ck = _mid_epoch_checkpoint(killed)
    resumed = run_rkd(*args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _wait(uninterrupted)
    _compare(killed, clean)
    return ck


def test_teacher_killed_mid_epoch_resumes_exactly(tmp_path):
    # 312 training rows, batch 16: 20 steps an epoch, 300 in all; checkpoints every 37 steps fall inside epochs.
    args = [
        "teacher",
        "--data",
        "synthetic:m=5,d=10,n=200",
        "--imbalance",
        "5",
        "--model",
        "mlp",
        "--model-option",
        "hidden_sizes=[32]",
        "--objective",
        "robust",
        "--dro-every",
        "3",
        "--batch-size",
        "16",
        "--epochs",
        "15",
        "--checkpoint-every",
        "37",
        "--device",
        "cpu",
        "--quiet",
    ]
    ck = _kill_resume_and_compare(args, tmp_path)
    assert ck["step"] < 300


def test_student_with_augmentation_killed_mid_epoch_resumes_exactly(tmp_path, tiny_teacher):
    """Teacher outputs on the fly under augmentation, the augmentation generator restored mid-epoch."""
    teacher = tiny_teacher(
        data="digits", model="mlp", model_options={"hidden_sizes": [32]}, epochs=2, checkpoint_every=0, device="cpu"
    )
    # digits, rho = 10: 461 training rows, batch 32: 15 steps an epoch, 300 in all; checkpoints every 23 steps.
    args = [
        "student",
        "--teacher",
        str(teacher),
        "--objective",
        "robust",
        "--augment",
        "on",
        "--gamma",
        "2",
        "--dro-every",
        "4",
        "--batch-size",
        "32",
        "--epochs",
        "20",
        "--checkpoint-every",
        "23",
        "--device",
        "cpu",
        "--quiet",
    ]
    ck = _kill_resume_and_compare(args, tmp_path)
    assert ck["augment_generator"] is not None


class _Interrupted(Exception):
    pass


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_interrupted_run_resumes_in_process(tmp_path, monkeypatch, device, kind):
    """The same check in one process (and on every device): stop the run right after its second checkpoint."""
    from rkd_engine.training import StudentConfig, engine, train_student

    common = {
        "model": "mlp",
        "model_options": {"hidden_sizes": [32]},
        "objective": "robust",
        "dro_every": 3,
        "batch_size": 32,
        "epochs": 4,
        "checkpoint_every": 11,
        "device": device,
    }
    if kind == "teacher":

        def run(out, **kw):
            return train_teacher(TeacherConfig(out=str(out), data="digits", **common), quiet=True, **kw)
    else:
        teacher = tmp_path / "teacher"
        train_teacher(TeacherConfig(out=str(teacher), data="digits", **{**common, "objective": "standard"}), quiet=True)

        def run(out, **kw):
            cfg = StudentConfig(out=str(out), teacher=str(teacher), augment="on", gamma=2.0, **common)
            return train_student(cfg, quiet=True, **kw)

    clean = run(tmp_path / "clean").metrics
    original = engine._Run._save_checkpoint
    saved = []

    def save_then_stop(self):
        original(self)
        saved.append(self.step)
        if len(saved) == 2:
            raise _Interrupted

    monkeypatch.setattr(engine._Run, "_save_checkpoint", save_then_stop)
    with pytest.raises(_Interrupted):
        run(tmp_path / "stopped")
    monkeypatch.undo()
    assert saved == [11, 22]  # 15 steps an epoch: both checkpoints inside an epoch
    resumed = run(tmp_path / "stopped", resume=True).metrics
    if device == "cpu":
        assert resumed == clean
    else:  # GPU reductions may differ in the last bits between runs
        torch.testing.assert_close(
            torch.tensor(resumed["dro_weights"]), torch.tensor(clean["dro_weights"]), rtol=0, atol=1e-3
        )
        assert abs(resumed["test"]["accuracy"] - clean["test"]["accuracy"]) <= 0.02
