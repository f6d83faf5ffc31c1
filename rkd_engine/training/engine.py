"""Teacher and student training (docs/objectives.md, docs/loss.md, docs/dro.md, docs/baselines.md, docs/protocol.md).

Teacher: ``q = e_y`` (one-hot labels), class costs ``c`` of the objective with ``pi`` the training
label prior. Student: ``q = (1 - a) e_y + a p`` with ``p = softmax(g / gamma)`` from a teacher run
(``a = 1`` for the paper's distillation), ``pi`` the marginal of ``q`` over the training set measured
without augmentation (``pi_t = mass / n`` when ``a = 1``). For the robust and trade-off objectives
the DRO weights ``lambda`` move every ``K`` steps from the per-class 0-1 error ``error_j / mass_j`` of
the model on a validation batch (teacher-labelled, ``p`` at ``val_gamma``, or one-hot labels).

Training is SGD with momentum and weight decay, linear warm-up and step decay. Everything random is a
function of the seed and the position in training (batch order, augmentation, validation batches),
and the checkpoint holds the rest (model, optimiser, scheduler, loss/DRO state, RNG states,
position inside the epoch), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rkd_engine.data import Dataset, augment_images, default_augmentation, load_dataset
from rkd_engine.data.defaults import default_protocol
from rkd_engine.data.sources import data_fingerprint
from rkd_engine.errors import TrainingDiverged
from rkd_engine.models import build_model
from rkd_engine.training import distributed
from rkd_engine.training.config import (
    INHERITED_DATA,
    ConfigError,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    flag,
    resolve_data_defaults,
    resolve_defaults,
    semantic_diff,
    validate,
)
from rkd_engine.training.evaluation import predict, report, save_model_file, summary_line
from rkd_engine.training.methods import MethodInputs, make_method
from rkd_engine.training.runs import (
    CheckpointError,
    RunDir,
    RunDirError,
    capture_rng_state,
    derive_seed,
    restore_rng_state,
    seed_everything,
)
from rkd_engine.training.schedule import (
    distance_from_uniform,
    epoch_order,
    shard,
    steps_per_epoch,
    warmup_step_decay,
)
from rkd_engine.training.teacher_cache import resolve_cache_config

LOG_EVERY = 50  # steps between "train" records in log.jsonl


@dataclass
class RunResult:
    """A finished run: its directory, resolved options and final metrics (``metrics.json``; empty on ranks > 0)."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]


def train_teacher(
    config: TeacherConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dataset: Dataset | None = None,
    quiet: bool = False,
) -> RunResult:
    """Train a teacher on labels (``rkd teacher``); see the module docstring.

    ``resume`` continues the run in ``config.out`` from its checkpoint; ``overwrite`` restarts an
    existing run directory; ``dataset`` skips loading the data (it must be what the config names).
    """
    if not isinstance(config, TeacherConfig):
        raise TypeError(f"config must be a TeacherConfig, got {type(config).__name__}")
    return _Run(config, resume=resume, overwrite=overwrite, dataset=dataset, quiet=quiet).execute()


def train_student(
    config: StudentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dataset: Dataset | None = None,
    quiet: bool = False,
) -> RunResult:
    """Train a student from ``config.teacher`` (``rkd student``), or a baseline method; see the module docstring."""
    if not isinstance(config, StudentConfig):
        raise TypeError(f"config must be a StudentConfig, got {type(config).__name__}")
    return _Run(config, resume=resume, overwrite=overwrite, dataset=dataset, quiet=quiet).execute()


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Validate ``config`` and fill every computed default (a student's data options from its teacher)."""
    validate(config)
    if isinstance(config, StudentConfig) and config.teacher_cache is not None:
        config = resolve_cache_config(config)
    if isinstance(config, StudentConfig) and config.teacher is not None:
        teacher_dir = RunDir(config.teacher)
        teacher_cfg = teacher_dir.read_config()
        if not teacher_dir.model_path.exists():
            raise ConfigError(f"--teacher {config.teacher}: the teacher run has not finished (no model.pt)")
        changes = {}
        for key in INHERITED_DATA:
            mine, theirs = getattr(config, key), teacher_cfg.get(key)
            if mine is None:
                changes[key] = theirs
            elif mine != theirs:
                raise ConfigError(
                    f"{flag(key)} {mine!r} differs from the teacher's {theirs!r}: a student must use its teacher's "
                    f"data split (drop {flag(key)})"
                )
        if config.model == "auto":
            changes["model"] = teacher_cfg["model"]
            if not config.model_options:
                changes["model_options"] = dict(teacher_cfg.get("model_options", {}))
        config = dataclasses.replace(config, **changes)
    config = resolve_defaults(config, cuda_available=torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA GPU is available here (use --device cpu)")
    return config


def _augmentation(mode: str, dataset: Dataset) -> dict | None:
    if mode == "off":
        return None
    default = default_augmentation(dataset)
    if mode == "auto" or default is not None:
        return default
    if not dataset.is_image:
        raise ConfigError(f"--augment on needs image data, but {dataset.name!r} is not")
    return {"pad": max(1, dataset.input_shape[-1] // 8), "flip": False}


def _load_data(cfg: TrainConfig) -> Dataset:
    return load_dataset(
        cfg.data,
        imbalance=cfg.imbalance,
        seed=cfg.data_seed,
        val_per_class=cfg.val_per_class,
        test_per_class=cfg.test_per_class,
    )


def _data_defaults(cfg: TrainConfig, data: Dataset, *, show: bool) -> tuple[TrainConfig, set[str]]:
    """Fill the options left to the data source's protocol and the DRO schedule; print what was filled
    (``show``). Returns the config and the names of every option left to a default."""
    protocol = default_protocol(data)
    given = cfg
    cfg, filled = resolve_data_defaults(cfg, data, protocol)
    # Every option left to a default here (the DRO schedule is resolved for every objective).
    left = set(filled) | {k for k in ("dro_every", "dro_step") if getattr(given, k) is None}
    if filled and show:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in filled.items())
        print(f"{cfg.command} {cfg.out}: defaults for {data.name} ({protocol.origin}): {shown}", file=sys.stderr)
    return cfg, left


def _setup(
    cfg: TrainConfig, dataset: Dataset | None, ctx: distributed.DistContext, *, quiet: bool
) -> tuple[MethodInputs, set[str]]:
    """The data (``dataset``, or loaded), the options left to its defaults filled in, the checks that need
    the data; returns what the method sees and the names of the options filled."""
    data = dataset if dataset is not None else _load_data(cfg)
    cfg, filled = _data_defaults(cfg, data, show=not quiet and ctx.is_main)
    if cfg.batch_size % ctx.world_size:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({ctx.world_size})"
        )
    augment = _augmentation(cfg.augment, data)
    _check_backend(cfg, ctx.device, data.num_classes)
    return MethodInputs(cfg, ctx, data.to(ctx.device), data.num_classes, augment), filled


def _check_backend(cfg: TrainConfig, device: torch.device, num_classes: int) -> None:
    """``--backend`` (or ``RKD_BACKEND``) must be able to run this run's losses on its device."""
    from rkd_engine.ops.dispatch import select_backend

    forced = os.environ.get("RKD_BACKEND") if cfg.backend == "auto" else None
    try:
        select_backend(cfg.backend, device, torch.float32, num_classes)
    except (RuntimeError, ValueError) as exc:
        which = f"RKD_BACKEND={forced}" if forced else f"--backend {cfg.backend}"
        raise ConfigError(f"{which}: {str(exc).splitlines()[0]}") from None


def _make_model(cfg: TrainConfig, data: Dataset) -> nn.Module:
    try:
        return build_model(cfg.model, tuple(data.input_shape), data.num_classes, **cfg.model_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--model {cfg.model}: {exc}") from None


def _check_same_data(run: RunDir, data: str, fingerprint: str | None) -> None:
    stored = run.read_data_fingerprint()
    theirs = stored.get("sha256") if stored else None
    if theirs and fingerprint and theirs != fingerprint:
        raise RunDirError(
            f"cannot resume {run.path}: the file(s) of --data {data} changed since the run started "
            f"(sha256 {theirs[:12]}... then, {fingerprint[:12]}... now); restore them or start a new run"
        )


def _open_run_dir(
    run: RunDir,
    ctx: distributed.DistContext,
    cfg: TrainConfig,
    *,
    resume: bool,
    overwrite: bool,
    filled: set[str],
    fingerprint: str | None,
) -> tuple[dict[str, Any] | None, bool]:
    """Create a new run directory, or reopen a run to resume; returns ``(checkpoint or None, finished)``.

    A resumed run must have the same options (``filled`` are those left to defaults, named only when
    nothing else differs) and data files (``fingerprint``); its log is cut back to its checkpoint's step."""
    config = cfg.to_dict()
    if resume and not run.never_started():
        stored = run.read_config()
        differ = semantic_diff(stored, config)
        if differ:
            # Defaults derived from other options (the DRO step from the epochs) follow them: name the cause.
            differ = [k for k in differ if k not in filled] or differ
            detail = ", ".join(f"{flag(k)} {stored.get(k)!r} -> {config.get(k)!r}" for k in differ[:5])
            raise ConfigError(f"cannot resume {run.path} with different options ({detail})")
        _check_same_data(run, cfg.data, fingerprint)
        if run.is_finished():
            return None, True
        if run.checkpoint_path.exists():
            # On the CPU: RNG states must stay there; load_state_dict moves the rest to the model's device.
            checkpoint = run.load_checkpoint(config, map_location="cpu")
            if checkpoint.get("world_size", 1) != ctx.world_size:
                raise CheckpointError(
                    f"{run.checkpoint_path} was written by {checkpoint.get('world_size', 1)} processes; "
                    f"resume it with the same number (not {ctx.world_size})"
                )
            ctx.barrier()
            run.truncate_log(checkpoint["step"])
            return checkpoint, False
    elif not resume:
        run.check_new(overwrite=overwrite)
    _create(run, ctx, config, cfg.data, fingerprint)  # a new run, or a failed start replaced whatever its options
    return None, False


def _optimiser(cfg: TrainConfig, module: nn.Module, steps_per_epoch: int) -> tuple[torch.optim.SGD, Any]:
    """SGD with momentum and weight decay; linear warm-up, then step decay of the learning rate."""
    optimizer = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = warmup_step_decay(
        optimizer,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        decay_at=cfg.lr_decay_at,
        decay=cfg.lr_decay,
    )
    return optimizer, scheduler


def _progress_bar(total: int, initial: int, desc: str, *, off: bool) -> Any:
    """A tqdm bar on a terminal (none when ``off`` or stderr is not a terminal)."""
    from tqdm.auto import tqdm

    disable = off or not sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=disable, dynamic_ncols=True, leave=False)


def _finished_result(run: RunDir, config: dict[str, Any], ctx: distributed.DistContext, command: str, *, quiet: bool):
    """A finished run asked to resume: nothing to do, nothing touched."""
    metrics = run.read_metrics()
    if not quiet and ctx.is_main:
        print(f"{command} {run.path}: the run has finished; nothing to resume", file=sys.stderr)
    return RunResult(run.path, config, metrics if ctx.is_main else {})


def _create(run: RunDir, ctx: distributed.DistContext, config: dict[str, Any], data: str, fingerprint: str | None):
    """A new run directory (the main process writes; every process waits for it)."""
    ctx.barrier()
    if ctx.is_main:
        run.create(config, overwrite=True)
        run.write_data_fingerprint(data, fingerprint)
    ctx.barrier()


class _Run:
    """One training run: the loop, its checkpoints and its log. What differs between the teacher run and
    the student methods (teacher signal, prior, loss, DRO step, final model) is the ``Method`` object's."""

    def __init__(self, config: TrainConfig, *, resume: bool, overwrite: bool, dataset: Dataset | None, quiet: bool):
        self.cfg = resolve_config(config)
        self.resume = resume
        self.overwrite = overwrite
        self.dataset_in = dataset
        self.quiet = quiet

    def execute(self) -> RunResult:
        ctx = distributed.setup(self.cfg.device)
        self.ctx = ctx
        try:
            return self._execute()
        finally:
            ctx.close()

    def _execute(self) -> RunResult:
        ctx = self.ctx
        self.run = RunDir(self.cfg.out, writer=ctx.is_main)
        # Everything that can fail on a bad option is checked before the run directory is touched.
        inputs, filled = _setup(self.cfg, self.dataset_in, ctx, quiet=self.quiet)
        self.cfg = cfg = inputs.cfg
        self.config_dict = cfg.to_dict()
        self.data, self.augment = inputs.data, inputs.augment
        fingerprint = data_fingerprint(cfg.data)
        self.method = make_method(inputs)
        self.method.check(fingerprint)
        seed_everything(derive_seed(cfg.seed, "init"))
        new_model = _make_model(cfg, self.data) if self.method.trains else None
        checkpoint, finished = _open_run_dir(
            self.run, ctx, cfg, resume=self.resume, overwrite=self.overwrite, filled=filled, fingerprint=fingerprint
        )
        if finished:
            return _finished_result(self.run, self.config_dict, ctx, cfg.command, quiet=self.quiet)
        self.step = 0
        if not self.method.trains:
            self.method.prepare()
            return self._finish(self.method.after_training(None))
        self._build(new_model, checkpoint)
        self._train()
        self.aug_gen = None
        self._save_checkpoint()
        return self._finish(self.method.after_training(self.module))

    def _build(self, model: nn.Module, checkpoint: dict[str, Any] | None) -> None:
        cfg, ctx, data = self.cfg, self.ctx, self.data
        self.module = model.to(ctx.device)
        self.model = ctx.wrap(self.module)
        self.method.prepare()
        self.steps_per_epoch = steps_per_epoch(len(data.train), cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.optimizer, self.scheduler = _optimiser(cfg, self.module, self.steps_per_epoch)
        self.step, self.epoch, self.batch = 0, 0, 0
        self.last_checkpoint_step: int | None = None
        self.last_finite_step = 0
        self.aug_state: Tensor | None = None
        self.aug_gen: torch.Generator | None = None
        zero = {"loss": torch.float32, "hits": torch.int64, "rows": torch.int64, "steps": torch.int64}
        self.log_window = {k: torch.zeros((), dtype=dtype, device=ctx.device) for k, dtype in zero.items()}
        if checkpoint is not None:
            self._restore(checkpoint)

    # ----------------------------------------------------------------------------- checkpointing
    def _checkpoint_state(self) -> dict[str, Any]:
        rng = self.ctx.all_gather_object(capture_rng_state())
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "world_size": self.ctx.world_size,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loss": self.method.state_dict(),
            "augment_generator": self.aug_gen.get_state() if self.aug_gen is not None else None,
            "log_window": {k: v.clone() for k, v in self.log_window.items()},
            "rng": rng,
        }

    def _save_checkpoint(self) -> None:
        # Never replace a good checkpoint with a diverged one: the loss since the last check and the weights
        # (an optimiser step can make them NaN after a finite loss) must be finite; one sync per checkpoint.
        finite = torch.stack([torch.isfinite(p).all() for p in self.module.parameters()]).all()
        self._check_finite(float(self.log_window["loss"]) if bool(finite) else math.nan)
        state = self._checkpoint_state()
        self.run.save_checkpoint(state, self.config_dict)
        self.last_checkpoint_step = self.step

    def _check_finite(self, loss: float) -> None:
        """Stop with ``TrainingDiverged`` if the loss summed since the last check is NaN or infinite."""
        if math.isfinite(loss):
            self.last_finite_step = self.step
            return
        kept = (
            f"the last good checkpoint (step {self.last_checkpoint_step}) is kept: resume it with --resume, "
            if self.last_checkpoint_step is not None
            else "no checkpoint was written, "
        )
        raise TrainingDiverged(
            f"training diverged at step {self.step}: the loss became {loss} after step {self.last_finite_step}; "
            f"{kept}or start again with a lower --lr"
        )

    def _restore(self, ck: dict[str, Any]) -> None:
        try:
            self.module.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            self.method.load_state_dict(ck["loss"])
            self.step, self.epoch, self.batch = int(ck["step"]), int(ck["epoch"]), int(ck["batch"])
            if not (
                0 <= self.batch <= self.steps_per_epoch
                and 0 <= self.epoch <= self.cfg.epochs
                and self.step == self.epoch * self.steps_per_epoch + self.batch
            ):
                raise ValueError(
                    f"its position (epoch {self.epoch}, batch {self.batch}, step {self.step}) is not a position of "
                    f"this run ({self.cfg.epochs} epochs of {self.steps_per_epoch} batches)"
                )
            self.last_checkpoint_step = self.last_finite_step = self.step
            self.aug_state = ck.get("augment_generator")
            for key, value in ck["log_window"].items():
                self.log_window[key].copy_(value)
            restore_rng_state(ck["rng"][self.ctx.rank])
        except (KeyError, RuntimeError, ValueError, IndexError) as exc:
            raise CheckpointError(
                f"{self.run.checkpoint_path} does not fit this run ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from None

    # ---------------------------------------------------------------------------------- training
    def _epoch_batches(self) -> Tensor:
        """The epoch's batch order; the augmentation generator of the epoch (restored from a checkpoint)."""
        cfg = self.cfg
        if self.augment is not None:
            self.aug_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "augment", self.epoch))
            if self.aug_state is not None:
                self.aug_gen.set_state(self.aug_state)
                self.aug_state = None
        return epoch_order(cfg.seed, self.epoch, len(self.data.train), cfg.batch_size).to(self.ctx.device)

    def _train(self) -> None:
        cfg, ctx, train, val = self.cfg, self.ctx, self.data.train, self.data.val
        self.model.train()
        bar = _progress_bar(
            self.total_steps, self.step, f"{cfg.command} {self.method.label}", off=self.quiet or not ctx.is_main
        )
        window = self.log_window  # sums since the last "train" record: loss, hits, rows, steps
        # loss and accuracy: training batches since the last record; worst: last validation worst-class accuracy
        shown = {"loss": "-", "acc": "-", "worst": "-"}
        score = lambda rows: predict(self.module, val.x[rows])  # noqa: E731 (the DRO step's validation scores)
        while self.epoch < cfg.epochs:
            order = self._epoch_batches()
            while self.batch < self.steps_per_epoch:
                rows = order[self.batch]
                x = train.x[rows]
                if self.augment is not None:
                    x = augment_images(x, self.aug_gen, **self.augment)
                rows = shard(rows, ctx.rank, ctx.world_size)
                x = shard(x, ctx.rank, ctx.world_size)
                y = train.y[rows]
                f = self.model(x)
                out = self.method.loss(f, rows, x, y)
                self.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                self.batch += 1
                window["loss"] += out.loss.detach().float()
                window["hits"] += (f.detach().argmax(1) == y).sum()
                window["rows"] += y.numel()
                window["steps"] += 1
                self.method.after_step(self.step, out, score)
                if self.step % LOG_EVERY == 0 or self.batch == self.steps_per_epoch:
                    self._log_train(shown)
                    bar.set_postfix(shown, refresh=False)
                bar.update(1)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self._save_checkpoint()
            self.epoch += 1
            self.batch = 0
            if cfg.eval_every and self.epoch % cfg.eval_every == 0 and self.epoch < cfg.epochs and ctx.is_main:
                shown["worst"] = f"{self._log_eval():.3f}"
                bar.set_postfix(shown, refresh=False)
        bar.close()

    def _log_train(self, shown: dict[str, str]) -> None:
        """A "train" record of the sums since the last one (and ``lambda``); the sums restart."""
        window = self.log_window
        self._check_finite(float(window["loss"]))  # the divergence check costs no extra sync
        loss_avg = float(window["loss"]) / int(window["steps"])
        acc = float(window["hits"]) / max(int(window["rows"]), 1)
        record = {
            "event": "train",
            "epoch": self.epoch,
            "step": self.step,
            "loss": loss_avg,
            "accuracy": acc,
            "lr": self.scheduler.get_last_lr()[0],
        }
        weights = self.method.dro_weights()
        if weights is not None:  # lambda over training (a sync the record above already makes)
            record["dro_weights"] = weights.tolist()
            record["dro_distance"] = float(distance_from_uniform(weights))
        self.run.log(record)
        shown.update(loss=f"{loss_avg:.3f}", acc=f"{acc:.3f}")
        for value in window.values():
            value.zero_()

    def _log_eval(self) -> float:
        val = self.data.val
        rep = report(predict(self.module, val.x), val.y, self.data.num_classes)
        record = {
            "event": "eval",
            "split": "val",
            "epoch": self.epoch,
            "step": self.step,
            "accuracy": rep["accuracy"],
            "balanced_accuracy": rep["balanced_accuracy"],
            "worst_accuracy": rep["worst_accuracy"],
        }
        weights = self.method.dro_weights()
        if weights is not None:
            record["dro_weights"] = weights.tolist()
        self.run.log(record)
        return rep["worst_accuracy"]

    # ---------------------------------------------------------------------------------- results
    def _finish(self, model: nn.Module) -> RunResult:
        """Write the model and ``metrics.json`` (the main process); every process returns the result."""
        ctx, method = self.ctx, self.method
        weights = method.dro_weights()
        per_rank = ctx.all_gather_object(None if weights is None else weights.tolist())
        metrics: dict[str, Any] = {}
        if ctx.is_main:
            for record in method.log_records():
                self.run.log(record)
            save_model_file(self.run.model_path, model, method.model_spec())
            metrics = method.final_metrics(model)
            if not self.quiet:
                print(f"{self.cfg.command} {self.cfg.out}: test {summary_line(metrics['test'])}", file=sys.stderr)
            metrics["steps"] = self.step
            metrics.update(method.result_metrics(self.step, per_rank))
            self.run.write_metrics(metrics)
        ctx.barrier()
        return RunResult(self.run.path, self.config_dict, metrics)
