"""What the benchmark scripts share: this checkout on the import path, timing, peak memory, the machine
and the result files.

Every script in ``benchmarks/`` imports from here before it imports ``rkd_engine``. Run as
``python benchmarks/bench_loss.py`` from the repository root or as ``python bench_loss.py`` from
``benchmarks/``, Python puts the script's own folder first on the import path, so ``_common`` (and the other
scripts) are found there; importing this module then puts the repository root on the path, so that
``rkd_engine`` is this checkout's, installed or not. It is the one place that edits ``sys.path``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], None], device: str, *, min_reps: int = 10, min_seconds: float = 1.0) -> list[float]:
    """Per-call times in milliseconds: ``triton.testing.do_bench`` on GPU, a repeated timer on CPU."""
    if device == "cuda":
        import triton.testing

        return [float(t) for t in triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="all")]
    for _ in range(3):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 2000:
            break
    return times


def load_average() -> float:
    """The machine's 1-minute load average (NaN where the system has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# -------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory above the starting point while the block runs (CUDA allocator, or the process's
    resident set on CPU via ``/proc/self/clear_refs``). On CPU this is only meaningful in a process
    started with ``MALLOC_MMAP_THRESHOLD_`` set, so that large buffers go back to the system when freed:
    the timings run without it (that setting makes every large allocation fault its pages in afresh,
    which no training loop pays), and ``bench_loss.cpu_peaks`` measures peak memory in a child process."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_bytes: int | None = None

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
                self._base = self._status("VmRSS:")
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        elif self._base is not None:
            self.peak_bytes = self._status("VmHWM:") - self._base


# --------------------------------------------------------------------------------- machine and results
def environment(device: str) -> dict[str, str]:
    """The run's date, versions (torch, Python, rkd, Triton), intra-op threads and device name."""
    import rkd_engine

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rkd": rkd_engine.__version__,
        "threads": str(torch.get_num_threads()),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "absent"
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
    else:
        env["device_name"] = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
            env["device_name"] = f"{names[0]} x{len(names)}" if names else env["device_name"]
        except OSError:
            pass
    return env


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_results(rows_out: list[dict], meta: dict, stem: Path) -> None:
    """``stem.csv`` (one line per row) and ``stem.json`` (``meta`` and the rows)."""
    with open(f"{stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows_out[0]))
        writer.writeheader()
        writer.writerows(rows_out)
    with open(f"{stem}.json", "w") as fh:
        json.dump({**meta, "rows": rows_out}, fh, indent=1)
