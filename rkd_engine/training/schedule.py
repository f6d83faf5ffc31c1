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
