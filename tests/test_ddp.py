"""Data-parallel students under ``torchrun`` with 2 processes: identical ``lambda`` on every rank, and the
same run as a single process (the shards of each global batch and the all-reduced statistics add up to
the full batch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import cli_flags, rkd_env

from rkd_engine.training import StudentConfig, train_student

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = {"data": "synthetic:m=4,d=6,n=80", "imbalance": 5.0, "model": "mlp", "model_options": {"hidden_sizes": [16]}}
RUN = {"dro_every": 2, "epochs": 3, "batch_size": 16}  # the students' options, on the command line and in-process


def _torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = rkd_env()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "rkd_engine.cli",
        *args,
    ]
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return tiny_teacher(epochs=2, checkpoint_every=0, device="cpu", **DATA)


@pytest.mark.parametrize(
    ("method", "objective"),
    [("distill", "robust"), ("group-dro", "standard")],
)
def test_two_cpu_processes_agree(tmp_path, teacher, method, objective):
    options = {"teacher": str(teacher), "method": method, "objective": objective, **RUN, "device": "cpu"}
    out = tmp_path / "ddp"
    done = _torchrun("student", *cli_flags({**options, "checkpoint_every": 5}), "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    dist = metrics["distributed"]
    assert dist["world_size"] == 2
    rank0, rank1 = dist["dro_weights_per_rank"]
    assert rank0 == rank1, "lambda differs between the ranks"
    assert max(abs(w - 0.25) for w in rank0) > 1e-4, "lambda never moved"
    # One process over the same global batches ends at the same lambda, up to float rounding.
    single = train_student(
        StudentConfig(out=str(tmp_path / "single"), **options, checkpoint_every=0), quiet=True
    ).metrics
    torch.testing.assert_close(torch.tensor(rank0), torch.tensor(single["dro_weights"]), rtol=0, atol=1e-4)
    assert metrics["steps"] == single["steps"]


def test_batch_size_must_split_over_processes(tmp_path, teacher, monkeypatch):
    from rkd_engine.training import ConfigError, distributed

    monkeypatch.setattr(distributed, "setup", lambda device: distributed.DistContext(0, 2, torch.device("cpu")))
    cfg = StudentConfig(out=str(tmp_path / "s"), teacher=str(teacher), epochs=1, batch_size=15, device="cpu")
    with pytest.raises(ConfigError, match=r"--batch-size 15 must be divisible by the number of processes \(2\)"):
        train_student(cfg, quiet=True)
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for nccl")
def test_two_gpu_processes_agree(tmp_path, teacher):
    out = tmp_path / "ddp-gpu"
    options = {"teacher": str(teacher), "objective": "robust", **RUN, "device": "cuda"}
    done = _torchrun("student", *cli_flags(options), "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = json.loads((out / "metrics.json").read_text())["distributed"]["dro_weights_per_rank"]
    assert rank0 == rank1
