"""The ``rkd::distill`` custom op: one op for eager, autograd and ``torch.compile``.

The forward runs a backend's fused kernel, which returns the loss, the per-class statistics and the
gradient of the (reduced) loss with respect to the student scores, computed in the same pass. The
gradient is saved instead of recomputed; the backward only scales it by the incoming gradient, in
place, with the backend's ``scale_rows_``, which leaves the gradient untouched when the incoming
gradient is exactly 1 (the usual ``loss.backward()`` of a mean or sum): a training step reads the logits
once and writes the gradient once. A later backward through a retained graph undoes the first scaling
out of place. With ``reduction="none"`` the backward multiplies out of place (one more pass).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rkd_engine.ops import checks
from rkd_engine.ops.constants import REDUCTIONS  # noqa: F401  (re-exported: rkd_engine.ops.REDUCTIONS)
from rkd_engine.ops.dispatch import backend_module

if TYPE_CHECKING:
    from rkd_engine.ops.call import FusedCall

_N_ARGS = 17  # arguments of rkd::distill


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mean_scale(student, labels, ignore_index, normalizer, normalizer_t):
    """The divisor of ``reduction="mean"`` as ``(1 / divisor, None)`` (a number) or ``(1.0, 1 / divisor)`` (a 0-d
    tensor on the student's device, never read on the host).

    The divisor is ``normalizer_t`` or ``normalizer`` when given (``normalizer > 0``), else the number of
    rows whose label is not ``ignore_index`` (all rows without labels). A divisor of 0 (every row ignored)
    scales by 0: the loss and gradient are 0, not NaN. On CPU tensors the divisor is read on the host
    (free there), so the kernels get a plain number.
    """
    acc = acc_dtype(student.dtype)
    if normalizer_t is not None:
        divisor = normalizer_t.to(acc)
    elif normalizer > 0:
        return 1.0 / normalizer, None
    elif labels is None:
        return 1.0 / student.shape[0], None
    else:
        divisor = (labels != ignore_index).sum().to(acc)
    if divisor.device.type == "cpu":
        value = float(divisor)
        return (1.0 / value if value > 0 else 0.0), None
    return 1.0, torch.where(divisor > 0, 1.0 / divisor, torch.zeros_like(divisor))


def _forward(
    student,
    teacher,
    labels,
    a,
    log_c,
    w,
    gamma,
    tau,
    teacher_is_probs,
    reduction,
    need_grad,
    backend,
    ignore_index=-100,
    normalizer=0.0,
    normalizer_t=None,
    validate="off",
    a_checked=False,
):
    """The body of ``rkd::distill`` (shared by the op and its eager fast path ``call_distill``).

    ``validate`` reads the call's status as ``rkd_engine.ops.checks.enforce`` says (``"off"``, ``"sync"``,
    ``"async"``): inside the op, so the checks hold under ``torch.compile`` too. ``a_checked``: the caller
    has checked ``a`` on the host (a constant in [0, 1]), so the status does not look at it.
    """
    on_cpu = student.device.type == "cpu"
    if validate != "off" and labels is not None and on_cpu and backend != "cpp":
        # On CPU reading B labels first is free; the C++ kernel checks them itself (see below).
        checks.check_labels(labels, student.shape[-1], ignore_index)
    grad_scale, scale = 1.0, None
    if reduction == "mean":
        grad_scale, scale = _mean_scale(student, labels, ignore_index, normalizer, normalizer_t)
    module = backend_module(backend)
    try:
        loss_rows, grad, mass, risk, error = module.fused_forward(
            student,
            teacher,
            labels,
            a,
            log_c,
            w,
            gamma=gamma,
            tau=tau,
            teacher_is_probs=teacher_is_probs,
            grad_scale=grad_scale,
            need_grad=need_grad,
            ignore_index=ignore_index,
            scale=scale,
        )
    except RuntimeError:
        if validate != "off" and labels is not None and on_cpu:
            # The C++ kernel refuses a label outside [0, m) before it reads a row: name it as distill_loss does.
            checks.check_labels(labels, student.shape[-1], ignore_index)
        raise
    loss = loss_rows if reduction == "none" else _reduce(loss_rows, reduction, grad_scale, scale, module)
    if validate != "off":
        labels_checked = labels is None or on_cpu
        checks.enforce(
            validate, loss, student, teacher, teacher_is_probs, labels, a, ignore_index,
            labels_checked=labels_checked, a_checked=a_checked, loss_rows=loss_rows,
        )  # fmt: skip
    return loss, grad, mass, risk, error


def _reduce(loss_rows: Tensor, reduction: str, grad_scale: float, scale: Tensor | None, module) -> Tensor:
    """The reduced loss: ``sum`` of the rows, times the mean's divisor. The backend ``module`` may provide
    ``sum_rows`` (the C++ one does: one call instead of an ATen reduction and a multiply)."""
    if reduction == "mean" and scale is not None:
        return loss_rows.sum().mul_(scale)
    factor = grad_scale if reduction == "mean" else 1.0
    sum_rows = getattr(module, "sum_rows", None)
    if sum_rows is not None:
        return sum_rows(loss_rows, factor)
    return loss_rows.sum() if factor == 1.0 else loss_rows.sum().mul_(factor)


@torch.library.custom_op("rkd::distill", mutates_args=())
def distill(
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor | None,
    a: Tensor,
    log_c: Tensor | None,
    w: Tensor | None,
    gamma: float,
    tau: float,
    teacher_is_probs: bool,
    reduction: str,
    need_grad: bool,
    backend: str,
    ignore_index: int = -100,
    normalizer: float = 0.0,
    normalizer_t: Tensor | None = None,
    validate: str = "off",
    a_checked: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused distillation loss (reduced), its saved gradient, and per-class ``mass``, ``risk``, ``error``.

    Rows labelled ``ignore_index`` contribute nothing; ``reduction="mean"`` divides by ``normalizer_t`` (a
    0-d tensor) or ``normalizer`` when given (``> 0``), else by the number of rows not ignored.
    """
    return _forward(
        student,
        teacher,
        labels,
        a,
        log_c,
        w,
        gamma,
        tau,
        teacher_is_probs,
        reduction,
        need_grad,
        backend,
        ignore_index,
        normalizer,
        normalizer_t,
        validate,
        a_checked,
    )


@distill.register_fake
def _distill_fake(
    student,
    teacher,
    labels,
    a,
    log_c,
    w,
    gamma,
    tau,
    teacher_is_probs,
    reduction,
    need_grad,
    backend,
    ignore_index=-100,
    normalizer=0.0,
    normalizer_t=None,
    validate="off",
    a_checked=False,
):
    rows, m = student.shape
    acc = acc_dtype(student.dtype)
    loss = student.new_empty((rows,) if reduction == "none" else (), dtype=acc)
    grad = student.new_empty((rows, m) if need_grad else (0,))
    stats = [student.new_empty((m,), dtype=acc) for _ in range(3)]
    return (loss, grad, *stats)


def _setup_context(ctx, inputs, output):
    student, *_rest = inputs
    reduction, need_grad, backend = inputs[9], inputs[10], inputs[11]
    ctx.reduction = reduction
    ctx.backend = backend
    ctx.need_grad = need_grad
    ctx.rows = student.shape[0]
    ctx.applied = None
    # The statistics and the saved gradient get no upstream gradient: don't let autograd build B x m zeros.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1], output[2], output[3], output[4])


def _backward(ctx, g_loss, g_grad, g_mass, g_risk, g_error):
    (grad,) = ctx.saved_tensors
    if not ctx.need_grad:
        raise RuntimeError(
            "rkd::distill was called without computing the gradient (need_grad=False); "
            "call it with a student that requires grad under torch.enable_grad()"
        )
    if g_loss is None:
        return (None,) * _N_ARGS
    if (
        torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(g_loss)
    ):
        # create_graph=True (a gradient penalty, gradgradcheck, torch.func.hessian): the saved gradient is a
        # constant of the graph, so a second derivative through it would be silently zero.
        raise RuntimeError(
            "rkd::distill does not support double backward (create_graph=True): its gradient is computed in "
            "the forward pass and is not differentiable. Use distill_loss(..., backend='reference') for "
            "higher-order derivatives."
        )
    acc = acc_dtype(grad.dtype)
    scalar = g_loss.dim() == 0
    nones = (None,) * (_N_ARGS - 1)
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    in_place = not (
        ctx.reduction == "none"
        or type(grad) is not torch.Tensor
        or torch.compiler.is_compiling()
        or wrapped(grad)
        or wrapped(g_loss)
    )
    if in_place and ctx.applied is None and scalar and g_loss.device.type == "cpu" and type(g_loss) is torch.Tensor:
        if g_loss.item() == 1.0:
            # loss.backward() of a mean or sum on CPU: reading the scalar is free, and 1 scales nothing.
            ctx.applied = 1.0
            return (grad, *nones)
    go = g_loss if g_loss.dtype == acc else g_loss.to(acc)
    go = go.expand(ctx.rows) if scalar else go
    if not in_place:
        # Out of place: under tracing (torch.compile, AOTAutograd: functional or fake tensor subclasses)
        # a graph may not mutate a saved forward output, and the compiler fuses this multiply; with
        # per-row losses, Jacobian-style use (gradcheck, vmap over upstream gradients) must stay exact;
        # under torch.func transforms the tensors are wrappers with no storage of their own.
        return (grad * go.unsqueeze(-1).to(grad.dtype), *nones)
    if ctx.applied is None:
        # First backward: scale the saved gradient in place; rows whose upstream gradient is exactly 1
        # (loss.backward()) are skipped on device. `.data` keeps the saved tensor's version unchanged.
        ctx.applied = go.contiguous()
        backend_module(ctx.backend).scale_rows_(grad.data, ctx.applied)
        return (grad, *nones)
    # A later backward through a retained graph (retain_graph=True, gradcheck, Jacobians): the saved
    # gradient holds go_1 * dloss/df; undo go_1 out of place. Not a hot path, so the check may sync.
    if isinstance(ctx.applied, float):
        return (grad * go.unsqueeze(-1).to(grad.dtype), *nones)  # the first backward scaled by 1: nothing to undo
    if bool((ctx.applied == 0).any()):
        raise RuntimeError(
            "rkd::distill: a second backward through a retained graph cannot recover rows whose first "
            "upstream gradient was 0; compute the loss again instead"
        )
    return (grad * (go / ctx.applied).unsqueeze(-1).to(grad.dtype), *nones)


distill.register_autograd(_backward, setup_context=_setup_context)


class _DistillFunction(torch.autograd.Function):
    """``rkd::distill``'s forward and backward as a plain autograd function: the eager fast path."""

    # The setup_context form: functorch transforms (torch.func.grad, vmap of grad, jacrev) can run it.
    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return _forward(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


class _EagerDistillFunction(torch.autograd.Function):
    """``_DistillFunction`` in the ``forward(ctx, ...)`` form, for plain eager calls outside functorch
    transforms: ``Function.apply`` binds the arguments of a ``setup_context``-form function to its signature
    with ``inspect`` on every call (some 30 us); this form goes straight to the autograd node. Its arguments
    are the op's tensors and one tuple of the others (``_pack``): ``apply`` looks at each argument it gets."""

    @staticmethod
    def forward(ctx, student, teacher, labels, a, log_c, w, normalizer_t, options):
        inputs = _unpack((student, teacher, labels, a, log_c, w, normalizer_t, options))
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (_backward(ctx, *grads)[0],) + (None,) * 7


def _pack(args: tuple) -> tuple:
    """The op's arguments (in order) as ``_EagerDistillFunction`` takes them: its 7 tensors, then the rest."""
    args = tuple(args) + (-100, 0.0, None, "off", False)[len(args) - 12 :]
    return (*args[:6], args[14], args[6:14] + args[15:])


def _unpack(packed: tuple) -> tuple:
    """The inverse of ``_pack``."""
    *tensors, normalizer_t, options = packed
    return (*tensors, *options[:8], normalizer_t, *options[8:])


_FAST_PATH_BACKENDS = ("cpp", "triton", "cuda", "reference")
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def call_distill(*args) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``distill(*args)`` (the op's arguments, in order): the same results and gradients, with less
    per-call overhead in plain eager use.

    Going through the custom op costs a dispatcher round trip, the generated autograd wrapper (which
    rebuilds the op's argument list on every call) and output alias checks: some 0.1-0.5 ms per training
    step, several percent of a CPU step. For every backend, on plain tensors in eager mode (no
    ``torch.compile`` tracing, no tensor subclass, torch function or dispatch mode, functorch transform)
    this runs the same forward and backward (``_forward``, ``_setup_context``, ``_backward``) as a plain
    ``torch.autograd.Function`` instead (or directly, when no gradient is needed); anything else calls the
    op, except under ``torch.func`` transforms, which take the autograd function (see ``_DistillFunction``).
    """
    student, teacher, labels, a, log_c, w, _gamma, _tau, _probs, _reduction, _need_grad, backend = args[:12]
    normalizer_t = args[14] if len(args) > 14 else None
    if (
        torch._C._functorch.peek_interpreter_stack() is not None
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
    ):
        # Under torch.func transforms (grad, vmap of grad, jacrev): the autograd.Function in its setup_context
        # form, which functorch can run (the custom op's generated autograd cannot), with the reference
        # backend (PyTorch operations, which vmap can batch; the kernels take plain storage) and no status
        # read (a host read of a batched value is not allowed under vmap).
        args = list(args) + [-100, 0.0, None, "off", False][len(args) - 12 :]
        args[11], args[15] = "reference", "off"
        return _DistillFunction.apply(*args)
    if (
        backend in _FAST_PATH_BACKENDS
        and type(student) in _PLAIN_TYPES
        and (teacher is None or type(teacher) is Tensor)
        and (labels is None or type(labels) is Tensor)
        and type(a) is Tensor
        and (log_c is None or type(log_c) is Tensor)
        and (w is None or type(w) is Tensor)
        and (normalizer_t is None or type(normalizer_t) is Tensor)
        and not torch.compiler.is_compiling()
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
    ):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(student, teacher, labels, a, log_c, w):
            return _EagerDistillFunction.apply(*_pack(args))
        return _forward(*args)
    return distill(*args)


def call_fused(
    call: FusedCall, student: Tensor, teacher: Tensor | None, teacher_is_probs: bool, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``call_distill`` on a checked call description (``rkd_engine.ops.call.FusedCall``): the op's
    arguments are taken from it, none is checked again."""
    return call_distill(
        student if student.is_contiguous() else student.contiguous(),
        teacher if teacher is None or teacher.is_contiguous() else teacher.contiguous(),
        call.labels, call.a, call.log_c, call.w, call.gamma, call.tau, teacher_is_probs, call.reduction,
        need_grad, call.backend, call.ignore_index, call.norm_value, call.norm_t, call.validate,
        call.a_const is not None,
    )  # fmt: skip
