"""Wide heads: sparse top-k teachers and the output layer fused with the loss (docs/wide_heads.md).

Two ops on top of the fused per-row kernel of every backend (``fused_forward``, docs/loss.md):

- ``rkd::distill_topk``: the loss of ``distill_loss(..., teacher_topk=(indices, probs))``. Row ``i``
  gives ``k`` distinct classes ``K_i`` and their (already tempered) probabilities ``p_ij``; the target is
  ``p~_ij = p_ij / sum_{K_i} p_ik`` on ``K_i`` (``"renormalize"``) or ``p_ij`` on ``K_i`` and
  ``(1 - sum_{K_i} p_ik) / (m - k)`` elsewhere (``"uniform"``), then ``q_i = (1 - a_i) e_{y_i} + a_i p~_i``
  as for a dense teacher. On the C++ and Triton backends a sparse kernel reads the ``k`` entries of each
  row and the student row (``rkd_engine.ops.topk``): no dense teacher is formed. Elsewhere (``reference``,
  the executable definition, and ``cuda``) the dense ``p~`` of a chunk of rows is written into one reused
  buffer and the backend's dense kernel runs on that chunk in its ``teacher_probs`` mode
  (``_expanded_topk``). Either way loss, gradient and statistics are exactly those of the target.
- ``rkd::fused_linear_distill``: ``fused_linear_distill_loss``. Chunk of rows by chunk, the student's
  scores ``f = X W^T + b`` (one matrix product into a reused buffer), the teacher's (dense logits, top-k,
  or its own head ``g = X_t W_t^T + b_t`` under no grad), the fused kernel, which overwrites the scores
  with ``G = dloss/df`` (already divided by the normaliser), then ``dX = G W``, ``dW += G^T X``,
  ``db += sum_i G_i`` (``dW``, ``db`` in fp32 across chunks, rounded once). The gradients are computed in
  the forward and saved; the backward scales them by the incoming gradient. No (B, m) matrix exists.

The chunk loops are the only Python loops here: over chunks of rows, never over rows or classes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rkd_engine.losses import LossOutput, RobustDistillationLoss
from rkd_engine.ops import acc_dtype, backend_module
from rkd_engine.ops.call import FLOAT_DTYPES as _FLOAT_DTYPES
from rkd_engine.ops.call import check_finite as _check_finite
from rkd_engine.ops.call import check_like as _check_like
from rkd_engine.ops.call import check_scores, describe_call
from rkd_engine.ops.call import check_tensor as _tensor
from rkd_engine.ops.checks import PROB_SUM_TOL as _PROB_SUM_TOL
from rkd_engine.ops.checks import PROB_SUM_UNCHECKED
from rkd_engine.ops.op import _mean_scale, call_fused
from rkd_engine.ops.topk import has_sparse_topk, sparse_topk_forward

__all__ = [
    "TOPK_TAILS",
    "FusedLinearDistillationLoss",
    "fused_linear_distill_loss",
    "topk_distill_loss",
]

TOPK_TAILS: tuple[str, ...] = ("renormalize", "uniform")

# Rows per chunk of the top-k expansion (backends without a sparse top-k kernel; on CPU the reference).
# Each chunk costs one call of the kernel (a parallel region,
# per-call workspaces): on the shared 2-core EPYC, loaded, at (4096, 32000) fp32 and k = 128, chunks of
# 32 / 128 / 512 rows took 10.3 / 5.6 / 5.0 s a step (dense teacher logits: 3.9 s), so chunks are large.
_TOPK_CPU_CHUNK_BYTES = 64 << 20
# Elsewhere (GPU) a chunk only bounds memory: 256 MiB of dense target at most.
_TOPK_DEVICE_CHUNK_BYTES = 256 << 20
# Rows per chunk of the fused output layer: the scores of a chunk (and the teacher's) take about this much.
_LINEAR_CHUNK_BYTES = 32 << 20


def _rows_per_chunk(total_bytes: int, m: int, elem: int, rows: int, minimum: int = 8) -> int:
    return max(1, min(rows, max(minimum, total_bytes // max(1, m * elem))))


def _no_grad_input(name: str, t: Tensor, what: str) -> None:
    if t.requires_grad:
        raise ValueError(f"{name} requires grad, but {what}: pass {name}.detach()")


# ------------------------------------------------------------------------------------------ arguments
def _topk_args(
    teacher_topk: object, topk_tail: str, rows: int, m: int, device: torch.device, ref: str, check_values: bool
) -> tuple[Tensor, Tensor, bool]:
    """``(indices (B, k) int64, probs (B, k), uniform_tail)`` from ``teacher_topk``, checked."""
    if topk_tail not in TOPK_TAILS:
        raise ValueError(f"topk_tail must be one of {TOPK_TAILS}, got {topk_tail!r}")
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError("teacher_topk must be a pair (indices, probs) of (B, k) tensors")
    indices = _tensor("teacher_topk indices", teacher_topk[0])
    probs = _tensor("teacher_topk probs", teacher_topk[1])
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"teacher_topk indices must be an integer tensor, got {indices.dtype}")
    if indices.dim() != 2 or indices.shape[0] != rows:
        raise ValueError(f"teacher_topk indices must have shape ({rows}, k), got {tuple(indices.shape)}")
    k = indices.shape[1]
    if not 1 <= k <= m:
        raise ValueError(f"teacher_topk must give 1 <= k <= m = {m} classes per row, got k = {k}")
    _check_like("teacher_topk probs", probs, (rows, k), device, ref)
    if indices.device != device:
        raise ValueError(f"teacher_topk indices is on {indices.device} but {ref} is on {device}")
    if probs.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"teacher_topk probs must be a floating-point tensor, got {probs.dtype}")
    _no_grad_input("teacher_topk probs", probs, "the loss is differentiated only in the student")
    uniform = topk_tail == "uniform"
    if check_values:
        if (indices < 0).any() or (indices >= m).any():
            raise ValueError(
                f"teacher_topk indices must lie in [0, {m}), got values in [{int(indices.min())}, {int(indices.max())}]"
            )
        if k > 1:
            ordered = indices.sort(dim=-1).values
            if (ordered[:, 1:] == ordered[:, :-1]).any():
                raise ValueError("teacher_topk indices must be distinct within each row (found a repeated class)")
        _check_finite("teacher_topk probs", probs)
        if (probs < 0).any():
            raise ValueError("teacher_topk probs must be >= 0 everywhere")
        sums = probs.to(acc_dtype(probs.dtype)).sum(-1)
        if (sums > 1 + _PROB_SUM_TOL[probs.dtype]).any():
            raise ValueError(
                f"teacher_topk probs rows must sum to at most 1, got a row summing to {float(sums.max()):.6g}"
            )
        if not uniform and (sums <= 0).any():
            raise ValueError("teacher_topk probs: a row sums to 0, which topk_tail='renormalize' cannot renormalise")
    return indices.to(torch.int64).contiguous(), probs.contiguous(), uniform


# ------------------------------------------------------------------------------------- top-k target
def _topk_parts(probs: Tensor, uniform: bool, m: int, acc: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The target on ``K_i`` (B, k) and the uniform tail value per row (B,) (``None`` for renormalize)."""
    p = probs.to(acc)
    total = p.sum(-1)
    if not uniform:
        return p / total.unsqueeze(-1), None
    k = p.shape[-1]
    tail = (1 - total).clamp_min(0) / (m - k) if m > k else torch.zeros_like(total)
    return p, tail


def _expand_topk_(buf: Tensor, indices: Tensor, values: Tensor, tail: Tensor | None) -> Tensor:
    """Write the dense target of a chunk of rows into ``buf`` (chunk, m): the tail, then the top k.

    Without a tail (``"renormalize"``) ``buf`` must be all zero on entry (``_clear_topk_`` restores that
    after use), so only ``k`` entries a row are written, not ``m``.
    """
    if tail is not None:
        buf.copy_(tail.unsqueeze(-1).expand_as(buf))
    return buf.scatter_(1, indices, values)


def _clear_topk_(buf: Tensor, indices: Tensor, tail: Tensor | None) -> None:
    """Zero what ``_expand_topk_`` wrote into a zero buffer (nothing to do where a tail refills it)."""
    if tail is None:
        buf.scatter_(1, indices, 0.0)


def _topk_chunk(device: torch.device, m: int, elem: int, rows: int) -> int:
    budget = _TOPK_CPU_CHUNK_BYTES if device.type == "cpu" else _TOPK_DEVICE_CHUNK_BYTES
    return _rows_per_chunk(budget, m, elem, rows, minimum=1)


def _reduce(loss_rows: Tensor, reduction: str, grad_scale: float, scale: Tensor | None) -> Tensor:
    """The loss of ``reduction`` from per-row losses (``grad_scale``, ``scale``: the mean's ``_mean_scale``)."""
    if reduction == "mean":
        return loss_rows.sum() * (grad_scale if scale is None else scale)
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows


def _expanded_topk(student, indices, probs, uniform, labels, a, log_c, w, tau, need_grad, backend, chunk, ignore_index,
                   grad_scale, scale, grad_out=None):  # fmt: skip
    """The top-k loss through a backend's dense kernel: the dense target of a chunk of rows at a time is written
    into one reused buffer (the ``reference`` backend's definition, and ``cuda``'s way)."""
    rows, m = student.shape
    module = backend_module(backend)
    values, tail = _topk_parts(probs, uniform, m, acc_dtype(student.dtype))
    values = values.to(student.dtype)
    tail = None if tail is None else tail.to(student.dtype)
    grad = (torch.empty_like(student) if grad_out is None else grad_out) if need_grad else student.new_empty(0)
    loss_rows = torch.empty(rows, dtype=acc_dtype(student.dtype), device=student.device)
    stats = [torch.zeros(m, dtype=loss_rows.dtype, device=student.device) for _ in range(3)]
    chunk = max(1, min(chunk, rows))
    buf = student.new_zeros(chunk, m) if tail is None else student.new_empty(chunk, m)
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        part = None if tail is None else tail[start:end]
        target = _expand_topk_(buf[: end - start], indices[start:end], values[start:end], part)
        out = module.fused_forward(
            student[start:end], target, None if labels is None else labels[start:end], a[start:end], log_c, w,
            gamma=1.0, tau=tau, teacher_is_probs=True, grad_scale=grad_scale, need_grad=need_grad,
            grad_out=grad[start:end] if need_grad else None, ignore_index=ignore_index, scale=scale,
            prob_tol=PROB_SUM_UNCHECKED,  # a top-k target sums to less than 1 where there is no tail
        )  # fmt: skip
        _clear_topk_(target, indices[start:end], part)
        loss_rows[start:end] = out[0]
        for acc, new in zip(stats, out[2:], strict=True):
            acc += new
    return loss_rows, grad, *stats


def _topk_forward(
    student, indices, probs, uniform, labels, a, log_c, w, tau, reduction, need_grad, backend, chunk,
    ignore_index, normalizer, normalizer_t,
):  # fmt: skip
    """The body of ``rkd::distill_topk``: the backend's sparse kernel where it has one, else the expansion."""
    grad_scale, scale = 1.0, None
    if reduction == "mean":
        grad_scale, scale = _mean_scale(student, labels, ignore_index, normalizer, normalizer_t)
    if has_sparse_topk(backend):
        loss_rows, grad, mass, risk, error = sparse_topk_forward(
            backend, student, indices, probs, uniform, labels, a, log_c, w, tau=tau, grad_scale=grad_scale,
            need_grad=need_grad, ignore_index=ignore_index, scale=scale,
        )  # fmt: skip
    else:
        loss_rows, grad, mass, risk, error = _expanded_topk(
            student, indices, probs, uniform, labels, a, log_c, w, tau, need_grad, backend, chunk, ignore_index,
            grad_scale, scale,
        )  # fmt: skip
    return _reduce(loss_rows, reduction, grad_scale, scale), grad, mass, risk, error


@torch.library.custom_op("rkd::distill_topk", mutates_args=())
def distill_topk(
    student: Tensor,
    indices: Tensor,
    probs: Tensor,
    uniform_tail: bool,
    labels: Tensor | None,
    a: Tensor,
    log_c: Tensor | None,
    w: Tensor | None,
    tau: float,
    reduction: str,
    need_grad: bool,
    backend: str,
    chunk_rows: int,
    ignore_index: int = -100,
    normalizer: float = 0.0,
    normalizer_t: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused loss with a top-k teacher (reduced), its saved gradient, and ``mass``, ``risk``, ``error``.

    ``ignore_index``, ``normalizer`` and ``normalizer_t`` as in ``rkd::distill``.
    """
    return _topk_forward(
        student, indices, probs, uniform_tail, labels, a, log_c, w, tau, reduction, need_grad, backend, chunk_rows,
        ignore_index, normalizer, normalizer_t,
    )  # fmt: skip


@distill_topk.register_fake
def _distill_topk_fake(student, indices, probs, uniform_tail, labels, a, log_c, w, tau, reduction, need_grad, *_):
    rows, m = student.shape
    acc = acc_dtype(student.dtype)
    loss = student.new_empty((rows,) if reduction == "none" else (), dtype=acc)
    grad = student.new_empty((rows, m) if need_grad else (0,))
    return (loss, grad, *(student.new_empty((m,), dtype=acc) for _ in range(3)))


def _unit_upstream(g: Tensor) -> bool:
    """``g`` is the CPU scalar 1 of ``loss.backward()`` in plain eager mode (reading it costs nothing there)."""
    return (
        g.dim() == 0
        and g.device.type == "cpu"
        and type(g) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(g)
        and g.item() == 1.0
    )


def _scaled(saved: Tensor, g: Tensor) -> Tensor:
    """``saved * g`` (``g`` a scalar, or per row for ``saved`` of shape (B, ...)); ``saved`` itself when ``g`` is 1."""
    if _unit_upstream(g):
        return saved
    g = g.to(saved.dtype)
    return saved * (g if g.dim() == 0 else g.reshape(-1, *([1] * (saved.dim() - 1))))


def _topk_setup(ctx, inputs, output):
    ctx.need_grad = inputs[10]
    ctx.save_for_backward(output[1])
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1], output[2], output[3], output[4])


def _topk_backward(ctx, g_loss, *_):
    nones = (None,) * 15
    if g_loss is None:
        return (None, *nones)
    if not ctx.need_grad:
        raise RuntimeError("rkd::distill_topk was called without computing the gradient (need_grad=False)")
    (grad,) = ctx.saved_tensors
    return (_scaled(grad, g_loss), *nones)


distill_topk.register_autograd(_topk_backward, setup_context=_topk_setup)


def topk_distill_loss(
    student_logits: Tensor,
    teacher_topk: tuple[Tensor, Tensor],
    *,
    topk_tail: str = "renormalize",
    labels: Tensor | None = None,
    teacher_weight: float | Tensor | None = None,
    class_costs: Tensor | None = None,
    class_weights: Tensor | None = None,
    student_temperature: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
    ignore_index: int = -100,
    normalizer: float | Tensor | None = None,
    chunk_rows: int | None = None,
) -> LossOutput:
    """``distill_loss`` with a sparse top-k teacher: see ``distill_loss(..., teacher_topk=...)``.

    ``chunk_rows`` sets how many rows of the dense target are formed at a time (default: a few MiB on
    CPU, sized for the cache; 256 MiB elsewhere).
    """
    student_logits = check_scores("student_logits", student_logits)
    rows, m = student_logits.shape
    device = student_logits.device
    call = describe_call(
        rows, m, device, student_logits.dtype, "student_logits", labels=labels, has_teacher=True,
        teacher_names="a teacher", teacher_weight=teacher_weight, class_costs=class_costs,
        class_weights=class_weights, temperature=1.0, student_temperature=student_temperature, reduction=reduction,
        backend=backend, validate=validate, ignore_index=ignore_index, normalizer=normalizer, host_checks=True,
    )  # fmt: skip
    indices, probs, uniform = _topk_args(teacher_topk, topk_tail, rows, m, device, "student_logits", call.check_values)
    if call.check_values:
        _check_finite("student_logits", student_logits, allow_neg_inf=True)
    need_grad = student_logits.requires_grad and torch.is_grad_enabled()
    student = student_logits.contiguous()
    if call.a_const == 0.0:  # labels only: the teacher plays no part
        out = call_fused(call, student, None, False, need_grad)
    else:
        if chunk_rows is None:
            chunk_rows = _topk_chunk(device, m, student.element_size(), rows)
        elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
        out = distill_topk(
            student, indices, probs, uniform, call.labels, call.a, call.log_c, call.w, call.tau, call.reduction,
            need_grad, call.backend, chunk_rows, call.ignore_index, call.norm_value, call.norm_t,
        )  # fmt: skip
    loss, _grad, mass, risk, error = out
    return LossOutput(loss, mass, risk, error)


# ------------------------------------------------------------------------------ fused output layer
class _HeadGrads:
    """The gradients of the fused layer, chunk by chunk: ``dX = G W`` per chunk, ``dW += G^T X`` and
    ``db += sum_i G_i`` in the accumulation dtype across chunks, rounded once at the end."""

    def __init__(self, x: Tensor, weight: Tensor, bias: Tensor | None, need_input: bool, need_param: bool) -> None:
        acc = acc_dtype(x.dtype)
        self.x, self.weight, self.bias, self.acc = x, weight, bias, acc
        self.grad_x = torch.empty_like(x) if need_input else None
        self.grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_param else None
        self.grad_b = (
            torch.zeros(weight.shape[0], dtype=acc, device=x.device) if need_param and bias is not None else None
        )

    def add(self, g: Tensor, start: int, end: int) -> None:
        """Add the chunk of rows ``[start, end)`` whose score gradient is ``g``."""
        if self.grad_x is not None:
            torch.mm(g, self.weight, out=self.grad_x[start:end])
        if self.grad_w is not None:
            xs = self.x[start:end]
            if g.dtype == self.acc:
                self.grad_w.addmm_(g.t(), xs)
            else:  # bf16 / fp16: the product in fp32, so the sum over chunks is rounded once
                self.grad_w.addmm_(g.t().to(self.acc), xs.to(self.acc))
            if self.grad_b is not None:
                self.grad_b += g.sum(0, dtype=self.acc)

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(dX, dW, db)``, each an empty tensor where not computed."""
        grad_x = self.grad_x if self.grad_x is not None else self.x.new_empty(0)
        grad_w = self.grad_w.to(self.weight.dtype) if self.grad_w is not None else self.weight.new_empty(0)
        grad_b = self.grad_b.to(self.bias.dtype) if self.grad_b is not None else self.weight.new_empty(0)
        return grad_x, grad_w, grad_b


def _scores_(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``out = x W^T + b`` (one matrix product into ``out``)."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _linear_chunk(f, rows, teacher, topk, labels, a, log_c, w, gamma, tau, need_grad, backend, ignore_index,
                  grad_scale, scale):  # fmt: skip
    """The fused loss of one chunk of scores ``f`` (rows ``rows``), its gradient written over ``f``."""
    labels = None if labels is None else labels[rows]
    grad_out = f if need_grad else None  # G = dloss/df overwrites the scores
    if topk is not None:
        indices, probs, uniform = topk[0][rows], topk[1][rows], topk[2]
        if has_sparse_topk(backend):
            return sparse_topk_forward(
                backend, f, indices, probs, uniform, labels, a[rows], log_c, w, tau=tau, grad_scale=grad_scale,
                need_grad=need_grad, grad_out=grad_out, ignore_index=ignore_index, scale=scale,
            )  # fmt: skip
        return _expanded_topk(
            f, indices, probs, uniform, labels, a[rows], log_c, w, tau, need_grad, backend, f.shape[0],
            ignore_index, grad_scale, scale, grad_out=grad_out,
        )  # fmt: skip
    return backend_module(backend).fused_forward(
        f, teacher, labels, a[rows], log_c, w, gamma=gamma, tau=tau, teacher_is_probs=False, grad_scale=grad_scale,
        need_grad=need_grad, grad_out=grad_out, ignore_index=ignore_index, scale=scale,
    )  # fmt: skip


def _linear_forward(
    x, weight, bias, labels, a, log_c, w, teacher_logits, teacher_x, teacher_weight_, teacher_bias,
    indices, probs, uniform, gamma, tau, reduction, need_input_grad, need_param_grad, backend, chunk,
    ignore_index, normalizer, normalizer_t,
):  # fmt: skip
    rows, m = x.shape[0], weight.shape[0]
    acc = acc_dtype(x.dtype)
    grad_scale, scale = 1.0, None
    if reduction == "mean":
        grad_scale, scale = _mean_scale(x, labels, ignore_index, normalizer, normalizer_t)
    chunk = max(1, min(chunk, rows))
    scores = x.new_empty(chunk, m)
    teacher_buf = x.new_empty(chunk, m) if teacher_x is not None else None
    topk = None if indices is None else (indices, probs, uniform)
    grads = _HeadGrads(x, weight, bias, need_input_grad, need_param_grad)
    loss_rows = torch.empty(rows, dtype=acc, device=x.device)
    stats = [torch.zeros(m, dtype=acc, device=x.device) for _ in range(3)]
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        part = slice(start, end)
        f = _scores_(scores[: end - start], x[part], weight, bias)
        teacher = None
        if teacher_x is not None:
            teacher = _scores_(teacher_buf[: end - start], teacher_x[part], teacher_weight_, teacher_bias)
        elif teacher_logits is not None:
            teacher = teacher_logits[part]
        out = _linear_chunk(
            f, part, teacher, topk, labels, a, log_c, w, gamma, tau, need_input_grad or need_param_grad, backend,
            ignore_index, grad_scale, scale,
        )  # fmt: skip
        loss_rows[part] = out[0]
        for total, new in zip(stats, out[2:], strict=True):
            total += new
        grads.add(f, start, end)
    return _reduce(loss_rows, reduction, grad_scale, scale), *stats, *grads.result()


@torch.library.custom_op("rkd::fused_linear_distill", mutates_args=())
def fused_linear_distill(
    student_input: Tensor,
    student_head_weight: Tensor,
    student_head_bias: Tensor | None,
    labels: Tensor | None,
    a: Tensor,
    log_c: Tensor | None,
    w: Tensor | None,
    teacher_logits: Tensor | None,
    teacher_input: Tensor | None,
    teacher_head_weight: Tensor | None,
    teacher_head_bias: Tensor | None,
    topk_indices: Tensor | None,
    topk_probs: Tensor | None,
    uniform_tail: bool,
    gamma: float,
    tau: float,
    reduction: str,
    need_input_grad: bool,
    need_param_grad: bool,
    backend: str,
    chunk_size: int,
    ignore_index: int = -100,
    normalizer: float = 0.0,
    normalizer_t: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, mass, risk, error, dX, dW, db)`` of the linear output layer fused with the loss, by chunks of rows."""
    return _linear_forward(
        student_input, student_head_weight, student_head_bias, labels, a, log_c, w, teacher_logits, teacher_input,
        teacher_head_weight, teacher_head_bias, topk_indices, topk_probs, uniform_tail, gamma, tau, reduction,
        need_input_grad, need_param_grad, backend, chunk_size, ignore_index, normalizer, normalizer_t,
    )  # fmt: skip


@fused_linear_distill.register_fake
def _fused_linear_fake(x, weight, bias, *args):
    reduction, need_input_grad, need_param_grad = args[13], args[14], args[15]
    rows, m = x.shape[0], weight.shape[0]
    acc = acc_dtype(x.dtype)
    loss = x.new_empty((rows,) if reduction == "none" else (), dtype=acc)
    stats = [x.new_empty((m,), dtype=acc) for _ in range(3)]
    grad_x = x.new_empty(tuple(x.shape) if need_input_grad else (0,))
    grad_w = weight.new_empty(tuple(weight.shape) if need_param_grad else (0,))
    grad_b = weight.new_empty((m,) if need_param_grad and bias is not None else (0,))
    return (loss, *stats, grad_x, grad_w, grad_b)


def _linear_setup(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.need = (inputs[17], inputs[18])
    ctx.save_for_backward(output[4], output[5], output[6])
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])


def _linear_backward(ctx, g_loss, *_):
    nones = (None,) * 21
    if g_loss is None:
        return (None, None, None, *nones)
    if g_loss.dim() != 0:
        raise RuntimeError(
            "fused_linear_distill_loss with reduction='none' cannot be differentiated: the weight gradient is "
            "summed over rows in the forward; use reduction='mean' or 'sum'"
        )
    grad_x, grad_w, grad_b = ctx.saved_tensors
    need_input, need_param = ctx.need
    if not (need_input or need_param):
        raise RuntimeError("rkd::fused_linear_distill was called without computing the gradients")
    return (
        _scaled(grad_x, g_loss) if need_input else None,
        _scaled(grad_w, g_loss) if need_param else None,
        _scaled(grad_b, g_loss) if need_param and ctx.has_bias else None,
        *nones,
    )


fused_linear_distill.register_autograd(_linear_backward, setup_context=_linear_setup)


def _head(name: str, weight: object, bias: object, x: Tensor, x_name: str) -> tuple[Tensor, Tensor | None]:
    """Check a head ``(W (m, H), b (m,))`` in ``nn.Linear`` layout against its input ``x`` (B, H)."""
    weight = _tensor(f"{name}_weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{name}_weight must have shape (m, H) (nn.Linear layout), got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"{name}_weight must have shape (m, {x.shape[1]}) to match {x_name} of shape {tuple(x.shape)} "
            f"(nn.Linear layout: out_features x in_features), got {tuple(weight.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"{name}_weight is on {weight.device} but {x_name} is on {x.device}")
    if weight.dtype != x.dtype:
        raise ValueError(f"{name}_weight must have the dtype of {x_name} ({x.dtype}), got {weight.dtype}")
    if bias is not None:
        bias = _tensor(f"{name}_bias", bias)
        _check_like(f"{name}_bias", bias, (weight.shape[0],), x.device, x_name)
        if bias.dtype != x.dtype:
            raise ValueError(f"{name}_bias must have the dtype of {x_name} ({x.dtype}), got {bias.dtype}")
    return weight, bias


def _one_teacher(teacher_logits, teacher_input, teacher_topk, teacher_head_weight, teacher_head_bias) -> list[str]:
    """The names of the teachers given to the fused layer (at most one may be)."""
    given = [n for n, v in (("teacher_logits", teacher_logits), ("teacher_input", teacher_input),
                            ("teacher_topk", teacher_topk)) if v is not None]  # fmt: skip
    if len(given) > 1:
        raise ValueError(
            f"pass one teacher (teacher_logits, teacher_input + teacher_head_weight, or teacher_topk), got {given}"
        )
    if (teacher_head_weight is not None or teacher_head_bias is not None) and teacher_input is None:
        raise ValueError("teacher_head_weight / teacher_head_bias need teacher_input (the teacher's features)")
    return given


def _linear_teacher_args(x, m, teacher_logits, teacher_input, teacher_head_weight, teacher_head_bias, teacher_topk,
                         topk_tail, check_values):  # fmt: skip
    """The teacher of ``fused_linear_distill_loss``, checked: ``(logits, X_t, W_t, b_t, indices, probs,
    uniform)``, the absent ones ``None``."""
    rows = x.shape[0]
    device, dtype = x.device, x.dtype
    indices = probs = None
    uniform = False
    if teacher_logits is not None:
        _check_like("teacher_logits", _tensor("teacher_logits", teacher_logits), (rows, m), device, "student_input")
        if teacher_logits.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"teacher_logits must be a floating-point tensor, got {teacher_logits.dtype}")
        teacher_logits = teacher_logits.detach().to(dtype).contiguous()
        if check_values:
            _check_finite("teacher_logits", teacher_logits, allow_neg_inf=True)
    if teacher_input is not None:
        xt = _tensor("teacher_input", teacher_input)
        if xt.dim() != 2 or xt.shape[0] != rows:
            raise ValueError(f"teacher_input must have shape ({rows}, H_t), got {tuple(xt.shape)}")
        if teacher_head_weight is None:
            raise ValueError("teacher_input needs teacher_head_weight (m, H_t)")
        teacher_input = xt.detach().to(dtype).contiguous()
        tw = _tensor("teacher_head_weight", teacher_head_weight).detach().to(dtype)
        tb = None if teacher_head_bias is None else _tensor("teacher_head_bias", teacher_head_bias).detach().to(dtype)
        tw, tb = _head("teacher_head", tw, tb, teacher_input, "teacher_input")
        if tw.shape[0] != m:
            raise ValueError(
                f"teacher_head_weight must have {m} rows (classes) like student_head_weight, got {tw.shape[0]}"
            )
        teacher_head_weight, teacher_head_bias = tw.contiguous(), None if tb is None else tb.contiguous()
    if teacher_topk is not None:
        indices, probs, uniform = _topk_args(teacher_topk, topk_tail, rows, m, device, "student_input", check_values)
    return teacher_logits, teacher_input, teacher_head_weight, teacher_head_bias, indices, probs, uniform


def _linear_plan(x: Tensor, weight: Tensor, bias: Tensor | None, reduction: str, chunk_size: int | None):
    """``(need_input_grad, need_param_grad, chunk_size)`` of the fused layer."""
    rows, m = x.shape[0], weight.shape[0]
    grad_on = torch.is_grad_enabled()
    need_input_grad = grad_on and x.requires_grad
    need_param_grad = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    if reduction == "none" and (need_input_grad or need_param_grad):
        raise ValueError(
            "reduction='none' cannot be differentiated through the fused layer (the weight gradient is summed "
            "over rows in the forward): use 'mean' or 'sum', or call it under torch.no_grad()"
        )
    if chunk_size is None:
        chunk_size = _rows_per_chunk(_LINEAR_CHUNK_BYTES, m, x.element_size(), rows)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return need_input_grad, need_param_grad, chunk_size


def fused_linear_distill_loss(
    student_input: Tensor,
    student_head_weight: Tensor,
    student_head_bias: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_input: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    topk_tail: str = "renormalize",
    temperature: float = 1.0,
    teacher_weight: float | Tensor | None = None,
    class_costs: Tensor | None = None,
    class_weights: Tensor | None = None,
    student_temperature: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
    ignore_index: int = -100,
    normalizer: float | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """The linear output layer ``f = X W^T + b`` fused with ``distill_loss`` (docs/wide_heads.md).

    Chunk of rows by chunk, the student's scores, the teacher's, the fused loss, gradient and statistics,
    and the gradients with respect to ``student_input``, ``student_head_weight`` and ``student_head_bias``
    (the last two accumulated in fp32 across chunks and rounded once) are computed in the forward, so that
    no (B, m) matrix exists at any time; ``loss.backward()`` hands them to autograd.

    Args:
        student_input: ``X`` (B, H), float32 / bfloat16 / float16 / float64.
        student_head_weight: ``W`` (m, H) in ``nn.Linear`` layout, dtype of ``X``.
        student_head_bias: ``b`` (m,) or ``None``.
        labels, temperature, teacher_weight, class_costs, class_weights, student_temperature, reduction,
            backend, validate, ignore_index, normalizer: as in ``distill_loss`` (``teacher_weight`` is the
            target mix ``a``, not a head). Rows labelled ``ignore_index`` add nothing to the loss, the
            statistics or any gradient; ``normalizer`` (a number or 0-d tensor) replaces the count of kept
            rows in the mean, e.g. for gradient accumulation. ``reduction="none"`` gives per-row losses
            but cannot be differentiated.
        teacher_logits: a dense teacher ``g`` (B, m).
        teacher_input, teacher_head_weight, teacher_head_bias: a teacher head ``g = X_t W_t^T + b_t``
            applied chunk by chunk under no grad; ``X_t`` (B, H_t), ``W_t`` (m, H_t), ``H_t`` may differ from H.
        teacher_topk, topk_tail: a sparse teacher ``(indices, probs)`` as in ``distill_loss``.
        chunk_size: rows per chunk (default: about 32 MiB of scores per chunk, at least 8 rows).

    Returns:
        ``LossOutput(loss, mass, risk, error)`` as ``distill_loss`` does.
    """
    x = check_scores("student_input", student_input, "(B, H)")
    weight, bias = _head("student_head", student_head_weight, student_head_bias, x, "student_input")
    rows, m = x.shape[0], weight.shape[0]
    given = _one_teacher(teacher_logits, teacher_input, teacher_topk, teacher_head_weight, teacher_head_bias)
    call = describe_call(
        rows, m, x.device, x.dtype, "student_input", labels=labels, has_teacher=bool(given),
        teacher_names="teacher_logits, teacher_input or teacher_topk", teacher_weight=teacher_weight,
        class_costs=class_costs, class_weights=class_weights, temperature=temperature,
        student_temperature=student_temperature, reduction=reduction, backend=backend, validate=validate,
        ignore_index=ignore_index, normalizer=normalizer, host_checks=True,
    )  # fmt: skip
    teachers = _linear_teacher_args(
        x, m, teacher_logits, teacher_input, teacher_head_weight, teacher_head_bias, teacher_topk, topk_tail,
        call.check_values,
    )  # fmt: skip
    if call.a_const == 0.0:
        teachers = (None,) * 6 + (False,)
    if call.check_values:
        _check_finite("student_input", x)
    need_input_grad, need_param_grad, chunk_size = _linear_plan(x, weight, bias, call.reduction, chunk_size)
    out = fused_linear_distill(
        x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), call.labels, call.a,
        call.log_c, call.w, *teachers, call.gamma, call.tau, call.reduction, need_input_grad, need_param_grad,
        call.backend, chunk_size, call.ignore_index, call.norm_value, call.norm_t,
    )  # fmt: skip
    return LossOutput(out[0], out[1], out[2], out[3])


class FusedLinearDistillationLoss(RobustDistillationLoss):
    """``RobustDistillationLoss`` for a student that owns an ``nn.Linear`` output layer: the layer is fused
    with the loss (``fused_linear_distill_loss``), so the (B, m) scores are never materialised.

    The objective, class costs, DRO state (``update_weights``) and prior work as in the parent; ``forward``
    takes the head's input features and the head instead of the scores. ``chunk_size``, ``topk_tail`` and
    ``ignore_index`` are those of ``fused_linear_distill_loss``.
    """

    def __init__(
        self, num_classes: int, objective: str = "standard", *, chunk_size: int | None = None,
        topk_tail: str = "renormalize", ignore_index: int = -100, **kwargs,
    ) -> None:  # fmt: skip
        super().__init__(num_classes, objective, **kwargs)
        if topk_tail not in TOPK_TAILS:
            raise ValueError(f"topk_tail must be one of {TOPK_TAILS}, got {topk_tail!r}")
        self.chunk_size = chunk_size
        self.topk_tail = topk_tail
        self.ignore_index = ignore_index

    def forward(  # type: ignore[override]
        self,
        student_input: Tensor,
        head: nn.Linear,
        labels: Tensor | None = None,
        teacher_logits: Tensor | None = None,
        teacher_input: Tensor | None = None,
        teacher_head: nn.Linear | None = None,
        teacher_topk: tuple[Tensor, Tensor] | None = None,
        teacher_weight: float | Tensor | None = None,
        normalizer: float | Tensor | None = None,
        validate: bool = False,
    ) -> LossOutput:
        """The objective's loss and statistics of ``head(student_input)`` (see ``fused_linear_distill_loss``)."""
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
        if head.out_features != self.num_classes:
            raise ValueError(f"head has {head.out_features} outputs but the loss has {self.num_classes} classes")
        if teacher_head is not None and not isinstance(teacher_head, nn.Linear):
            raise TypeError(f"teacher_head must be an nn.Linear, got {type(teacher_head).__name__}")
        return fused_linear_distill_loss(
            student_input,
            head.weight,
            head.bias,
            labels=labels,
            teacher_logits=teacher_logits,
            teacher_input=teacher_input,
            teacher_head_weight=None if teacher_head is None else teacher_head.weight,
            teacher_head_bias=None if teacher_head is None else teacher_head.bias,
            teacher_topk=teacher_topk,
            topk_tail=self.topk_tail,
            temperature=self.temperature,
            teacher_weight=self.teacher_weight if teacher_weight is None else teacher_weight,
            class_costs=self.costs,
            class_weights=self.class_weights,
            student_temperature=self.student_temperature,
            reduction=self.reduction,
            backend=self.backend,
            validate=validate,
            ignore_index=self.ignore_index,
            normalizer=normalizer,
            chunk_size=self.chunk_size,
        )
