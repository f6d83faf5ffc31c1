"""The sparse top-k teacher kernels behind ``rkd::distill_topk`` (``rkd_engine.wide``, docs/wide_heads.md).

A backend with a sparse top-k kernel reads the ``k`` (index, probability) pairs of each row and the
student row, and never forms a dense teacher. Its entry point is the module ``rkd_engine.ops.<name>_topk``
(found by name, as ``dispatch.backend_module`` finds ``<name>_backend``) with two functions:
``available() -> bool`` (whether the kernel is there: a compiled one may have been built without it) and
``topk_forward(...)`` (the signature and contract of ``sparse_topk_forward`` below, less ``backend``).
Today ``cpp`` (``cpp_topk``: ``rkd_engine._C.topk_forward``, ``csrc/cpu/distill_topk*``) and ``triton``
(``triton_topk``: ``rkd_engine.kernels.topk``). The others (``reference``, which is the executable
definition, and ``cuda``) expand the top-k target chunk by chunk into a dense one and run their dense
kernel (``rkd_engine.wide._expanded_topk``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

from torch import Tensor

from rkd_engine.ops.constants import BACKENDS
from rkd_engine.ops.op import acc_dtype

__all__ = ["SPARSE_TOPK_BACKENDS", "has_sparse_topk", "sparse_topk_forward", "topk_module"]


def _entry_point(backend: str) -> str:
    return f"rkd_engine.ops.{backend}_topk"


SPARSE_TOPK_BACKENDS: tuple[str, ...] = tuple(b for b in BACKENDS if importlib.util.find_spec(_entry_point(b)))
"""The backends that have a top-k entry point module (found, not imported)."""


@functools.cache
def topk_module(backend: str) -> ModuleType | None:
    """The top-k entry point of ``backend`` (imported lazily, memoised), ``None`` if it has none."""
    if backend not in BACKENDS:
        return None
    try:
        return importlib.import_module(_entry_point(backend))
    except ModuleNotFoundError as exc:
        if exc.name != _entry_point(backend):  # the module is there, one of its imports is not
            raise
        return None


def has_sparse_topk(backend: str) -> bool:
    """Whether ``backend`` has a sparse top-k kernel here (the C++ one needs an extension built with it)."""
    module = topk_module(backend)
    return module is not None and module.available()


def sparse_topk_forward(
    backend: str,
    student: Tensor,
    indices: Tensor,
    probs: Tensor,
    uniform: bool,
    labels: Tensor | None,
    a: Tensor,
    log_c: Tensor | None,
    w: Tensor | None,
    *,
    tau: float,
    grad_scale: float,
    need_grad: bool,
    grad_out: Tensor | None = None,
    ignore_index: int = -100,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss (B,), grad (B, m), mass, risk, error (m,))`` with the top-k teacher ``(indices, probs)``.

    The contract of a backend's ``fused_forward`` with ``teacher_is_probs=True`` and the dense top-k target
    (``rkd_engine.reference.topk_target``) as the teacher: ``grad`` is ``grad_scale * scale * dloss/df`` in
    the student dtype (into ``grad_out`` when given, which may be ``student`` itself), the rest in the
    accumulation dtype. ``indices`` (B, k) int64, ``probs`` (B, k) any float dtype, both already checked.
    """
    module = topk_module(backend)
    if module is None:
        raise ValueError(f"backend {backend!r} has no sparse top-k kernel (those that do: {SPARSE_TOPK_BACKENDS})")
    probs = probs.to(acc_dtype(student.dtype)).contiguous()
    return module.topk_forward(
        student, indices, probs, uniform, labels, a, log_c, w, tau=tau, grad_scale=grad_scale,
        need_grad=need_grad, grad_out=grad_out, ignore_index=ignore_index, scale=scale,
    )  # fmt: skip
