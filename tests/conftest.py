"""Shared test helpers: the (backend, device) pairs present here, input regimes, the tolerance table, tiny
training runs (options, command-line flags, teachers trained once per session) and ``rkd`` subprocesses."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

# Without a GPU, Triton's interpreter runs the Triton kernels on CPU tensors (tests/test_triton_backend.py).
# Triton reads TRITON_INTERPRET when triton.language is first imported, which importing torch._dynamo
# already does, so it is set here, before rkd_engine is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rkd_engine.ops import explain_backends

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- tolerances
class Tolerance(NamedTuple):
    """How close a result in one input dtype must come to the float64 reference (``rkd_engine.reference``).

    ``value``: (rtol, atol) for values of order 1 (loss, gradient, statistics per row) from any backend;
    callers scale ``atol`` by the largest magnitude where values are larger.
    ``cpu``: the C++ kernels' relative tolerances (accumulated values: loss and statistics, gradient);
    ``atol`` is the same fraction of the tensor's largest magnitude.
    ``gpu_grad``: the CUDA kernels' gradient (rtol, atol as a fraction of the largest magnitude); one
    rounding to the dtype costs 2^-24, 2^-9, 2^-11 relative (float32, bfloat16, float16). None where the
    CUDA kernels take no such input.
    """

    value: tuple[float, float]
    cpu: tuple[float, float]
    gpu_grad: tuple[float, float] | None


# The one tolerance table of the tests, per input dtype.
TOLERANCE_TABLE = {
    torch.float64: Tolerance(value=(1e-9, 1e-10), cpu=(1e-10, 1e-10), gpu_grad=None),
    torch.float32: Tolerance(value=(2e-5, 2e-5), cpu=(2e-5, 2e-5), gpu_grad=(3e-5, 3e-6)),
    torch.float16: Tolerance(value=(4e-3, 4e-3), cpu=(2e-5, 1e-3), gpu_grad=(2e-3, 1e-4)),
    torch.bfloat16: Tolerance(value=(2e-2, 2e-2), cpu=(2e-5, 8e-3), gpu_grad=(8e-3, 2e-4)),
}
# The CUDA kernels' loss, mass, risk and error (rtol, atol as a fraction of the largest magnitude): fp32
# math whatever the input dtype.
GPU_STAT_TOL = (5e-5, 5e-6)

# Views of the table in the forms the tests use.
TOLERANCES = {dtype: dict(rtol=row.value[0], atol=row.value[1]) for dtype, row in TOLERANCE_TABLE.items()}
CPU_TOL = {dtype: row.cpu for dtype, row in TOLERANCE_TABLE.items()}
GPU_GRAD_TOL = {dtype: row.gpu_grad for dtype, row in TOLERANCE_TABLE.items() if row.gpu_grad is not None}


def backend_devices(*, triton_interpreter: bool = False) -> list:
    """Every (backend, device) pair that can run here; GPU pairs only where a GPU is present.

    The Triton interpreter (CPU) is exercised in tests/test_triton_backend.py on small shapes only, and
    added here (``triton-interpreter``) with ``triton_interpreter=True`` where it can run.
    """
    pairs = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for name, reason in explain_backends(device, torch.float32, 16).items():
            if reason is None and not (name == "triton" and device == "cpu"):
                pairs.append(pytest.param(name, device, id=f"{name}-{device}"))
    if triton_interpreter and os.environ.get("TRITON_INTERPRET") == "1":
        from rkd_engine.ops import triton_backend

        if triton_backend.unavailable_reason("cpu", torch.float32, 8) is None:
            pairs.append(pytest.param("triton", "cpu", id="triton-interpreter"))
    return pairs


# For tests whose inputs are meant to be non-finite: NumPy's warnings about them are expected.
NONFINITE_WARNINGS = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]


def make_inputs(rows: int, m: int, dtype: torch.dtype, device: str, regime: str, seed: int):
    """Student and teacher scores and labels for one input regime (see CONTRIBUTING.md, Tests)."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(rows, m, generator=gen, dtype=torch.float64)
    g = torch.randn(rows, m, generator=gen, dtype=torch.float64)
    y = torch.randint(0, m, (rows,), generator=gen)
    if regime == "peaked":
        f = f * 15
        g = g * 15
    elif regime == "equal":
        g = f.clone()
    elif regime == "huge":
        f = f + 1e4
        g = g * 30 - 1e4
    elif regime == "masked" and m > 1:
        masked = torch.rand(m, generator=gen) < 0.3
        masked[0] = False
        g[:, masked] = float("-inf")
        y = torch.where(masked[y], torch.zeros_like(y), y)
    return f.to(dtype).to(device), g.to(dtype).to(device), y.to(device)


# ------------------------------------------------------------------------------------- tiny training runs
@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and does not spin against other work on a busy machine.

    Modules that train use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_run(data: str | None = None, *, hidden: int = 16, **options: Any) -> dict[str, Any]:
    """Options of a tiny MLP run on the CPU (the point is the bookkeeping, not the accuracy): batch 16,
    one hidden layer of ``hidden`` units, ``options`` added or replacing these."""
    run = {} if data is None else {"data": data}
    run.update(model="mlp", model_options={"hidden_sizes": [hidden]}, batch_size=16, device="cpu")
    return {**run, **options}


def cli_flags(options: dict[str, Any]) -> list[str]:
    """``rkd teacher``/``student`` flags for run options: ``{"batch_size": 16}`` -> ``--batch-size 16``,
    ``{"model_options": {"hidden_sizes": [8]}}`` -> ``--model-option hidden_sizes=[8]``."""
    flags = []
    for name, value in options.items():
        if name == "model_options":
            for key, option in value.items():
                flags += ["--model-option", f"{key}={json.dumps(option)}"]
        else:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


# ``rkd sweep`` options for tiny runs.
SWEEP_FAST = ["--set", "model=mlp", "--set", "model_options={hidden_sizes: [16]}", "--set", "dro_every=2"]


def sweep_rows(path: Path) -> dict[str, dict[str, str]]:
    """The rows of a sweep's ``runs.csv`` by run name (none while the file does not exist)."""
    if not path.exists():
        return {}
    with open(path, newline="") as fh:
        return {row["run"]: row for row in csv.DictReader(fh)}


def kill_sweep_after(cmd: list[str], out: Path, runs: int, *, timeout: float, cwd: Path | None = None) -> set[str]:
    """Start the ``rkd sweep`` command ``cmd`` (writing the sweep directory ``out``) in a session of its own,
    wait until ``runs`` runs have finished (rows in ``runs.csv``), then SIGKILL the whole session: the
    sweep and its workers, mid-run. Fails the test if the sweep ends first or ``timeout`` s pass.
    Returns the runs finished by then."""
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True, cwd=cwd)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            ended = proc.poll() is not None
            if len(sweep_rows(out / "runs.csv")) >= runs:
                break
            if ended:
                pytest.fail(f"the sweep ended (status {proc.returncode}) before {runs} runs finished")
            time.sleep(0.1)
        else:
            pytest.fail(f"the sweep did not finish {runs} runs in {timeout:g} s")
    finally:
        with contextlib.suppress(ProcessLookupError):  # none left in the session if it ended by itself
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return set(sweep_rows(out / "runs.csv"))


@pytest.fixture(scope="session")
def tiny_dataset():
    """``tiny_dataset(spec, **options)``: ``load_dataset(spec, **options)``, loaded once per session.

    Tests must not change the dataset they get."""
    from rkd_engine.data import load_dataset

    loaded = {}

    def get(spec: str, **options: Any):
        key = (spec, json.dumps(options, sort_keys=True))
        if key not in loaded:
            loaded[key] = load_dataset(spec, **options)
        return loaded[key]

    return get


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """``tiny_teacher(dataset=None, **config)``: the directory of a teacher run with this ``TeacherConfig``
    (``out`` excepted), trained once per session with one thread. Tests must not write into it."""
    from rkd_engine.training import TeacherConfig, train_teacher

    trained = {}

    def get(dataset=None, **config: Any) -> Path:
        key = json.dumps(config, sort_keys=True)
        if key not in trained:
            out = tmp_path_factory.mktemp("teacher") / "t"
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                train_teacher(TeacherConfig(out=str(out), **config), dataset=dataset, quiet=True)
            finally:
                torch.set_num_threads(threads)
            trained[key] = out
        return trained[key]

    return get


# A tiny digits teacher (one epoch, batch 64): the options of its run.
DIGITS_TEACHER = tiny_run("digits", imbalance=10.0, epochs=1, batch_size=64, dro_every=2, checkpoint_every=0)


@pytest.fixture(scope="session")
def digits(tiny_dataset):
    """Long-tailed digits (rho = 10, seed 0), loaded once per session."""
    return tiny_dataset("digits", imbalance=10.0, seed=0)


@pytest.fixture(scope="session")
def digits_teacher(tiny_teacher, digits) -> Path:
    """The directory of a tiny teacher run on ``digits`` (``DIGITS_TEACHER``), trained once per session."""
    return tiny_teacher(digits, **DIGITS_TEACHER)


def fake_sweep_row(kind, teacher, student, gamma, seed, val_avg, val_worst, test_avg, test_worst) -> dict:
    """A runs.csv row of a finished run with these accuracies (the rest of its columns empty)."""
    from rkd_engine.training.sweep import CSV_COLUMNS

    row = {c: "" for c in CSV_COLUMNS}
    row.update(
        run=f"{seed}/{teacher}/{student}/{gamma}",
        kind=kind,
        seed=seed,
        teacher=teacher,
        student=student,
        gamma="" if gamma is None else gamma,
        method="distill",
        val_average=val_avg,
        val_balanced=val_avg,
        val_worst=val_worst,
        val_worst_k=val_worst,
        test_average=test_avg,
        test_balanced=test_avg,
        test_worst=test_worst,
        test_worst_k=test_worst,
        test_recall=json.dumps([test_worst, test_avg]),
    )
    return row


# ------------------------------------------------------------------------------------------ data files
def write_cifar_batch(path: Path, labels, *, label_key: bytes = b"labels", marker: int = 0, protocol: int = 2) -> None:
    """One batch in the format of the official python-pickle CIFAR files (bytes keys, uint8 rows)."""
    rng = np.random.default_rng(len(labels))
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    data[:, 0] = marker  # red channel, pixel (0, 0): tells the test batch from the training batches
    batch = {
        b"batch_label": b"batch",
        label_key: list(labels),
        b"data": data,
        b"filenames": [b"x.png"] * len(labels),
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)


def write_cifar10(folder: Path, per_class_per_batch: int = 4) -> None:
    """A CIFAR-10 folder of five training batches and a test batch (3 images a class), random pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", np.repeat(np.arange(10), per_class_per_batch))
    write_cifar_batch(folder / "test_batch", np.repeat(np.arange(10), 3), marker=255)


# ---------------------------------------------------------------------------------------- benchmarks
def load_benchmark(name: str):
    """The script ``benchmarks/NAME.py`` as a module, imported as Python imports it when the script runs:
    with ``benchmarks/`` on the import path, so that it finds ``_common`` and the other scripts."""
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ rkd subprocesses
def rkd_env(**extra: str) -> dict[str, str]:
    """The environment of an ``rkd`` subprocess: this checkout first on the path, one thread, no RKD_DEBUG,
    RKD_BACKEND or TRITON_INTERPRET inherited from the test run; ``extra`` added."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("RKD_DEBUG", "RKD_BACKEND", "TRITON_INTERPRET"):
        env.pop(name, None)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def rkd_command(*args: str) -> list[str]:
    """The command line of ``rkd ARGS`` run by this interpreter."""
    return [sys.executable, "-m", "rkd_engine.cli", *args]


def run_rkd(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``rkd ARGS`` in a subprocess, to its end; its output captured as text."""
    return subprocess.run(
        rkd_command(*args), check=False, env=env or rkd_env(), capture_output=True, text=True, timeout=timeout
    )
