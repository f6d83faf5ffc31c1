"""Lightning adapter: ``RobustDistillationModule`` (``pip install rkd-engine[lightning]``).

A ``LightningModule`` that distils the user's ``student`` from a frozen ``teacher`` with rkd's fused
loss: batches are ``(x, y)``, the target is ``q = (1 - a) e_y + a p`` with ``p = softmax(g / gamma)``
and ``a = teacher_weight`` given explicitly, and the loss of a batch is its mean over the batch's rows.
For the robust and trade-off objectives a ``DROSchedule`` moves ``lambda`` every ``dro_every``
optimiser steps from a validation set ``dro_data = (x_val, y_val)`` (one-hot target, or the teacher's
``softmax(g / dro_val_gamma)`` with ``dro_target="teacher"``); the statistics are summed over processes
under DDP. Validation logs accuracy, balanced, worst-class and per-class accuracy and the DRO weights
through Lightning's logger; checkpoints carry the DRO state (``checkpoint["rkd_dro"]``), and the
teacher is kept out of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from rkd_engine.integrations.common import batch_distill_loss, check_teacher_weight, flat_classification_metrics
from rkd_engine.losses import RobustDistillationLoss
from rkd_engine.training.dro_schedule import DROSchedule

DRO_TARGETS = ("onehot", "teacher")
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


class RobustDistillationModule(pl.LightningModule):
    """Distil ``student`` from a frozen ``teacher`` with the objective of ``loss``.

    Args:
        student: maps a batch of inputs ``x`` to scores ``f`` (B, m).
        teacher: maps the same ``x`` to scores ``g`` (B, m); frozen, in eval mode, not checkpointed.
        loss: the ``RobustDistillationLoss`` (objective, ``gamma``, ``tau``, prior ``pi``, DRO state).
        teacher_weight: ``a`` of the target ``q = (1 - a) e_y + a p`` (1: the teacher only).
        optimizer: ``optimizer(student.parameters())`` builds the optimiser (default SGD, lr 0.1, momentum 0.9).
        dro_data: ``(x_val, y_val)`` tensors for the DRO updates (robust and trade-off objectives).
        dro_every, dro_target, dro_val_gamma, dro_val_batch: see ``DROSchedule``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss: RobustDistillationLoss,
        *,
        teacher_weight: float = 1.0,
        optimizer: OptimizerFactory | None = None,
        dro_data: tuple[Tensor, Tensor] | None = None,
        dro_every: int = 32,
        dro_target: str = "onehot",
        dro_val_gamma: float | None = None,
        dro_val_batch: int = 4096,
        eval_batch: int = 1024,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError("student and teacher must be torch.nn.Modules")
        if not isinstance(loss, RobustDistillationLoss):
            raise TypeError(f"loss must be a rkd_engine.RobustDistillationLoss, got {type(loss).__name__}")
        if dro_target not in DRO_TARGETS:
            raise ValueError(f"dro_target must be one of {DRO_TARGETS}, got {dro_target!r}")
        self.robust = loss.objective in ("robust", "tradeoff")
        if self.robust:
            if dro_data is None:
                raise ValueError(
                    f"objective {loss.objective!r} moves its class weights on validation data: pass dro_data"
                )
            x_val, y_val = dro_data
            if not isinstance(x_val, Tensor) or not isinstance(y_val, Tensor) or x_val.shape[0] != y_val.shape[0]:
                raise ValueError("dro_data must be (x_val, y_val) tensors with as many rows")
        self.student = student
        self.loss = loss
        # The teacher is no submodule, so it stays out of state_dict and checkpoints; on_fit_start moves it.
        object.__setattr__(self, "teacher", teacher.eval())
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher_weight = check_teacher_weight(teacher_weight)
        self.optimizer_factory = optimizer or _default_optimizer
        self.dro_data = dro_data if self.robust else None
        self.dro_every = dro_every
        self.dro_target = dro_target
        self.dro_val_gamma = loss.temperature if dro_val_gamma is None else dro_val_gamma
        self.dro_val_batch = dro_val_batch
        self.eval_batch = eval_batch
        self.dro_schedule: DROSchedule | None = None
        self._pending_dro_state: dict | None = None
        self._val_logits: list[Tensor] = []
        self._val_labels: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.student.parameters())

    # ----------------------------------------------------------------------------------- training
    @torch.no_grad()
    def _scores(self, module: nn.Module, x: Tensor) -> Tensor:
        return torch.cat([module(x[i : i + self.eval_batch]).float() for i in range(0, x.shape[0], self.eval_batch)])

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)
        if not self.robust or self.dro_schedule is not None:
            return
        x_val, y_val = (t.to(self.device) for t in self.dro_data)
        self.dro_data = (x_val, y_val)
        kwargs = {
            "every": self.dro_every,
            "val_batch": self.dro_val_batch,
            "seed": 0,
            "backend": self.loss.backend,
            "rank": self.global_rank,
            "world_size": self.trainer.world_size,
        }
        if self.dro_target == "teacher":
            g = self._scores(self.teacher, x_val)
            schedule = DROSchedule.from_teacher_logits(self.loss, g, val_gamma=self.dro_val_gamma, **kwargs)
        else:
            schedule = DROSchedule(self.loss, labels=y_val, **kwargs)
        if self._pending_dro_state is not None:
            schedule.load_state_dict(self._pending_dro_state)
            self._pending_dro_state = None
        self.dro_schedule = schedule

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        f = self.student(x)
        with torch.no_grad():
            g = self.teacher(x)
        loss = batch_distill_loss(self.loss, f, g, y, teacher_weight=self.teacher_weight, causal=False).loss
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=f.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        schedule = self.dro_schedule
        step = self.global_step  # optimiser steps done; unchanged between accumulated micro-batches
        if schedule is None or schedule.last_step == step:
            return
        x_val = self.dro_data[0]

        def score(rows: Tensor) -> Tensor:
            was_training = self.student.training
            self.student.eval()
            try:
                return self._scores(self.student, x_val[rows])
            finally:
                self.student.train(was_training)

        schedule.maybe_update(step, score)

    # --------------------------------------------------------------------------------- validation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self._val_logits.append(self.student(x).float().detach())
        self._val_labels.append(y.detach())

    def on_validation_epoch_end(self) -> None:
        if not self._val_logits:
            return
        logits, labels = torch.cat(self._val_logits), torch.cat(self._val_labels)
        self._val_logits, self._val_labels = [], []
        if self.trainer.world_size > 1:
            logits = self.all_gather(logits).flatten(0, 1)
            labels = self.all_gather(labels).flatten(0, 1)
        metrics = flat_classification_metrics(logits.cpu(), labels.cpu(), self.loss.num_classes, prefix="val/")
        if self.robust:
            for j, w in enumerate(self.loss.dro.weights.tolist()):
                metrics[f"dro/weight_{j}"] = w
        self.log_dict(metrics, sync_dist=False, rank_zero_only=True)

    # -------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.dro_schedule is not None:
            checkpoint["rkd_dro"] = self.dro_schedule.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("rkd_dro")
        if state is None:
            return
        if self.dro_schedule is not None:
            self.dro_schedule.load_state_dict(state)
        else:
            self._pending_dro_state = state
