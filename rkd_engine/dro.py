"""``ClassDRO``: the class weights ``lambda`` of distributionally robust training over classes.

docs/dro.md (Algorithms 1 and 2 of the paper): ``lambda`` starts uniform on the simplex; every
update takes per-class risks ``R_j = risk_numerator_j / mass_j`` (the validation 0-1 error, or the
batch surrogate risk for online Group DRO) and does the exponentiated-gradient step
``lambda_j <- lambda_j exp(eta alpha R_j)`` renormalised over the classes present, so a class with zero
mass keeps its weight. ``beta = (1 - alpha)/m + alpha lambda`` and the class costs are ``c = beta / pi``.
Everything stays on the state's device: an update makes no host synchronisation.

Numerical guarantees (for every valid setting, whatever the step size, the number of updates and the
risks): the step is taken in log space (``log lambda_j + eta alpha R_j``, renormalised with a
log-sum-exp), so a large ``eta R`` cannot overflow; every ``lambda_j`` is kept at or above
``LAMBDA_FLOOR`` (relative to the uniform ``1/m``), so ``lambda`` never underflows to 0; the prior is
refused below ``PRIOR_FLOOR``; hence every cost ``c_j`` and ``log c_j`` is finite. An update whose
statistics hold a NaN or an infinity (or a negative mass) leaves ``lambda`` unchanged instead of
poisoning it (no host synchronisation is spent on raising). The state (``lambda``, its average, the
prior, the update counter) stays in float32 whatever dtype the module is cast to (``.half()``,
``.to(torch.bfloat16)``): only its device follows.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from rkd_engine import reference

LAMBDA_FLOOR = 1e-20
"""Smallest ``lambda_j``, as a fraction of the uniform weight ``1/m`` (keeps ``c_j > 0`` and ``log c_j`` finite)."""
PRIOR_FLOOR = 1e-20
"""Smallest class prior ``pi_j`` accepted after normalisation (keeps ``c_j = beta_j / pi_j`` finite in float32)."""


def _check_fraction(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if positive:
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    elif not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


class ClassDRO(nn.Module):
    """Class weights ``lambda`` on the simplex with the exponentiated-gradient DRO update.

    Args:
        num_classes: ``m``.
        alpha: ``alpha`` in [0, 1], the weight of the robust part (``alpha = 0``: uniform ``beta``).
        step_size: ``eta > 0`` (paper: 0.1 for validation updates; 0.01 for online Group DRO).
        prior: ``pi`` (m,) > 0, the class prior the costs divide by (default uniform).

    Buffers (in ``state_dict``, moved by ``.to()``): ``weights`` (``lambda``), ``prior``,
    ``average_weights`` (the running mean of the iterates) and ``num_updates`` (an int64 device
    tensor, so a CUDA graph replay of the update advances it). They stay float32 (the counter int64)
    whatever dtype the module is cast to. Every ``lambda_j >= LAMBDA_FLOOR / m``: no cost is ever 0 or inf.
    """

    def __init__(
        self, num_classes: int, *, alpha: float = 1.0, step_size: float = 0.1, prior: Tensor | None = None
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        num_classes = int(num_classes)
        self.num_classes = num_classes
        # A standalone ClassDRO takes alpha from a loaded state; an owner whose objective fixes alpha
        # (``RobustDistillationLoss``) sets this so that a state of another alpha is refused instead.
        self.fixed_alpha = False
        self.alpha = _check_fraction("alpha", alpha)
        self.step_size = _check_fraction("step_size", step_size, positive=True)
        uniform = torch.full((num_classes,), 1.0 / num_classes)
        self.register_buffer("weights", uniform.clone())
        self.register_buffer("average_weights", uniform.clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("prior", uniform.clone())
        if prior is not None:
            self.set_prior(prior)

    @property
    def beta(self) -> Tensor:
        """``beta = (1 - alpha) / m + alpha * lambda``."""
        return reference.tradeoff_beta(self.weights, self.alpha)

    @property
    def costs(self) -> Tensor:
        """Class costs ``c = beta / pi`` for the margin loss."""
        return self.beta / self.prior

    def set_prior(self, prior: Tensor) -> None:
        """Set ``pi`` ((m,), > 0 and finite; it is normalised to sum to 1)."""
        if not isinstance(prior, Tensor):
            try:
                prior = torch.as_tensor(prior, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(
                    f"prior must be a tensor of {self.num_classes} numbers, got {type(prior).__name__}"
                ) from None
        if tuple(prior.shape) != (self.num_classes,):
            raise ValueError(f"prior must have shape ({self.num_classes},), got {tuple(prior.shape)}")
        prior = prior.detach().to(device=self.prior.device, dtype=torch.float64)
        if not bool(torch.isfinite(prior).all()) or bool((prior <= 0).any()):
            raise ValueError(
                "prior must be finite and > 0 for every class (smooth empirical counts if a class is empty)"
            )
        prior = prior / prior.max()  # float64 and scaled first: 1e38 entries cannot overflow the sum
        prior = prior / prior.sum()
        smallest = float(prior.min())
        if smallest < PRIOR_FLOOR:
            raise ValueError(
                f"prior: the smallest normalised class prior is {smallest:.3g}, below {PRIOR_FLOOR:g}, so its cost "
                "1/pi would not be finite; clamp the prior (e.g. prior.clamp_min(1e-8)) first"
            )
        self.prior.copy_(prior.to(torch.float32))

    @torch.no_grad()
    def update(self, risk_numerator: Tensor, mass: Tensor) -> None:
        """One exponentiated-gradient step, in place on the state's device, with no host synchronisation.

        ``risk_numerator`` and ``mass`` are (m,) per-class sums (``error`` and ``mass`` from
        ``distill_loss`` for the validation 0-1 update; ``risk`` and ``mass`` for online Group DRO).
        The step is taken in log space and ``lambda`` is floored (see the module docstring); statistics
        with a NaN, an infinity or a negative mass leave the state unchanged.
        """
        for name, t in (("risk_numerator", risk_numerator), ("mass", mass)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != (self.num_classes,):
                raise ValueError(f"{name} must have shape ({self.num_classes},), got {tuple(t.shape)}")
            if t.device != self.weights.device:
                raise ValueError(f"{name} is on {t.device} but the DRO state is on {self.weights.device}")
        risk_numerator = risk_numerator.detach().float()
        mass = mass.detach().float()
        new = log_space_dro_update(self.weights, risk_numerator, mass, alpha=self.alpha, step_size=self.step_size)
        ok = torch.isfinite(risk_numerator).all() & torch.isfinite(mass).all() & (mass >= 0).all()
        self.weights.copy_(torch.where(ok, new, self.weights))
        self.num_updates.add_(ok.to(self.num_updates.dtype))
        count = self.num_updates.clamp_min(1).to(torch.float32)
        self.average_weights.add_(torch.where(ok, (self.weights - self.average_weights) / count, 0.0))

    def reset(self) -> None:
        """Back to uniform ``lambda`` (the prior is kept)."""
        self.weights.fill_(1.0 / self.num_classes)
        self.average_weights.fill_(1.0 / self.num_classes)
        self.num_updates.zero_()

    def _apply(self, fn: Any, recurse: bool = True) -> ClassDRO:
        # ``.half()``, ``.to(dtype)`` and friends would round lambda and saturate the counter: let only the
        # device follow ``fn``, and keep every buffer's own dtype.
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "alpha": self.alpha, "step_size": self.step_size}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("num_classes") != self.num_classes:
            raise ValueError(
                f"DRO state is for {state.get('num_classes')} classes, this ClassDRO has {self.num_classes}"
            )
        alpha = _check_fraction("alpha", state["alpha"])
        if self.fixed_alpha and alpha != self.alpha:
            raise ValueError(
                f"DRO state has alpha = {alpha}, this module has alpha = {self.alpha} (a state of another "
                "objective or trade-off); build the module with the state's objective and alpha"
            )
        self.alpha = alpha
        self.step_size = _check_fraction("step_size", state["step_size"], positive=True)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}, step_size={self.step_size}"


def log_space_dro_update(
    weights: Tensor, risk_numerator: Tensor, mass: Tensor, *, alpha: float, step_size: float
) -> Tensor:
    """``reference.dro_update`` computed in log space with ``lambda`` floored: never 0, inf or NaN.

    ``log lambda_j + eta alpha R_j`` over the classes present (``mass_j > 0``), renormalised with a
    log-sum-exp to the mass the present classes held before, then ``lambda_j >= LAMBDA_FLOOR / m``
    and a final renormalisation over the classes present. Classes without mass keep their weight.
    Returns the new weights (float32; the inputs are not modified). No host synchronisation.
    """
    m = weights.shape[-1]
    floor = LAMBDA_FLOOR / m
    weights = weights.float().clamp_min(floor)
    present = mass > 0
    ratio = risk_numerator / torch.where(present, mass, torch.ones_like(mass))
    ratio = torch.where(present, ratio, torch.zeros_like(ratio))
    logits = torch.where(present, weights.log() + step_size * alpha * ratio, torch.full_like(weights, -math.inf))
    held = torch.where(present, weights, torch.zeros_like(weights)).sum()
    top = logits.max().clamp_min(-1e30)  # finite even when no class is present
    grown = torch.exp(logits - top)  # in (0, 1], the largest exactly 1
    new = grown / grown.sum().clamp_min(1e-30) * held
    new = torch.where(present, new.clamp_min(floor), weights)
    # Renormalise the present classes to the mass they held (the floor may have added a little).
    new_held = torch.where(present, new, torch.zeros_like(new)).sum()
    scale = torch.where(new_held > 0, held / new_held.clamp_min(1e-30), torch.ones_like(new_held))
    return torch.where(present, (new * scale).clamp_min(floor), weights)
