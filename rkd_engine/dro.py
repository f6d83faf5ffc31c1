"""``ClassDRO``: the class weights ``lambda`` of distributionally robust training over classes.

docs/dro.md (Algorithms 1 and 2 of the paper): ``lambda`` starts uniform on the simplex; every
update takes per-class risks ``R_j = risk_numerator_j / mass_j`` (the validation 0-1 error, or the
batch surrogate risk for online Group DRO) and does the exponentiated-gradient step
``lambda_j <- lambda_j exp(eta alpha R_j)`` renormalised over the classes present, so a class with zero
mass keeps its weight. ``beta = (1 - alpha)/m + alpha lambda`` and the class costs are ``c = beta / pi``.
Everything stays on the state's device: an update makes no host synchronisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from rkd_engine import reference


def _check_fraction(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if positive:
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    elif not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _device_update(weights: Tensor, risk_numerator: Tensor, mass: Tensor, alpha: float, step_size: float) -> bool:
    """Run the fused on-device update kernel where one exists for ``weights``; ``False`` otherwise."""
    if weights.device.type != "cuda" or weights.dtype != torch.float32:
        return False
    from rkd_engine.ops.dispatch import backend_module, unavailable_reason

    for name in ("triton", "cuda"):
        if unavailable_reason(name, weights.device, weights.dtype, weights.shape[0]) is None:
            module = backend_module(name)
            if hasattr(module, "dro_update_"):
                module.dro_update_(weights, risk_numerator, mass, alpha=alpha, step_size=step_size)
                return True
    return False


class ClassDRO(nn.Module):
    """Class weights ``lambda`` on the simplex with the exponentiated-gradient DRO update.

    Args:
        num_classes: ``m``.
        alpha: ``alpha`` in [0, 1], the weight of the robust part (``alpha = 0``: uniform ``beta``).
        step_size: ``eta > 0`` (paper: 0.1 for validation updates; 0.01 for online Group DRO).
        prior: ``pi`` (m,) > 0, the class prior the costs divide by (default uniform).

    Buffers (in ``state_dict``, moved by ``.to()``): ``weights`` (``lambda``), ``prior``,
    ``average_weights`` (the running mean of the iterates) and ``num_updates``.
    """

    def __init__(
        self, num_classes: int, *, alpha: float = 1.0, step_size: float = 0.1, prior: Tensor | None = None
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.alpha = _check_fraction("alpha", alpha)
        self.step_size = _check_fraction("step_size", step_size, positive=True)
        uniform = torch.full((num_classes,), 1.0 / num_classes)
        self.register_buffer("weights", uniform.clone())
        self.register_buffer("average_weights", uniform.clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.float32))
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
            prior = torch.as_tensor(prior, dtype=torch.float32)
        if tuple(prior.shape) != (self.num_classes,):
            raise ValueError(f"prior must have shape ({self.num_classes},), got {tuple(prior.shape)}")
        prior = prior.detach().to(device=self.prior.device, dtype=torch.float32)
        if not bool(torch.isfinite(prior).all()) or bool((prior <= 0).any()):
            raise ValueError(
                "prior must be finite and > 0 for every class (smooth empirical counts if a class is empty)"
            )
        self.prior.copy_(prior / prior.sum())

    @torch.no_grad()
    def update(self, risk_numerator: Tensor, mass: Tensor) -> None:
        """One exponentiated-gradient step, in place on the state's device, with no host synchronisation.

        ``risk_numerator`` and ``mass`` are (m,) per-class sums (``error`` and ``mass`` from
        ``distill_loss`` for the validation 0-1 update; ``risk`` and ``mass`` for online Group DRO).
        """
        for name, t in (("risk_numerator", risk_numerator), ("mass", mass)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != (self.num_classes,):
                raise ValueError(f"{name} must have shape ({self.num_classes},), got {tuple(t.shape)}")
            if t.device != self.weights.device:
                raise ValueError(f"{name} is on {t.device} but the DRO state is on {self.weights.device}")
        risk_numerator = risk_numerator.detach().to(self.weights.dtype).contiguous()
        mass = mass.detach().to(self.weights.dtype).contiguous()
        if not _device_update(self.weights, risk_numerator, mass, self.alpha, self.step_size):
            self.weights.copy_(
                reference.dro_update(self.weights, risk_numerator, mass, alpha=self.alpha, step_size=self.step_size)
            )
        self.num_updates.add_(1.0)
        self.average_weights.add_((self.weights - self.average_weights) / self.num_updates)

    def reset(self) -> None:
        """Back to uniform ``lambda`` (the prior is kept)."""
        self.weights.fill_(1.0 / self.num_classes)
        self.average_weights.fill_(1.0 / self.num_classes)
        self.num_updates.zero_()

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "alpha": self.alpha, "step_size": self.step_size}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("num_classes") != self.num_classes:
            raise ValueError(
                f"DRO state is for {state.get('num_classes')} classes, this ClassDRO has {self.num_classes}"
            )
        self.alpha = _check_fraction("alpha", state["alpha"])
        self.step_size = _check_fraction("step_size", state["step_size"], positive=True)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}, step_size={self.step_size}"
