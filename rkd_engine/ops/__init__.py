"""Ops and their dispatch.

Four layers (CONTRIBUTING.md): raw kernels (``kernels/`` Triton, ``csrc/`` C++ and CUDA), launchers (one
module per backend here: ``reference_backend``, ``cpp_backend``, ``triton_backend``,
``cuda_backend``, all with the same contract as ``rkd_engine.reference.fused_rows``), the
``rkd::distill`` custom op (``op.py``) and the user API (``rkd_engine.losses``).
"""

from rkd_engine.ops.dispatch import BACKENDS, available_backends, backend_module, explain_backends, select_backend
from rkd_engine.ops.op import REDUCTIONS, acc_dtype, distill

__all__ = [
    "BACKENDS",
    "REDUCTIONS",
    "acc_dtype",
    "available_backends",
    "backend_module",
    "distill",
    "explain_backends",
    "select_backend",
]
