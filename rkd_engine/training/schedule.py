"""Learning-rate schedule and batch order: both pure functions of the step, so a resumed run repeats them.

Learning rate (docs/protocol.md): linear warm-up from ``lr / warmup_steps`` to ``lr`` over
``warmup_steps`` steps, then multiplied by ``decay`` at each decay step. Batch order: epoch ``e`` visits
the training set in the permutation drawn from ``derive_seed(seed, "order", e)``; the last batch is
filled up from the start of the permutation, so every step sees exactly ``batch_size`` rows, and under
``torchrun`` rank ``r`` of ``R`` takes rows ``r, r + R, ...`` of each global batch.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from rkd_engine.training.runs import derive_seed


class WarmupStepDecay:
    """The multiplier of the peak learning rate at a step (a picklable ``LambdaLR`` function)."""

    def __init__(self, warmup_steps: int, decay_steps: Sequence[int], decay: float) -> None:
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = sorted(int(s) for s in decay_steps)
        self.decay = float(decay)

    def __call__(self, step: int) -> float:
        warm = (step + 1) / self.warmup_steps if step < self.warmup_steps else 1.0
        return warm * self.decay ** bisect.bisect_right(self.decay_steps, step)


def warmup_step_decay(
    optimizer: Optimizer, *, total_steps: int, warmup_steps: int, decay_at: Sequence[float], decay: float
) -> LambdaLR:
    """A ``LambdaLR`` with linear warm-up over ``warmup_steps`` and decay by ``decay`` at the fractions
    ``decay_at`` of ``total_steps``; step it once per training step."""
    decay_steps = [max(1, math.floor(t * total_steps)) for t in decay_at]
    return LambdaLR(optimizer, WarmupStepDecay(warmup_steps, decay_steps, decay))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Global steps in one epoch over ``n`` rows (the last batch is filled up)."""
    return max(1, math.ceil(n / batch_size))


def epoch_order(seed: int, epoch: int, n: int, batch_size: int) -> torch.Tensor:
    """Row indices of epoch ``epoch``, shape (steps_per_epoch, batch_size): a pure function of its inputs."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    perm = torch.randperm(n, generator=gen)
    steps = steps_per_epoch(n, batch_size)
    total = steps * batch_size
    if total > n:
        perm = perm.repeat(math.ceil(total / n))[:total]
    return perm.view(steps, batch_size)


def shard(rows: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s share of a global batch (every ``world_size``-th row, like ``DistributedSampler``)."""
    return rows[rank::world_size]


# The DRO schedule (docs/defaults.md). The paper's bound (Thm. 4) takes eta = (1 / (2 B Z))
# sqrt(log m / T) for T updates (the paper writes K; here K is the steps between two updates,
# --dro-every); the constant 1 / (2 B Z) is fixed here so that the paper's setting, m = 10 classes and
# about 100 updates, keeps its eta = 0.1.
DRO_REFERENCE_STEP = 0.1
DRO_REFERENCE_CLASSES = 10
DRO_REFERENCE_UPDATES = 100
DRO_UPDATES_PER_EPOCH = 4  # at least this many lambda updates an epoch ...
DRO_MAX_EVERY = 32  # ... but no fewer steps apart than the reference code's 32 when epochs are long


def default_dro_every(steps_in_epoch: int) -> int:
    """Training steps between DRO updates: ``steps_in_epoch // 4`` clipped to ``[1, 32]``.

    Long epochs get about 4 updates each (CIFAR-10-LT's ~97 steps: every 24), very long ones the
    reference code's every 32 steps; short ones (long-tailed digits: 5 steps) update every step, so
    any run makes updates enough to move ``lambda``.
    """
    if isinstance(steps_in_epoch, bool) or not isinstance(steps_in_epoch, int) or steps_in_epoch < 1:
        raise ValueError(f"steps_in_epoch must be an integer >= 1, got {steps_in_epoch!r}")
    return max(1, min(DRO_MAX_EVERY, steps_in_epoch // DRO_UPDATES_PER_EPOCH))


def default_dro_step(num_classes: int, updates: int) -> float:
    """The DRO step size for ``updates`` updates over ``num_classes`` classes.

    ``eta = 0.1 sqrt((log m / T) / (log 10 / 100))`` for ``T = updates``: the theory's ``sqrt(log m / T)``
    scaled so that ``m = 10, T = 100`` gives the paper's 0.1. Fewer updates take larger steps, so
    ``lambda`` covers the same distance in a short run; with no update at all (``T = 0``) it is 0.1.
    ``m < 2`` counts as 2.
    """
    for name, value, low in (("num_classes", num_classes, 1), ("updates", updates, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if updates == 0:
        return DRO_REFERENCE_STEP
    ratio = (math.log(max(2, num_classes)) / updates) / (math.log(DRO_REFERENCE_CLASSES) / DRO_REFERENCE_UPDATES)
    return DRO_REFERENCE_STEP * math.sqrt(ratio)


def distance_from_uniform(weights: torch.Tensor) -> torch.Tensor:
    """Total-variation distance ``(1/2) sum_j |lambda_j - 1/m|`` of the DRO weights from uniform, in [0, 1 - 1/m]."""
    m = weights.shape[-1]
    return 0.5 * (weights.float() - 1.0 / m).abs().sum(-1)
