"""``DROSchedule``: the validation DRO step of docs/dro.md, independent of any training loop.

Every ``K`` optimiser steps the schedule draws a validation batch (all ``N`` rows, or ``val_batch`` of
them chosen by ``derive_seed(seed, "val", step)``), asks the caller for the student's scores on this
process's share of those rows, sums the per-class 0-1 error ``error_j`` and mass ``mass_j`` of the
validation target (teacher-labelled ``p = softmax(g / val_gamma)`` or one-hot ``e_y``) over the
processes, and moves ``lambda <- lambda exp(eta alpha error_j / mass_j)`` in the loss's ``ClassDRO``.

The training loop only says which step it is at and how to score rows::

    schedule = DROSchedule(loss, every=32, labels=val_y)                 # or teacher_probs=p_val
    ...
    optimizer.step()
    step += 1
    schedule.maybe_update(step, lambda rows: model(val_x[rows]))

Nothing reads a tensor back to the host: the row choice is a CPU generator, the statistics and the
update stay on the device. rkd's engine, the Hugging Face ``Trainer`` adapter and the Lightning adapter
all use this object; its state (the loss's ``lambda`` and the number of updates) rides in checkpoints
through ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rkd_engine.dro import ClassDRO
from rkd_engine.losses import RobustDistillationLoss, distill_loss
from rkd_engine.training.runs import derive_seed

Reducer = Callable[..., None]


def _default_reducer(*tensors: Tensor) -> None:
    """Sum ``tensors`` in place over the default process group (nothing when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _default_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class DROSchedule:
    """The validation DRO update every ``every`` optimiser steps, for any training loop.

    Args:
        loss: the ``RobustDistillationLoss`` whose ``lambda`` moves (a no-op schedule for the
            ``"standard"`` and ``"balanced"`` objectives), or a bare ``ClassDRO``.
        every: ``K >= 1``, optimiser steps between updates.
        labels: one-hot validation target ``y`` (N,) integers in ``[0, m)``; or
        teacher_probs: teacher-labelled validation target ``p`` (N, m) (see ``from_teacher_logits``).
        val_batch: rows per update (all of them when ``N`` or fewer).
        seed: seed of the row choice (a pure function of ``seed`` and the step, so a resumed run repeats it).
        backend: ``distill_loss`` backend for the statistics.
        rank, world_size: this process's share of each validation batch (default: ``torch.distributed``'s).
        reduce: sums tensors in place over processes (default: ``torch.distributed.all_reduce`` when a
            process group is initialised).
    """

    def __init__(
        self,
        loss: RobustDistillationLoss | ClassDRO,
        *,
        every: int,
        labels: Tensor | None = None,
        teacher_probs: Tensor | None = None,
        val_batch: int = 4096,
        seed: int = 0,
        backend: str = "auto",
        rank: int | None = None,
        world_size: int | None = None,
        reduce: Reducer | None = None,
    ) -> None:
        if not isinstance(loss, (RobustDistillationLoss, ClassDRO)):
            raise TypeError(f"loss must be a RobustDistillationLoss or a ClassDRO, got {type(loss).__name__}")
        for name, value in (("every", every), ("val_batch", val_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if (labels is None) == (teacher_probs is None):
            raise ValueError("DROSchedule needs exactly one validation target: labels=(N,) or teacher_probs=(N, m)")
        m = loss.num_classes
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
                raise ValueError("labels must be a (N,) integer tensor of validation labels")
            n = labels.shape[0]
        else:
            if not isinstance(teacher_probs, Tensor) or teacher_probs.dim() != 2 or teacher_probs.shape[1] != m:
                raise ValueError(f"teacher_probs must be a (N, {m}) tensor of validation teacher probabilities")
            n = teacher_probs.shape[0]
        if n < 1:
            raise ValueError("the validation target is empty (N = 0)")
        default_rank, default_world = _default_rank()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, world_size={self.world_size}), got {self.rank}")
        self.loss = loss
        self.every = every
        self.labels = labels
        self.teacher_probs = teacher_probs
        self.num_rows = n
        self.val_batch = val_batch
        self.seed = int(seed)
        self.backend = backend
        self.reduce = _default_reducer if reduce is None else reduce
        self.num_updates = 0
        self.last_step = 0

    @classmethod
    def from_teacher_logits(
        cls, loss: RobustDistillationLoss | ClassDRO, teacher_logits: Tensor, *, val_gamma: float, **kwargs: Any
    ) -> DROSchedule:
        """A schedule with the teacher-labelled target ``p = softmax(g / val_gamma)`` of validation scores ``g``."""
        if not isinstance(val_gamma, (int, float)) or isinstance(val_gamma, bool) or not val_gamma > 0:
            raise ValueError(f"val_gamma must be a number > 0, got {val_gamma!r}")
        probs = torch.softmax(teacher_logits.detach().float() / float(val_gamma), dim=1)
        return cls(loss, teacher_probs=probs, **kwargs)

    @property
    def active(self) -> bool:
        """Whether updates move anything (robust and trade-off objectives, or a bare ``ClassDRO``)."""
        return isinstance(self.loss, ClassDRO) or self.loss.objective in ("robust", "tradeoff")

    @property
    def dro(self) -> ClassDRO:
        return self.loss if isinstance(self.loss, ClassDRO) else self.loss.dro

    def due(self, step: int) -> bool:
        """Whether optimiser step ``step`` (counted from 1) ends with an update."""
        return self.active and step > 0 and step % self.every == 0

    def rows(self, step: int, device: torch.device | str | None = None) -> Tensor:
        """This process's validation rows for the update after ``step`` (indices into the target)."""
        n = self.num_rows
        if self.val_batch >= n:
            rows = torch.arange(n)
        else:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "val", step))
            rows = torch.randperm(n, generator=gen)[: self.val_batch]
        rows = rows[self.rank :: self.world_size]
        return rows if device is None else rows.to(device)

    @torch.no_grad()
    def statistics(self, student_logits: Tensor | None, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Per-class ``(error, mass)`` of scores ``f`` (len(rows), m) against the target at ``rows``, summed
        over processes. ``student_logits`` may be ``None`` on a process with no rows."""
        device = self.dro.weights.device
        m = self.dro.num_classes
        error = torch.zeros(m, device=device)
        mass = torch.zeros(m, device=device)
        if student_logits is not None and rows.numel():
            if tuple(student_logits.shape) != (rows.numel(), m):
                raise ValueError(
                    f"the validation scores must have shape ({rows.numel()}, {m}), got {tuple(student_logits.shape)}"
                )
            f = student_logits.detach()
            target_rows = rows.to(self.labels.device if self.labels is not None else self.teacher_probs.device)
            if self.teacher_probs is not None:
                p = self.teacher_probs[target_rows].to(device=f.device, dtype=f.dtype)
                stats = distill_loss(f, teacher_probs=p, backend=self.backend, validate=False)
            else:
                y = self.labels[target_rows].to(f.device)
                stats = distill_loss(f, labels=y, backend=self.backend, validate=False)
            error += stats.error.float().to(device)
            mass += stats.mass.float().to(device)
        self.reduce(error, mass)
        return error, mass

    @torch.no_grad()
    def update(self, error: Tensor, mass: Tensor) -> None:
        """One DRO step from already reduced statistics."""
        if isinstance(self.loss, ClassDRO):
            self.loss.update(error, mass)
        else:
            self.loss.update_weights(error, mass)
        self.num_updates += 1

    @torch.no_grad()
    def maybe_update(
        self, step: int, score: Callable[[Tensor], Tensor | None], device: torch.device | str | None = None
    ) -> bool:
        """After optimiser step ``step``: when due, score this process's rows with ``score(rows)`` (the
        student's (len(rows), m) logits, in eval mode as the caller sees fit) and update ``lambda``.

        ``rows`` are on ``device`` (default the DRO state's). Returns whether an update ran. Every
        process must call this at the same steps (the statistics are summed over them).
        """
        if not self.due(step):
            return False
        rows = self.rows(step, self.dro.weights.device if device is None else device)
        f = score(rows) if rows.numel() else None
        error, mass = self.statistics(f, rows)
        self.update(error, mass)
        self.last_step = step
        return True

    def state_dict(self) -> dict[str, Any]:
        """The DRO state (``lambda``, its running mean, the prior) and the schedule's counters."""
        return {
            "dro": self.dro.state_dict(),
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "every": self.every,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (the class count must match)."""
        if not isinstance(state, dict) or "dro" not in state:
            raise ValueError("not a DROSchedule state (expected a dict with a 'dro' entry)")
        self.dro.load_state_dict(state["dro"])
        self.num_updates = int(state.get("num_updates", 0))
        self.last_step = int(state.get("last_step", 0))

    def __repr__(self) -> str:
        target = "teacher_probs" if self.teacher_probs is not None else "labels"
        return (
            f"DROSchedule(every={self.every}, target={target}, rows={self.num_rows}, val_batch={self.val_batch}, "
            f"updates={self.num_updates})"
        )
