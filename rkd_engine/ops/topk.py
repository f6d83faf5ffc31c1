"""The sparse top-k teacher kernels behind ``rkd::distill_topk`` (``rkd_engine.wide``, docs/wide_heads.md).

A backend listed here reads the ``k`` (index, probability) pairs of each row and the student row, and
never forms a dense teacher: ``cpp`` (``rkd_engine._C.topk_forward``, ``csrc/cpu/distill_topk*``) and
``triton`` (``rkd_engine.kernels.topk``). The others (``reference``, which is the executable definition,
and ``cuda``) expand the top-k target chunk by chunk into a dense one and run their dense kernel
(``rkd_engine.wide._expanded_topk``).
"""

from __future__ import annotations

from torch import Tensor

from rkd_engine.ops.op import acc_dtype

__all__ = ["SPARSE_TOPK_BACKENDS", "has_sparse_topk", "sparse_topk_forward"]

SPARSE_TOPK_BACKENDS: tuple[str, ...] = ("cpp", "triton")


def has_sparse_topk(backend: str) -> bool:
    """Whether ``backend`` has a sparse top-k kernel here (the C++ one needs an extension built with it)."""
    if backend == "cpp":
        from rkd_engine.ops import cpp_backend

        module = cpp_backend._load()
        return module is not None and hasattr(module, "topk_forward")
    return backend == "triton"


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
    probs = probs.to(acc_dtype(student.dtype)).contiguous()
    if backend == "cpp":
        from rkd_engine.ops import cpp_backend

        if scale is not None:  # a 0-d CPU tensor: reading it is free
            grad_scale = float(grad_scale) * float(scale)
        return tuple(
            cpp_backend._require().topk_forward(
                student, indices, probs, labels, a, log_c, w, tau=float(tau), uniform=bool(uniform),
                grad_scale=float(grad_scale), need_grad=bool(need_grad), grad_out=grad_out,
                ignore_index=int(ignore_index),
            )
        )  # fmt: skip
    if backend == "triton":
        from rkd_engine.ops import triton_topk

        return triton_topk.topk_forward(
            student, indices, probs, uniform, labels, a, log_c, w, tau=tau, grad_scale=grad_scale,
            need_grad=need_grad, grad_out=grad_out, ignore_index=ignore_index, scale=scale,
        )  # fmt: skip
    raise ValueError(f"backend {backend!r} has no sparse top-k kernel (those that do: {SPARSE_TOPK_BACKENDS})")
