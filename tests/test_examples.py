"""The examples run as a user would run them, and show what they claim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_plain_loop_example():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "plain_loop.py")],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    worst = {
        name: float(value)
        for name, value in re.findall(
            r"^(\w[\w ()]*?)\s+average\s+[\d.]+%\s+worst-class\s+([\d.]+)%", done.stdout, re.MULTILINE
        )
    }
    assert set(worst) == {"teacher (balanced)", "standard student", "robust student"}, done.stdout
    # The robust student's worst class beats standard distillation's on this long-tailed mixture.
    assert worst["robust student"] > worst["standard student"] + 5.0, done.stdout
    weights = re.search(r"final lambda: \[(.*)\]", done.stdout).group(1)
    assert abs(sum(float(w) for w in weights.split(",")) - 1.0) < 1e-2


def _run_python(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` offline, one thread, with the repository importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _run_example(name: str) -> str:
    done = _run_python([str(ROOT / "examples" / name)])
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _worst_by_objective(stdout: str) -> dict[str, float]:
    found = re.findall(
        r"^\s*(standard|robust) student\s+accuracy [\d.]+%\s+worst-class ([\d.]+)%", stdout, re.MULTILINE
    )
    return {name: float(value) for name, value in found}


@pytest.mark.parametrize(
    ("example", "framework"), [("hf_trainer.py", "transformers"), ("distill_lightning.py", "lightning")]
)
def test_framework_examples(example, framework):
    pytest.importorskip(framework)
    stdout = _run_example(example)
    worst = _worst_by_objective(stdout)
    assert set(worst) == {"standard", "robust"}, stdout
    # The robust student's worst class beats the standard student's on the long-tailed data.
    assert worst["robust"] > worst["standard"] + 10.0, stdout


def _readme_snippets(heading: str) -> list[str]:
    """The Python blocks of one README section (from ``heading`` to the next ``## `` heading)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.DOTALL)


@pytest.mark.slow
def test_readme_integration_examples_run_as_written(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    snippets = _readme_snippets("## In your own stack")
    assert len(snippets) == 4
    for code in snippets:
        done = _run_python(["-c", code], cwd=tmp_path)
        assert done.returncode == 0, f"{code}\n{done.stderr[-3000:]}"
