"""The user API: ``distill_loss`` (a function) and ``RobustDistillationLoss`` (an ``nn.Module``).

Per row ``i`` (docs/loss.md): ``p_i = softmax(g_i / gamma)`` (or given), ``q_i = (1 - a_i) e_{y_i}
+ a_i p_i``, ``s_i = softmax(f_i - log c)`` and ``loss_i = -sum_j w_j q_ij log s_ij`` (with the Hinton
student temperature ``tau`` on the teacher part). Besides the loss, every call returns the per-class
statistics ``mass``, ``risk`` and ``error`` summed over the batch, which drive the DRO class weights.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from rkd_engine.dro import ClassDRO
from rkd_engine.ops.call import (
    FusedCall,
    capturing,
    check_companion,
    check_reduction,
    check_scores,
    describe_call,
    positive_number,
)
from rkd_engine.ops.constants import OBJECTIVES
from rkd_engine.ops.op import acc_dtype, call_fused

Objective = Literal["standard", "balanced", "robust", "tradeoff"]


class LossOutput(NamedTuple):
    """The loss and the per-class statistics of docs/statistics.md (summed over the batch).

    ``risk / mass`` and ``error / mass`` are the per-class surrogate and 0-1 risk estimates.
    """

    loss: Tensor
    mass: Tensor
    risk: Tensor
    error: Tensor


def distill_loss(
    student_logits: Tensor,
    *,
    labels: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_probs: Tensor | None = None,
    temperature: float = 1.0,
    teacher_weight: float | Tensor | None = None,
    class_costs: Tensor | None = None,
    class_weights: Tensor | None = None,
    student_temperature: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool | str = True,
    ignore_index: int = -100,
    normalizer: float | Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    topk_tail: str = "renormalize",
) -> LossOutput:
    """Margin-adjusted distillation loss with per-class statistics, fused in one pass over the logits.

    Args:
        student_logits: ``f``, (B, m), float16 / bfloat16 / float32 / float64. The only input the
            loss is differentiated in.
        labels: ``y``, (B,) integers in ``[0, m)``; needed where ``teacher_weight < 1``.
        teacher_logits: ``g``, (B, m), same dtype as ``f``; ``-inf`` marks a masked class.
        teacher_probs: ``p`` given directly instead of ``teacher_logits`` (rows on the simplex).
        temperature: ``gamma > 0``: ``p = softmax(g / gamma)``.
        teacher_weight: ``a`` in [0, 1], a float or a (B,) tensor; ``q = (1 - a) e_y + a p``.
            Defaults to 1 when a teacher is given and 0 when only labels are.
        class_costs: ``c`` (m,) > 0: the loss uses ``s = softmax(f - log c)`` (logit adjustment).
        class_weights: ``w`` (m,) >= 0: multiplicative per-class weights of the loss terms.
        student_temperature: ``tau > 0`` (Hinton) on the teacher part of the loss, scaled by ``tau^2``.
        reduction: ``"mean"`` (over rows), ``"sum"`` or ``"none"`` (a (B,) loss).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpp"`` or ``"reference"``.
        validate: check values (NaN or ``+inf`` in the logits, rows of ``-inf`` everywhere, labels
            outside ``[0, m)``, ``teacher_weight`` outside ``[0, 1]``, probability rows). ``True`` (or
            ``"sync"``) reads a small status the kernel's pass produces: free on CPU, one small host read
            (a synchronisation) on CUDA, no extra pass over the logits; only when it reports a problem
            are the inputs examined to name it. ``"async"``: a device-side assertion, no host
            synchronisation (CUDA; the error names no argument). ``False``: nothing is read.
            ``teacher_probs`` are checked in a separate pass (sum and sign) unless ``False``.
            Unchecked, a student row that is ``-inf`` everywhere (it has no softmax) gets a NaN loss
            and a NaN gradient row on every backend (unless labelled ``ignore_index``); the other rows
            are unaffected; ``risk`` is NaN in the classes of its target ``q``.
        ignore_index: a row whose label equals it contributes nothing: loss 0, a zero gradient row,
            nothing in the statistics. Labels may be passed with ``teacher_weight=1`` only to mark
            such rows.
        normalizer: with ``reduction="mean"``, divide the summed loss by this (a number > 0 or a 0-d
            tensor, e.g. the ``num_items_in_batch`` of a gradient-accumulation step) instead of by the
            number of rows not ignored. Never read on the host; a tensor of value 0 gives loss 0.
        teacher_topk: a sparse teacher ``(indices, probs)`` instead of a dense one: (B, k) distinct
            classes per row and their (already tempered) probabilities, rows summing to at most 1.
        topk_tail: the target of a top-k teacher (docs/wide_heads.md): ``"renormalize"`` (``probs``
            divided by their row sum on the top k, 0 elsewhere) or ``"uniform"`` (the missing mass
            ``1 - sum(probs)`` spread evenly over the other ``m - k`` classes).

    Returns:
        ``LossOutput(loss, mass, risk, error)``; the statistics are (m,) float32 (float64 for
        float64 inputs) sums over the batch: ``mass_j = sum_i q_ij``, ``risk_j = sum_i q_ij (-log s_ij)``,
        ``error_j = sum_i q_ij [argmax_k f_ik != j]``.
    """
    if teacher_topk is not None:
        if teacher_logits is not None or teacher_probs is not None:
            raise ValueError("pass one teacher: teacher_topk, teacher_logits or teacher_probs")
        from rkd_engine.wide import topk_distill_loss

        return topk_distill_loss(
            student_logits, teacher_topk, topk_tail=topk_tail, labels=labels, teacher_weight=teacher_weight,
            class_costs=class_costs, class_weights=class_weights, student_temperature=student_temperature,
            reduction=reduction, backend=backend, validate=validate, ignore_index=ignore_index, normalizer=normalizer,
        )  # fmt: skip
    return _dense_loss(
        student_logits, labels=labels, teacher_logits=teacher_logits, teacher_probs=teacher_probs,
        temperature=temperature, teacher_weight=teacher_weight, class_costs=class_costs, class_weights=class_weights,
        student_temperature=student_temperature, reduction=reduction, backend=backend, validate=validate,
        ignore_index=ignore_index, normalizer=normalizer,
    )  # fmt: skip


def _dense_loss(
    student_logits: Tensor,
    *,
    labels: Tensor | None,
    teacher_logits: Tensor | None,
    teacher_probs: Tensor | None,
    temperature: float,
    teacher_weight: float | Tensor | None,
    class_costs: Tensor | None,
    class_weights: Tensor | None,
    student_temperature: float,
    reduction: str,
    backend: str,
    validate: bool | str,
    ignore_index: int = -100,
    normalizer: float | Tensor | None = None,
    log_costs: Tensor | None = None,
) -> LossOutput:
    """``distill_loss`` with a dense teacher (or none): check the call once, then run the op.

    ``log_costs``: ``log c`` already computed and known to be finite (``RobustDistillationLoss``).
    """
    student_logits = check_scores("student_logits", student_logits)
    teacher, teacher_is_probs = _dense_teacher(student_logits, teacher_logits, teacher_probs)
    call = describe_call(
        *student_logits.shape,
        student_logits.device,
        student_logits.dtype,
        "student_logits",
        labels=labels,
        has_teacher=teacher is not None,
        teacher_names="teacher_logits or teacher_probs",
        teacher_weight=teacher_weight,
        class_costs=class_costs,
        class_weights=class_weights,
        temperature=temperature,
        student_temperature=student_temperature,
        reduction=reduction,
        backend=backend,
        validate=validate,
        ignore_index=ignore_index,
        normalizer=normalizer,
        log_costs=log_costs,
    )
    return _run(call, student_logits, teacher, teacher_is_probs)


def _dense_teacher(
    student: Tensor, teacher_logits: Tensor | None, teacher_probs: Tensor | None
) -> tuple[Tensor | None, bool]:
    """The dense teacher (logits or probabilities) checked against the student, and whether it is probabilities."""
    if teacher_logits is not None and teacher_probs is not None:
        raise ValueError("pass either teacher_logits or teacher_probs, not both")
    if teacher_logits is None and teacher_probs is None:
        return None, False
    name = "teacher_logits" if teacher_probs is None else "teacher_probs"
    teacher = teacher_logits if teacher_probs is None else teacher_probs
    check_companion(name, teacher, tuple(student.shape), student.device, "student_logits", student.dtype)
    return teacher, teacher_probs is not None


def _run(call: FusedCall, student: Tensor, teacher: Tensor | None, teacher_is_probs: bool) -> LossOutput:
    """Run the op on a checked call (a teacher of weight 0 everywhere is not read)."""
    if call.a_const == 0.0:
        teacher, teacher_is_probs = None, False
    need_grad = student.requires_grad and torch.is_grad_enabled()
    loss, _grad, mass, risk, error = call_fused(call, student, teacher, teacher_is_probs, need_grad)
    return LossOutput(loss, mass, risk, error)


def _as_python_number(value: object) -> object:
    """A numpy or other ``numbers.Real`` scalar as a Python float (other values unchanged, for the checks)."""
    import numbers

    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


class RobustDistillationLoss(nn.Module):
    """The paper's objectives for teacher training (labels) and student training (a teacher).

    ``objective`` sets the class costs ``c`` of the margin loss (docs/loss.md):
    ``"standard"``: ``c = 1``; ``"balanced"``: ``c = 1 / pi``; ``"robust"``: ``c = lambda / pi``;
    ``"tradeoff"``: ``c = beta / pi`` with ``beta = (1 - alpha) / m + alpha * lambda``. ``pi`` is the
    label prior of the training set for a teacher and the teacher marginal ``pi_t`` for a student
    (``set_prior``). ``lambda`` lives in the ``dro`` submodule (a ``ClassDRO``) and moves with
    ``update_weights(error, mass)``, the validation step of docs/dro.md.

    Every argument is checked when the module is built (``class_weights``: ``(m,)`` finite and
    ``>= 0``; ``teacher_weight``: a number in [0, 1]); ``forward`` checks the class count of the
    logits. The DRO state and ``class_weights`` stay float32 whatever dtype the module is cast to,
    and ``lambda`` never reaches 0 (``ClassDRO``), so no cost is ever 0 or inf. A DRO state of another
    ``alpha`` (a robust state into a trade-off module) is refused by ``load_state_dict``.
    """

    def __init__(
        self,
        num_classes: int,
        objective: Objective = "standard",
        *,
        alpha: float | None = None,
        temperature: float = 1.0,
        student_temperature: float = 1.0,
        teacher_weight: float | None = None,
        prior: Tensor | None = None,
        step_size: float = 0.1,
        class_weights: Tensor | None = None,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective == "tradeoff" and alpha is None:
            raise ValueError("objective='tradeoff' needs alpha in [0, 1]")
        if objective != "tradeoff" and alpha is not None:
            raise ValueError(f"alpha is only used by objective='tradeoff' (objective={objective!r})")
        alpha = 1.0 if objective == "robust" else (0.0 if alpha is None else _as_python_number(alpha))
        check_reduction(reduction)
        self.objective = objective
        self.temperature = positive_number("temperature", _as_python_number(temperature))
        self.student_temperature = positive_number("student_temperature", _as_python_number(student_temperature))
        teacher_weight = _as_python_number(teacher_weight)
        if teacher_weight is not None:
            if isinstance(teacher_weight, bool) or not isinstance(teacher_weight, (int, float)):
                raise TypeError(
                    f"teacher_weight must be a number in [0, 1] (pass a per-example tensor to forward), "
                    f"got {type(teacher_weight).__name__}"
                )
            if not 0.0 <= teacher_weight <= 1.0:
                raise ValueError(f"teacher_weight must be a number in [0, 1], got {teacher_weight}")
            teacher_weight = float(teacher_weight)
        self.teacher_weight = teacher_weight
        self.reduction = reduction
        self.backend = backend
        self.dro = ClassDRO(num_classes, alpha=alpha, step_size=step_size, prior=prior)
        self.dro.fixed_alpha = True  # the objective fixes alpha: a state of another alpha is refused
        if class_weights is not None:
            if not isinstance(class_weights, Tensor):
                raise TypeError(
                    f"class_weights must be a torch.Tensor of shape ({num_classes},), got {type(class_weights).__name__}"
                )
            if tuple(class_weights.shape) != (num_classes,):
                raise ValueError(f"class_weights must have shape ({num_classes},), got {tuple(class_weights.shape)}")
            class_weights = class_weights.detach().float().clone()
            if not bool(torch.isfinite(class_weights).all()) or bool((class_weights < 0).any()):
                raise ValueError("class_weights must be finite and >= 0 for every class")
            self.register_buffer("class_weights", class_weights)
        else:
            self.class_weights = None

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # Keep ``class_weights`` float32 under ``.half()``/``.to(dtype)`` (the ``dro`` child keeps its own).
        weights = self._buffers.get("class_weights")
        super()._apply(fn, recurse)
        if weights is not None and self._buffers["class_weights"].dtype != weights.dtype:
            self._buffers["class_weights"] = weights.to(self._buffers["class_weights"].device)
        return self

    @property
    def num_classes(self) -> int:
        return self.dro.num_classes

    @property
    def costs(self) -> Tensor | None:
        """The class costs ``c`` of the objective (``None`` for ``"standard"``: ``c = 1``)."""
        if self.objective == "standard":
            return None
        if self.objective == "balanced":
            return 1.0 / self.dro.prior
        return self.dro.costs

    def set_prior(self, prior: Tensor) -> None:
        """Set ``pi``: the training label prior (teacher) or the teacher marginal ``pi_t`` (student)."""
        self.dro.set_prior(prior)

    @torch.no_grad()
    def update_weights(self, error: Tensor, mass: Tensor) -> None:
        """The DRO step from validation statistics (``error`` and ``mass`` summed over a validation set).

        A no-op for ``"standard"`` and ``"balanced"``; on device, no host synchronisation.
        """
        if self.objective in ("robust", "tradeoff"):
            self.dro.update(error, mass)

    def forward(
        self,
        student_logits: Tensor,
        labels: Tensor | None = None,
        teacher_logits: Tensor | None = None,
        teacher_probs: Tensor | None = None,
        teacher_weight: float | Tensor | None = None,
        validate: bool = False,
    ) -> LossOutput:
        """The objective's loss and per-class statistics for one batch (see ``distill_loss``)."""
        if isinstance(student_logits, Tensor) and (
            student_logits.ndim < 1 or student_logits.shape[-1] != self.num_classes
        ):
            raise ValueError(
                f"student_logits must have {self.num_classes} classes in its last dimension (this loss was built "
                f"for num_classes={self.num_classes}), got shape {tuple(student_logits.shape)}"
            )
        log_costs = None
        if isinstance(student_logits, Tensor) and student_logits.is_floating_point():
            log_costs = self._log_costs(acc_dtype(student_logits.dtype), student_logits.device)
        return _dense_loss(
            student_logits,
            labels=labels,
            teacher_logits=teacher_logits,
            teacher_probs=teacher_probs,
            temperature=self.temperature,
            teacher_weight=self.teacher_weight if teacher_weight is None else teacher_weight,
            class_costs=self.costs if log_costs is None else None,
            class_weights=self.class_weights,
            student_temperature=self.student_temperature,
            reduction=self.reduction,
            backend=self.backend,
            validate=validate,
            log_costs=log_costs,
        )

    def _log_costs(self, acc: torch.dtype, device: torch.device) -> Tensor | None:
        """``log c`` in ``acc`` on ``device``, kept between DRO updates and prior changes: rebuilt only when
        the DRO state's tensors were replaced (``.to(device)``) or changed in place (their version counters).
        ``None`` for ``"standard"`` (no costs), and while ``torch.compile`` traces or a CUDA graph is captured
        (computed in the graph, so that each replay reads the current DRO weights: ``ops.call.capturing``)."""
        if self.objective == "standard" or torch.compiler.is_compiling() or device.type == "meta" or capturing():
            return None
        weights, prior = self.dro.weights, self.dro.prior
        if weights.device != device:
            return None  # distill_loss names the device mismatch
        key = (acc, weights._version, prior._version)
        cached = self.__dict__.get("_log_c_cache")
        if cached is not None and cached[0] == key and cached[1] is weights and cached[2] is prior:
            return cached[3]
        with torch.no_grad():
            log_c = torch.log(self.costs.to(acc)).contiguous()  # finite: ClassDRO keeps lambda and pi > 0
        self.__dict__["_log_c_cache"] = (key, weights, prior, log_c)
        return log_c

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, objective={self.objective!r}, alpha={self.dro.alpha}, "
            f"temperature={self.temperature}, student_temperature={self.student_temperature}"
        )
