"""The C++ sparse top-k entry point behind ``rkd_engine.ops.topk``: ``rkd_engine._C.topk_forward``
(``csrc/cpu/distill_topk*``), present when the extension was built with it."""

from __future__ import annotations

from torch import Tensor

from rkd_engine.ops import cpp_backend


def available() -> bool:
    """Whether the compiled extension has the top-k kernel."""
    module = cpp_backend._load()
    return module is not None and hasattr(module, "topk_forward")


def topk_forward(
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
    """``(loss, grad, mass, risk, error)`` as ``rkd_engine.ops.topk.sparse_topk_forward`` says."""
    grad_scale = cpp_backend.host_grad_scale(grad_scale, scale)
    return cpp_backend.with_kept_gradient(  # a dense (B, m) gradient, kept between calls as the dense kernel's
        lambda out: cpp_backend._require().topk_forward(
            student, indices, probs, labels, a, log_c, w, tau=float(tau), uniform=bool(uniform),
            grad_scale=float(grad_scale), need_grad=bool(need_grad), grad_out=out, ignore_index=int(ignore_index),
        ),
        student, need_grad, grad_out,
    )  # fmt: skip
