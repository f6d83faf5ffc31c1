"""The CUDA kernels compile for sm_90 with nvcc alone (no GPU, no CUDA build of torch): a CI check on CPU machines.

``csrc/cuda/distill_kernels.cu`` is compiled with the flags setup.py gives nvcc (plus the half/bfloat16
restrictions torch's CUDAExtension adds), warnings as errors; its ptxas report must show no register
spills. The kernel sources must not include torch, so that this check needs only the CUDA toolkit.
Skipped, with the reason, where no nvcc is found (PATH, CUDA_HOME, CUDA_PATH, /usr/local/cuda/bin).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
KERNEL_SOURCES = (CUDA_DIR / "distill_kernels.cu", CUDA_DIR / "distill_kernels.h")
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "--expt-relaxed-constexpr",
    # torch.utils.cpp_extension.CUDAExtension compiles with these: no implicit half/bfloat16 conversions.
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "-gencode=arch=compute_90,code=sm_90",
    "-Werror=all-warnings",
    "-Xcompiler=-Wall,-Wextra,-Werror",
    "--resource-usage",
]


def _nvcc() -> str | None:
    """Path of nvcc: PATH first, then $CUDA_HOME/bin, $CUDA_PATH/bin and /usr/local/cuda/bin."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


def test_kernel_sources_include_no_torch():
    """Only the CUDA toolkit and the C++ standard library: the device code must build without torch."""
    forbidden = re.compile(r"#\s*include\s*[<\"](torch|ATen|c10|pybind11|Python)\b")
    for path in KERNEL_SOURCES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not forbidden.search(line), f"{path.name}:{number} includes a torch header: {line.strip()}"


@pytest.fixture(scope="module")
def ptxas_report(tmp_path_factory) -> str:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found in PATH, $CUDA_HOME/bin, $CUDA_PATH/bin or /usr/local/cuda/bin")
    out = tmp_path_factory.mktemp("nvcc") / "distill_kernels.o"
    cmd = [nvcc, *NVCC_FLAGS, "-c", str(KERNEL_SOURCES[0]), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{report[-8000:]}"
    assert out.stat().st_size > 0
    return report


def test_kernels_compile_for_sm90(ptxas_report):
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_90'", ptxas_report)
    for name in (
        "resident_kernel",
        "stream_rows_kernel",
        "finalize_rows_kernel",
        "stream_tiles_kernel",
        "column_sum_kernel",
        "scale_rows_kernel",
    ):
        assert any(name in k for k in kernels), f"no sm_90 code for {name}; ptxas compiled {kernels}"


def test_no_register_spills(ptxas_report):
    """Spills to local memory would slow the memory-bound kernels; the launch shapes are chosen to avoid them."""
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_report)
    assert spills, "ptxas printed no resource usage"
    names = re.findall(r"Function properties for (\w+)", ptxas_report)
    spilling = [name for name, (stores, loads) in zip(names, spills, strict=True) if int(stores) or int(loads)]
    assert not spilling, f"kernels that spill registers: {spilling}"
