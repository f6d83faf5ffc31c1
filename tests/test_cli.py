"""The ``rkd`` command line: help, config files and flags, one-line errors with exit status 2, eval, demo."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, cli_flags, tiny_run

from rkd_engine.cli import main

TINY = [*cli_flags(tiny_run("synthetic:m=4,d=6,n=40", imbalance=5, epochs=2, checkpoint_every=0)), "--quiet"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("RKD_DEBUG", raising=False)


def _error(capsys, argv: list[str], status: int = 2) -> str:
    assert main(argv) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["teacher", "--help"],
        ["student", "--help"],
        ["eval", "--help"],
        ["demo", "--help"],
        ["sweep", "--help"],
        ["report", "--help"],
    ],
)
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    if argv[0] in ("teacher", "student"):
        for option in ("--objective", "--epochs", "--config", "--resume", "--device", "--backend", "--seed"):
            assert option in out
    if argv[0] == "student":
        for option in (
            "--teacher",
            "--method",
            "--gamma",
            "--val-labels",
            "hinton",
            "post-shift",
            "group-dro",
            "ada-alpha",
            "ada-margin",
            "torchrun",
        ):
            assert option in out
    if argv[0] == "sweep":
        for option in (
            "--alpha-t",
            "--alpha-s",
            "--gamma",
            "--seeds",
            "--baselines",
            "--workers",
            "--set",
            "rkd report",
        ):
            assert option in out


def test_runnable_as_module(monkeypatch, capsys):
    """``python -m rkd_engine.cli`` (what torchrun runs) in a fresh process; ``python -m rkd_engine`` in this one."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-m", "rkd_engine.cli", "--help"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "rkd teacher" in done.stdout, done.stderr
    monkeypatch.setattr(sys, "argv", ["rkd", "demo", "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("rkd_engine", run_name="__main__")
    assert info.value.code == 0 and "Table 1 grid" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["teacher", "--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
        (["teacher", "--epochs", "two"], "--epochs must be an integer, got 'two'"),
        (["teacher", "--objective", "best"], "--objective must be one of standard, balanced, robust, tradeoff"),
        (["teacher", "--objective", "tradeoff"], "--alpha must be a number in [0, 1]"),
        (["teacher", "--objective", "robust", "--alpha", "0.5"], "--alpha is only used with --objective tradeoff"),
        (["teacher", "--lr", "-1"], "--lr must be a number > 0"),
        (["teacher", "--device", "tpu"], "--device must be one of auto, cpu, cuda"),
        (["teacher", "--model-option", "width"], "--model-options must be KEY=VALUE"),
        (["teacher", "--resume"], "--resume needs --out RUN_DIR"),
        (["student", "--objective", "robust"], "--teacher RUN_DIR is required"),
        (["student", "--teacher", "/nonexistent/run"], "is not a run directory"),
        (
            ["student", "--method", "distill", "--teacher-weight", "0.5", "--teacher", "x"],
            "--teacher-weight is used by",
        ),
        (["student", "--method", "teach"], "--method must be one of distill, hinton"),
        (["teacher", "--nonsense", "1"], "unrecognized arguments: --nonsense 1"),
        (["eval", "/nonexistent/run"], "is not a run directory"),
        (["demo", "--seeds", "0"], "--seeds must be an integer >= 1"),
    ],
)
def test_bad_options_give_one_line_and_status_2(capsys, argv, message):
    if argv[0] == "teacher" and "--nonsense" in argv:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
        return
    err = _error(capsys, argv)
    assert message in err
    assert "Traceback" not in err


def test_bad_model_and_data(capsys, tmp_path):
    err = _error(capsys, ["teacher", *TINY, "--model", "cnn", "--out", str(tmp_path / "a")])
    assert "--model cnn" in err and "image" in err
    err = _error(capsys, ["teacher", "--data", "cifar10:/nonexistent", "--out", str(tmp_path / "b")])
    assert "cifar" in err.lower()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(capsys, tmp_path):
    assert "no CUDA GPU" in _error(capsys, ["teacher", "--device", "cuda", "--out", str(tmp_path / "t")])


def test_config_file_and_flag_precedence(capsys, tmp_path):
    yaml_file = tmp_path / "teacher.yaml"
    yaml_file.write_text("objective: balanced\nepochs: 3\nbatch-size: 16\nlr_decay_at: [0.4, 0.8]\n")
    out = tmp_path / "t"
    assert main(["teacher", "--config", str(yaml_file), *TINY, "--epochs", "1", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == "balanced"  # from the file
    assert config["epochs"] == 1  # the flag wins
    assert config["lr_decay_at"] == [0.4, 0.8]
    assert config["model_options"] == {"hidden_sizes": [16]}

    json_file = tmp_path / "student.json"
    json_file.write_text(json.dumps({"teacher": str(out), "objective": "robust", "dro_every": 2, "epochs": 1}))
    assert (
        main(["student", "--config", str(json_file), "--out", str(tmp_path / "s"), "--device", "cpu", "--quiet"]) == 0
    )
    student = json.loads((tmp_path / "s" / "config.json").read_text())
    assert student["objective"] == "robust" and student["data"] == config["data"]


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ("epochs: [1, 2\n", ".yaml", "not valid YAML"),
        ("{'epochs': 1}", ".json", "not valid JSON"),
        ("- 1\n- 2\n", ".yaml", "expected a mapping"),
        ("epoch: 3\n", ".yaml", "unknown option 'epoch'"),
        ("epochs: 2.5\n", ".yml", "--epochs must be an integer"),
        ("alpha: 2\nobjective: tradeoff\n", ".yaml", "--alpha must be a number in [0, 1]"),
    ],
)
def test_bad_config_files(capsys, tmp_path, text, suffix, message):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    assert message in _error(capsys, ["teacher", "--config", str(path), "--out", str(tmp_path / "t")])


def test_missing_config_file(capsys, tmp_path):
    assert "cannot read it" in _error(capsys, ["teacher", "--config", str(tmp_path / "none.yaml")])


def test_train_eval_and_run_dir_errors(capsys, tmp_path):
    out = tmp_path / "t"
    assert main(["teacher", *TINY, "--objective", "robust", "--dro-every", "2", "--out", str(out)]) == 0
    assert "already exists: pass --resume" in _error(capsys, ["teacher", *TINY, "--out", str(out)])
    assert "--resume and --overwrite" in _error(
        capsys, ["teacher", *TINY, "--out", str(out), "--resume", "--overwrite"]
    )
    assert "different options (--epochs 2 -> 3)" in _error(
        capsys, ["teacher", *TINY, "--epochs", "3", "--out", str(out), "--resume"]
    )
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "worst" in printed and "per-class recall" in printed
    report = json.loads((out / "eval.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert report["test"] == metrics["test"]
    # A damaged checkpoint of an unfinished run: a clear one-line error, exit status 1.
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    (out / "metrics.json").rename(out / "metrics.saved")
    assert "corrupt or truncated" in _error(capsys, ["teacher", "--out", str(out), "--resume", "--quiet"], status=1)
    (out / "metrics.saved").rename(out / "metrics.json")
    (out / "model.pt").write_bytes(b"\x00" * 10)
    assert "corrupt or truncated" in _error(capsys, ["eval", str(out)], status=1)


def test_demo_smoke(capsys, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "1", "--epochs", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "teacher alone" in printed and "robust student" in printed
    results = json.loads((out / "results.json").read_text())
    objectives = ("standard", "balanced", "robust")
    for t in objectives:
        for s in ("none", *objectives):
            entry = results[f"{t}/{s}"]
            assert {"average", "balanced", "worst", "per_class"} <= set(entry)
            assert 0 <= entry["worst"] <= entry["balanced"] <= 1 and len(entry["per_class"]) == 10
    assert results["check"]["best_teacher"] in objectives
    assert (out / "pareto.png").stat().st_size > 1000
