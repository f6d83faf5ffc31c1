"""Build of rkd-engine: the pure-Python package plus, where possible, its compiled extensions.

- ``rkd_engine._C`` (``csrc/cpu``): the fused CPU kernel, built whenever torch is importable at build time
  (so install with ``pip install --no-build-isolation``: the extension must be compiled against the torch
  it will run with).
- ``rkd_engine._C_cuda`` (``csrc/cuda``): built only where torch is a CUDA build and a CUDA toolkit is found
  (``CUDA_HOME``); a failure to compile it is reported and skipped, never fatal.

Without torch at build time (e.g. an isolated build) the package is installed without extensions and its
reference backend still works; ``rkd_engine.explain_backends()`` says what is missing. Metadata lives in
``pyproject.toml``; ``kernels/`` (Triton) ships as ``rkd_engine.kernels``.
"""

from __future__ import annotations

import glob
import os
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern: str) -> list[str]:
    """Sorted paths (relative to the repository root, as setuptools wants) matching ``pattern``."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _memory_gib() -> float:
    """Available memory in GiB (Linux); a generous guess elsewhere."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 16.0


def _set_max_jobs(gib_per_job: float) -> None:
    """Parallel compile jobs for ninja: at most one per core and one per ``gib_per_job`` of free memory."""
    if "MAX_JOBS" not in os.environ:
        jobs = max(1, min(os.cpu_count() or 1, int(_memory_gib() // gib_per_job)))
        os.environ["MAX_JOBS"] = str(jobs)


def _openmp_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags enabling OpenMP, which ``at::parallel_for`` needs to run in parallel."""
    if sys.platform.startswith("linux"):
        return ["-fopenmp"], ["-fopenmp"]
    if sys.platform == "win32":
        return ["/openmp"], []
    return [], []  # macOS: torch's own thread pool (ATen's native backend) runs at::parallel_for


def _extensions() -> tuple[list, dict]:
    """The extension modules to build and the ``cmdclass`` that builds them (none without torch)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        message = (
            f"rkd-engine: torch is not importable at build time ({exc}); installing the pure-Python package "
            "without the C++/CUDA extensions. Install torch first and build with `pip install "
            "--no-build-isolation .` to compile them."
        )
        warnings.warn(message, stacklevel=1)
        print("WARNING: " + message, file=sys.stderr)
        return [], {}

    class RkdBuildExt(BuildExtension):
        """BuildExtension (ninja) where an extension marked ``optional`` that fails to compile is skipped."""

        def build_extension(self, ext):
            if not getattr(ext, "optional", False):
                return super().build_extension(ext)
            try:
                return super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure of an optional extension
                message = f"rkd-engine: building the optional extension {ext.name} failed, skipping it: {exc}"
                warnings.warn(message, stacklevel=1)
                print("WARNING: " + message, file=sys.stderr)
                return None

    omp_compile, omp_link = _openmp_flags()
    # -g0: no debug information (it would make the library some 25 MB); add -g through CFLAGS to debug.
    optimise = ["/O2"] if sys.platform == "win32" else ["-O3", "-g0"]
    extensions = [
        CppExtension(
            "rkd_engine._C",
            sources=_rel("csrc/cpu/*.cpp"),
            include_dirs=[os.path.join(ROOT, "csrc", "cpu")],
            extra_compile_args={"cxx": optimise + omp_compile},
            extra_link_args=omp_link,
        )
    ]
    gib_per_job = 1.5
    cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    if torch.version.cuda is not None and CUDA_HOME is not None and cuda_sources:
        cuda = CUDAExtension(
            "rkd_engine._C_cuda",
            sources=cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc", "cuda")],
            extra_compile_args={
                "cxx": optimise,
                # sm_90 code plus compute_90 PTX (JIT-compiled by the driver on newer GPUs). No
                # --use_fast_math: it flushes denormals and approximates division/exp in ways that
                # break the inf/NaN contract; the kernels use fast intrinsics explicitly instead.
                "nvcc": [
                    "-O3",
                    "-lineinfo",
                    "--expt-relaxed-constexpr",
                    "-gencode=arch=compute_90,code=sm_90",
                    "-gencode=arch=compute_90,code=compute_90",
                ],
            },
        )
        cuda.optional = True
        extensions.append(cuda)
        gib_per_job = 4.0
    elif cuda_sources:
        reason = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit (CUDA_HOME) was found"
        print(f"rkd-engine: not building rkd_engine._C_cuda: {reason}", file=sys.stderr)
    _set_max_jobs(gib_per_job)
    return extensions, {"build_ext": RkdBuildExt.with_options(use_ninja=True)}


def _packages() -> tuple[list[str], dict[str, str]]:
    """``rkd_engine`` and its subpackages, plus the top-level ``kernels/`` as ``rkd_engine.kernels``."""
    packages = find_packages(where=ROOT, include=["rkd_engine", "rkd_engine.*"])
    package_dir = {}
    if os.path.isfile(os.path.join(ROOT, "kernels", "__init__.py")):
        packages.append("rkd_engine.kernels")
        package_dir["rkd_engine.kernels"] = "kernels"
    return packages, package_dir


ext_modules, cmdclass = _extensions()
packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
