"""Hugging Face ``Trainer`` adapter: ``RobustDistillationTrainer`` (``pip install rkd-engine[hf]``).

A ``transformers.Trainer`` whose ``compute_loss`` is rkd's fused distillation loss against a frozen
teacher, for sequence classification (one row per example, ``logits`` (B, m)) and causal language
models (one row per token: position ``t`` is scored against the label at ``t + 1``; ``-100`` labels
are ignored). The student is called without ``labels``, so the model adds no cross-entropy term of its
own: the target is ``q = (1 - a) e_y + a p`` with ``a = teacher_weight`` given explicitly, and
``p = softmax(g / gamma)`` uses the loss's distillation temperature ``gamma`` (nothing to do with a
generation temperature).

Causal LMs with a plain linear head: when ``model.get_output_embeddings()`` is a plain ``nn.Linear``
applied as is to the last hidden states of ``model.base_model`` (checked once, on the first batch's
first row), the student is run without its head and the head is fused into the loss
(``rkd_engine.wide.fused_linear_distill_loss``), so the (tokens, vocab) student scores are never
materialised; a teacher with such a head gives its hidden states and head the same way, any other
teacher dense logits. The logits path is taken instead when the head is anything else (a wrapped or
adapter layer, a scaled or soft-capped output such as Gemma's or Granite's), when the model is wrapped
for distributed training (DDP, FSDP, DeepSpeed: the head must be called through the wrapper), and
when the caller wants the outputs (``return_outputs=True``: evaluation with predictions).

Gradient accumulation: the summed loss of a micro-batch is divided by ``num_items_in_batch``, the
rows of the whole accumulated batch (examples, or kept next-token labels), so ``k`` micro-batches of
``B`` give the gradient of one batch of ``k B``. The adapter counts the rows itself, for any model.

DRO (robust and trade-off objectives, classification): give ``dro_dataset`` (a balanced validation
set with ``labels``) and every ``dro_every`` optimiser steps a ``DROSchedule`` moves ``lambda``; its
state is written next to every Trainer checkpoint (``rkd_dro.pt``) and restored on resume.
Evaluation logs accuracy, balanced, worst-class and per-class accuracy (``eval_class_j_accuracy``)
and the DRO weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from rkd_engine.integrations.common import (
    IGNORE_INDEX,
    batch_distill_loss,
    causal_lm_linear_loss,
    check_teacher_weight,
    flat_classification_metrics,
)
from rkd_engine.losses import RobustDistillationLoss
from rkd_engine.training.dro_schedule import DROSchedule

if not hasattr(Trainer, "loss_is_scaled_for_ga"):  # older Trainers rescale a custom loss for accumulation
    raise ImportError(
        "rkd_engine.integrations.hf needs a transformers whose Trainer has loss_is_scaled_for_ga "
        "(pip install 'rkd-engine[hf]')"
    )

TASKS = ("auto", "sequence-classification", "causal-lm")
DRO_TARGETS = ("onehot", "teacher")
DRO_STATE_FILE = "rkd_dro.pt"


def classification_metrics(num_classes: int) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for ``Trainer``: accuracy, balanced, worst-class and per-class accuracy."""

    def compute(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return flat_classification_metrics(logits, labels, num_classes)

    return compute


def _logits(outputs: Any) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    raise TypeError(f"cannot find logits in the model output ({type(outputs).__name__})")


# Config entries by which some causal LMs change their scores after the output layer (not a plain head).
_SCORE_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_PROBE_TOKENS = 8


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """``model``'s output layer when it is a bare ``nn.Linear`` behind ``model.base_model``, else ``None``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    base = getattr(model, "base_model", None)
    if type(head) is not nn.Linear:
        return None
    if not isinstance(base, nn.Module) or base is model:
        return None
    config = getattr(model, "config", None)
    for name in _SCORE_TRANSFORMS:
        if getattr(config, name, None) not in (None, 0, 1, 1.0, 0.0):
            return None
    return head


def _probe_inputs(inputs: Mapping[str, Any], ids: Tensor) -> dict[str, Any]:
    """The first row and first few positions of a batch (tensors shaped like ``ids``; others their first row)."""
    batch, length = ids.shape[:2]
    out = {}
    for key, value in inputs.items():
        if isinstance(value, Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (batch, length):
            value = value[:1, :_PROBE_TOKENS]
        elif isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            value = value[:1]
        out[key] = value
    return out


@torch.no_grad()
def _head_applies(model: nn.Module, head: nn.Linear, probe: Mapping[str, Any]) -> bool:
    """Whether ``model(**probe).logits`` is ``X W^T + b`` of ``X = model.base_model(**probe)[0]`` and the head's
    ``W, b`` (once per model, in eval mode; a hook that changes the head's output fails it)."""
    was_training = model.training
    model.eval()
    try:
        full = _logits(model(**probe)).float()
        mine = nn.functional.linear(model.base_model(**probe)[0], head.weight, head.bias).float()
    except Exception:  # a base model that does not take the same inputs: not the layout assumed
        return False
    finally:
        model.train(was_training)
    if full.shape != mine.shape:
        return False
    scale = max(1.0, float(full.abs().max()))
    return bool(torch.allclose(mine, full, rtol=1e-3, atol=1e-3 * scale))


class _DROCallback(TrainerCallback):
    """Runs the DRO schedule after optimiser steps and stores its state next to every checkpoint."""

    def __init__(self, trainer: RobustDistillationTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D401 - TrainerCallback hook
        self.trainer._dro_step(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        schedule = self.trainer.dro_schedule
        if schedule is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            tmp = os.path.join(folder, DRO_STATE_FILE + ".tmp")
            torch.save(schedule.state_dict(), tmp)
            os.replace(tmp, os.path.join(folder, DRO_STATE_FILE))


class RobustDistillationTrainer(Trainer):
    """A ``Trainer`` distilling ``model`` from a frozen ``teacher`` with rkd's objective.

    Args (besides ``Trainer``'s):
        teacher: the frozen teacher, called with the same inputs as the student (minus ``labels``);
            moved to the training device and put in eval mode.
        loss: the ``RobustDistillationLoss`` giving the objective, ``gamma``, ``tau``, the prior ``pi``
            (``loss.set_prior``: the teacher marginal on the training set) and the DRO state.
        teacher_weight: ``a`` of the target ``q = (1 - a) e_y + a p`` (1: the teacher only; there is no
            other cross-entropy term).
        task: ``"sequence-classification"``, ``"causal-lm"`` or ``"auto"`` (from the labels' rank). A causal
            LM whose ``get_output_embeddings()`` is a plain ``nn.Linear`` on ``model.base_model``'s last hidden
            states is trained through the fused output layer (no (tokens, vocab) student logits); the logits
            path is taken for any other head, a wrapped (DDP, FSDP) model, or ``return_outputs=True``.
        dro_dataset: validation examples (with ``labels``) for the DRO updates; needed by the robust and
            trade-off objectives.
        dro_every: ``K``, optimiser steps between DRO updates.
        dro_target: ``"onehot"`` (the labels) or ``"teacher"`` (``softmax(g / dro_val_gamma)``).
        dro_val_gamma: teacher temperature of the ``"teacher"`` target (default: the loss's ``gamma``).
        dro_val_batch: validation rows per update.
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module,
        loss: RobustDistillationLoss,
        teacher_weight: float = 1.0,
        task: str = "auto",
        dro_dataset: Any = None,
        dro_every: int = 32,
        dro_target: str = "onehot",
        dro_val_gamma: float | None = None,
        dro_val_batch: int = 4096,
        ignore_index: int = IGNORE_INDEX,
        **kwargs: Any,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if not isinstance(loss, RobustDistillationLoss):
            raise TypeError(f"loss must be a rkd_engine.RobustDistillationLoss, got {type(loss).__name__}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if dro_target not in DRO_TARGETS:
            raise ValueError(f"dro_target must be one of {DRO_TARGETS}, got {dro_target!r}")
        robust = loss.objective in ("robust", "tradeoff")
        if robust and dro_dataset is None:
            raise ValueError(
                f"objective {loss.objective!r} moves its class weights on validation data: pass dro_dataset"
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func would replace rkd's loss: leave it out")
        num_classes = loss.num_classes
        if "compute_metrics" not in kwargs and task != "causal-lm":
            kwargs["compute_metrics"] = classification_metrics(num_classes)
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.rkd_loss = loss.to(self.args.device)
        self.teacher_weight = check_teacher_weight(teacher_weight)
        self.task = task
        self.ignore_index = ignore_index
        self.dro_dataset = dro_dataset if robust else None
        self.dro_every = dro_every
        self.dro_target = dro_target
        self.dro_val_gamma = loss.temperature if dro_val_gamma is None else dro_val_gamma
        self.dro_val_batch = dro_val_batch
        self.dro_schedule: DROSchedule | None = None
        self._pending_dro_state: dict | None = None
        # "student" / "teacher": (the model, its fused head or None), decided once per model
        self._heads: dict[str, tuple[nn.Module, nn.Linear | None]] = {}
        self.add_callback(_DROCallback(self))

    # The loss returned by compute_loss is already divided by the rows of the accumulated batch.
    loss_is_scaled_for_ga = True

    # ------------------------------------------------------------------------------------ rows
    def _is_causal(self, labels: Tensor | None, logits: Tensor | None = None) -> bool:
        if self.task != "auto":
            return self.task == "causal-lm"
        if logits is not None:
            return logits.dim() == 3
        return labels is not None and labels.dim() == 2

    def _count_rows(self, batch: Mapping[str, Any]) -> Tensor | int:
        labels = batch.get("labels")
        if labels is None:
            first = next(v for v in batch.values() if isinstance(v, Tensor))
            return first.shape[0]
        if self._is_causal(labels):
            return (labels[:, 1:] != self.ignore_index).sum()
        return labels.shape[0]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimiser step and their total row count (examples, or kept tokens)."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        count = sum(torch.as_tensor(self._count_rows(b)).to(device) for b in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return batch_samples, count

    # ------------------------------------------------------------------------------------ loss
    def fused_head(self, role: str, model: nn.Module, inputs: Mapping[str, Any]) -> nn.Linear | None:
        """The plain linear head of ``model`` (``role`` "student" or "teacher") fused into the causal-LM
        loss, or ``None`` for the logits path; decided on the first batch and kept."""
        known = self._heads.get(role)
        if known is None or known[0] is not model:  # a new model (e.g. from model_init) is checked anew
            head = _plain_head(model)
            ids = inputs.get("input_ids")
            if head is not None and isinstance(ids, Tensor) and ids.dim() == 2:
                known = (model, head if _head_applies(model, head, _probe_inputs(inputs, ids)) else None)
            else:
                known = (model, None)
            self._heads[role] = known
        return known[1]

    def _fused_causal_loss(self, model, inputs, labels, num_items_in_batch) -> Tensor | None:
        """The causal-LM loss with the output layers fused (``None`` when the student's head is not plain)."""
        if model is not self.model or not self._is_causal(labels) or labels.dim() != 2:
            return None  # wrapped (DDP, FSDP...): the head must be called through the wrapper
        head = self.fused_head("student", model, inputs)
        if head is None:
            return None
        hidden = model.base_model(**inputs)[0]
        teacher: dict[str, Any] = {}
        with torch.no_grad():
            t_head = self.fused_head("teacher", self.teacher, inputs)
            if t_head is not None:
                teacher = {
                    "teacher_hidden": self.teacher.base_model(**inputs)[0],
                    "teacher_head_weight": t_head.weight,
                    "teacher_head_bias": t_head.bias,
                }
            else:
                teacher = {"teacher_logits": _logits(self.teacher(**inputs))}
        out = causal_lm_linear_loss(
            self.rkd_loss,
            hidden,
            head.weight,
            head.bias,
            labels,
            teacher_weight=self.teacher_weight,
            normalizer=num_items_in_batch,
            ignore_index=self.ignore_index,
            **teacher,
        )
        return out.loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """rkd's distillation loss of the batch divided by ``num_items_in_batch`` (the mean over kept rows without it).

        A causal LM whose head is a plain linear layer takes the fused path (see the module's docstring)
        unless ``return_outputs`` asks for the model's outputs.
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        outputs = loss = None
        if not return_outputs and labels is not None:
            loss = self._fused_causal_loss(model, inputs, labels, num_items_in_batch)
        if loss is None:
            outputs = model(**inputs)
            loss = self._logits_loss(_logits(outputs), inputs, labels, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP averages the gradients; the normaliser counted every process
        return (loss, outputs) if return_outputs else loss

    def _logits_loss(self, f: Tensor, inputs: Mapping[str, Any], labels: Tensor | None, num_items_in_batch) -> Tensor:
        """The loss from the student's scores ``f`` and the teacher's dense logits."""
        with torch.no_grad():
            g = _logits(self.teacher(**inputs))
        if g.shape != f.shape:
            raise ValueError(f"teacher logits {tuple(g.shape)} do not match the student's {tuple(f.shape)}")
        out = batch_distill_loss(
            self.rkd_loss,
            f,
            g,
            labels,
            teacher_weight=self.teacher_weight,
            causal=self._is_causal(labels, f),
            normalizer=num_items_in_batch,
            ignore_index=self.ignore_index,
        )
        return out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """``Trainer.prediction_step``; a loss-only evaluation of a causal LM takes the fused path too."""
        if prediction_loss_only and "labels" in inputs:
            inputs = self._prepare_inputs(inputs)
            labels = inputs["labels"]
            with torch.no_grad():
                loss = self._fused_causal_loss(model, {k: v for k, v in inputs.items() if k != "labels"}, labels, None)
            if loss is not None:
                return loss.detach(), None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # ------------------------------------------------------------------------------------- DRO
    def _collate_rows(self, rows: list[int]) -> dict[str, Any]:
        batch = self.data_collator([self.dro_dataset[i] for i in rows])
        return self._prepare_inputs(batch)

    @torch.no_grad()
    def _dro_logits(self, module: nn.Module, rows: list[int], batch_size: int) -> Tensor:
        out = []
        for i in range(0, len(rows), batch_size):
            batch = dict(self._collate_rows(rows[i : i + batch_size]))
            batch.pop("labels", None)
            out.append(_logits(module(**batch)).float())
        return torch.cat(out)

    def _build_dro_schedule(self) -> None:
        if self.dro_dataset is None or self.dro_schedule is not None:
            return
        n = len(self.dro_dataset)
        all_rows = list(range(n))
        kwargs = {
            "every": self.dro_every,
            "val_batch": self.dro_val_batch,
            "seed": self.args.seed,
            "backend": self.rkd_loss.backend,
            "rank": self.args.process_index,
            "world_size": self.args.world_size,
        }
        if self.dro_target == "teacher":
            g = self._dro_logits(self.teacher, all_rows, self.args.per_device_eval_batch_size)
            schedule = DROSchedule.from_teacher_logits(self.rkd_loss, g, val_gamma=self.dro_val_gamma, **kwargs)
        else:
            labels = torch.as_tensor([int(self.dro_dataset[i]["labels"]) for i in all_rows], dtype=torch.int64)
            schedule = DROSchedule(self.rkd_loss, labels=labels.to(self.args.device), **kwargs)
        if self._pending_dro_state is not None:
            schedule.load_state_dict(self._pending_dro_state)
            self._pending_dro_state = None
        self.dro_schedule = schedule

    def _dro_step(self, step: int) -> None:
        self._build_dro_schedule()
        if self.dro_schedule is None:
            return
        model = self.model
        batch_size = self.args.per_device_eval_batch_size

        def score(rows: Tensor) -> Tensor:
            was_training = model.training
            model.eval()
            try:
                return self._dro_logits(model, rows.cpu().tolist(), batch_size)
            finally:
                model.train(was_training)

        self.dro_schedule.maybe_update(step, score)

    # ----------------------------------------------------------------------- resume, evaluation
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; on resume the DRO state is read back from the checkpoint's ``rkd_dro.pt``."""
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
        if isinstance(path, str) and self.dro_dataset is not None:
            state_file = os.path.join(path, DRO_STATE_FILE)
            if not os.path.isfile(state_file):
                raise FileNotFoundError(
                    f"{state_file} is missing: the checkpoint was not written by RobustDistillationTrainer, "
                    "so the DRO weights cannot be restored"
                )
            self.dro_schedule = None
            self._pending_dro_state = torch.load(state_file, map_location=self.args.device, weights_only=True)
            # lambda weighs the very next training step: restored now, not when the schedule is first due
            self.rkd_loss.dro.load_state_dict(self._pending_dro_state["dro"])
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate``, plus the DRO weights ``lambda`` (``eval_dro_weight_j``) when they move."""
        metrics = super().evaluate(*args, **kwargs)
        if self.rkd_loss.objective in ("robust", "tradeoff"):
            prefix = kwargs.get("metric_key_prefix", "eval")
            weights = {f"{prefix}_dro_weight_{j}": w for j, w in enumerate(self.rkd_loss.dro.weights.tolist())}
            self.log(weights)
            metrics.update(weights)
        return metrics
