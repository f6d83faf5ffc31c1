"""Teacher and student training (METHOD.md sections 2 to 5 and 8).

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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rkd_engine.data import Dataset, augment_images, default_augmentation, load_dataset
from rkd_engine.data.defaults import default_protocol
from rkd_engine.dro import ClassDRO
from rkd_engine.losses import LossOutput, RobustDistillationLoss, distill_loss
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
from rkd_engine.training.evaluation import (
    load_model_file,
    predict,
    report,
    save_model_file,
    summary_line,
    teacher_calibration,
)
from rkd_engine.training.methods import (
    PostShift,
    ada_alpha_weight,
    ada_margin_shift,
    post_shift_search,
    teacher_margin,
)
from rkd_engine.training.runs import (
    CheckpointError,
    RunDir,
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

LOG_EVERY = 50  # steps between "train" records in log.jsonl
_PRIOR_FLOOR = 1e-8  # smallest class prior kept (a class the teacher never predicts still needs pi > 0)


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


class _Run:
    """One training run, from its resolved config to ``metrics.json``."""

    def __init__(self, config: TrainConfig, *, resume: bool, overwrite: bool, dataset: Dataset | None, quiet: bool):
        self.cfg = resolve_config(config)
        self.resume = resume
        self.overwrite = overwrite
        self.dataset_in = dataset
        self.quiet = quiet
        self.student = isinstance(self.cfg, StudentConfig)
        self.method = self.cfg.method if self.student else None

    # ----------------------------------------------------------------------------------------- setup
    def execute(self) -> RunResult:
        ctx = distributed.setup(self.cfg.device)
        self.ctx = ctx
        try:
            return self._execute()
        finally:
            ctx.close()

    def _execute(self) -> RunResult:
        cfg, ctx = self.cfg, self.ctx
        self.run = RunDir(cfg.out, writer=ctx.is_main)
        data = self.dataset_in
        if data is None:
            data = load_dataset(
                cfg.data,
                imbalance=cfg.imbalance,
                seed=cfg.data_seed,
                val_per_class=cfg.val_per_class,
                test_per_class=cfg.test_per_class,
            )
        self.cfg = cfg = self._data_defaults(cfg, data)
        if cfg.batch_size % ctx.world_size:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({ctx.world_size})"
            )
        self.config_dict = cfg.to_dict()
        self.data = data.to(ctx.device)
        self.m = data.num_classes
        self.augment = _augmentation(cfg.augment, data)
        checkpoint = self._open_run_dir()
        seed_everything(derive_seed(cfg.seed, "init"))
        if self.method == "post-shift":
            return self._post_shift()
        self._build(checkpoint)
        self._train()
        return self._finish()

    def _data_defaults(self, cfg: TrainConfig, data: Dataset) -> TrainConfig:
        """Fill the options left to the data source's protocol and the DRO schedule; print what was filled."""
        protocol = default_protocol(data)
        given = cfg
        cfg, filled = resolve_data_defaults(cfg, data, protocol)
        # Every option left to a default here (the DRO schedule is resolved for every objective).
        self.filled = set(filled) | {k for k in ("dro_every", "dro_step") if getattr(given, k) is None}
        if filled and not self.quiet and self.ctx.is_main:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in filled.items())
            print(f"{cfg.command} {cfg.out}: defaults for {data.name} ({protocol.origin}): {shown}", file=sys.stderr)
        return cfg

    def _open_run_dir(self) -> dict[str, Any] | None:
        run, ctx = self.run, self.ctx
        if self.resume:
            stored = run.read_config()
            differ = semantic_diff(stored, self.config_dict)
            if differ:
                # Defaults derived from other options (the DRO step from the epochs) follow them: name the cause.
                differ = [k for k in differ if k not in self.filled] or differ
                detail = ", ".join(f"{flag(k)} {stored.get(k)!r} -> {self.config_dict.get(k)!r}" for k in differ[:5])
                raise ConfigError(f"cannot resume {run.path} with different options ({detail})")
            if not run.checkpoint_path.exists():
                ctx.barrier()
                if ctx.is_main:
                    run.create(self.config_dict, overwrite=True)
                ctx.barrier()
                return None
            # On the CPU: RNG states must stay there; load_state_dict moves the rest to the model's device.
            checkpoint = run.load_checkpoint(self.config_dict, map_location="cpu")
            if checkpoint.get("world_size", 1) != ctx.world_size:
                raise CheckpointError(
                    f"{run.checkpoint_path} was written by {checkpoint.get('world_size', 1)} processes; "
                    f"resume it with the same number (not {ctx.world_size})"
                )
            ctx.barrier()
            run.truncate_log(checkpoint["step"])
            return checkpoint
        run.check_new(overwrite=self.overwrite)
        ctx.barrier()
        run.create(self.config_dict, overwrite=self.overwrite)
        ctx.barrier()
        return None

    def _load_teacher(self) -> nn.Module:
        teacher, spec = load_model_file(self.cfg.teacher, self.ctx.device)
        if spec["num_classes"] != self.m or tuple(spec["input_shape"]) != tuple(self.data.input_shape):
            raise ConfigError(
                f"--teacher {self.cfg.teacher}: its model takes {tuple(spec['input_shape'])} inputs with "
                f"{spec['num_classes']} classes, the data has {tuple(self.data.input_shape)} and {self.m}"
            )
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def _model_spec(self, post_shift: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "model": cfg.model,
            "model_options": dict(cfg.model_options),
            "input_shape": list(self.data.input_shape),
            "num_classes": self.m,
            "post_shift": post_shift,
            "command": cfg.command,
            "objective": cfg.objective,
            "method": self.method,
        }

    def _build(self, checkpoint: dict[str, Any] | None) -> None:
        cfg, ctx, data = self.cfg, self.ctx, self.data
        try:
            model = build_model(cfg.model, tuple(data.input_shape), self.m, **cfg.model_options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--model {cfg.model}: {exc}") from None
        self.module = model.to(ctx.device)
        self.model = ctx.wrap(self.module)
        self.teacher = None
        self.g_train = None  # cached teacher scores on the training set (only without augmentation)
        self.p_val = None
        prior = data.train_prior.clamp_min(_PRIOR_FLOOR)
        if self.student and self.method != "group-dro":
            self.teacher = self._load_teacher()
            g_train = predict(self.teacher, data.train.x)
            prior = self._target_marginal(g_train, data.train.y).clamp_min(_PRIOR_FLOOR)
            if self.augment is None:
                self.g_train = g_train
            if cfg.val_labels == "teacher":
                self.p_val = torch.softmax(predict(self.teacher, data.val.x) / cfg.val_gamma, dim=1)
        self.prior = prior / prior.sum()
        if self.method == "group-dro":
            self.loss_fn: nn.Module = ClassDRO(self.m, alpha=1.0, step_size=cfg.dro_step, prior=self.prior.cpu())
        else:
            self.loss_fn = RobustDistillationLoss(
                self.m,
                cfg.objective,
                alpha=cfg.alpha if cfg.objective == "tradeoff" else None,
                temperature=cfg.gamma if self.student else 1.0,
                student_temperature=cfg.tau if self.student else 1.0,
                prior=self.prior.cpu(),
                step_size=cfg.dro_step,
                backend=cfg.backend,
            )
        self.loss_fn.to(ctx.device)
        self.steps_per_epoch = steps_per_epoch(len(data.train), cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.SGD(
            self.module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.scheduler = warmup_step_decay(
            self.optimizer,
            total_steps=self.total_steps,
            warmup_steps=round(cfg.warmup_epochs * self.steps_per_epoch),
            decay_at=cfg.lr_decay_at,
            decay=cfg.lr_decay,
        )
        self.step, self.epoch, self.batch = 0, 0, 0
        self.aug_state: Tensor | None = None
        self.aug_gen: torch.Generator | None = None
        self.log_window = {
            "loss": torch.zeros((), device=ctx.device),
            "hits": torch.zeros((), dtype=torch.int64, device=ctx.device),
            "rows": torch.zeros((), dtype=torch.int64, device=ctx.device),
            "steps": torch.zeros((), dtype=torch.int64, device=ctx.device),
        }
        if checkpoint is not None:
            self._restore(checkpoint)

    @torch.no_grad()
    def _target_marginal(self, g: Tensor, y: Tensor) -> Tensor:
        """``mass / n`` of the training target ``q`` (no augmentation): ``pi_t`` when ``a = 1``."""
        cfg = self.cfg
        mass = torch.zeros(self.m, device=g.device)
        for i in range(0, g.shape[0], 4096):
            gi, yi = g[i : i + 4096], y[i : i + 4096]
            out = distill_loss(
                gi,
                labels=yi,
                teacher_logits=gi,
                temperature=cfg.gamma,
                teacher_weight=self._weight(gi, yi),
                backend=cfg.backend,
                validate=False,
            )
            mass += out.mass.to(mass.dtype)
        return mass / g.shape[0]

    def _weight(self, g: Tensor, y: Tensor) -> float | Tensor:
        """The teacher weight ``a`` of the method (a float, or a (B,) tensor for ada-alpha)."""
        if self.method == "ada-alpha":
            return ada_alpha_weight(teacher_margin(g, y))
        if self.method in ("hinton", "ada-margin"):
            return float(self.cfg.teacher_weight)
        return 1.0

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
            "loss": self.loss_fn.state_dict(),
            "augment_generator": self.aug_gen.get_state() if self.aug_gen is not None else None,
            "log_window": {k: v.clone() for k, v in self.log_window.items()},
            "rng": rng,
        }

    def _save_checkpoint(self) -> None:
        state = self._checkpoint_state()
        self.run.save_checkpoint(state, self.config_dict)

    def _restore(self, ck: dict[str, Any]) -> None:
        try:
            self.module.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            self.loss_fn.load_state_dict(ck["loss"])
            self.step, self.epoch, self.batch = int(ck["step"]), int(ck["epoch"]), int(ck["batch"])
            self.aug_state = ck.get("augment_generator")
            for key, value in ck["log_window"].items():
                self.log_window[key].copy_(value)
            restore_rng_state(ck["rng"][self.ctx.rank])
        except (KeyError, RuntimeError, ValueError, IndexError) as exc:
            raise CheckpointError(
                f"{self.run.checkpoint_path} does not fit this run ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from None

    # ---------------------------------------------------------------------------------- training
    def _batch_loss(self, f: Tensor, rows: Tensor, x: Tensor, y: Tensor) -> LossOutput:
        """The method's loss and per-class statistics on one (shard of a) batch."""
        cfg = self.cfg
        if not self.student:
            return self.loss_fn(f, labels=y)
        if self.method == "group-dro":
            return distill_loss(f, labels=y, class_weights=self.loss_fn.costs, backend=cfg.backend, validate=False)
        if self.g_train is not None:
            g = self.g_train[rows]
        else:
            with torch.no_grad():
                g = self.teacher(x).float()
        a = self._weight(g, y)
        if self.method == "ada-margin":
            f = ada_margin_shift(f, y, teacher_margin(g, y), cfg.margin_scale)
        if self.method == "distill":
            return self.loss_fn(f, teacher_logits=g.to(f.dtype))
        return self.loss_fn(f, labels=y, teacher_logits=g.to(f.dtype), teacher_weight=a)

    @torch.no_grad()
    def _dro_validation_update(self) -> None:
        """``lambda <- lambda exp(eta alpha error/mass)`` from a validation batch, statistics summed over ranks."""
        cfg, ctx, val = self.cfg, self.ctx, self.data.val
        n = len(val)
        if cfg.val_batch >= n:
            rows = torch.arange(n, device=ctx.device)
        else:
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "val", self.step))
            rows = torch.randperm(n, generator=gen)[: cfg.val_batch].to(ctx.device)
        rows = shard(rows, ctx.rank, ctx.world_size)
        error = torch.zeros(self.m, device=ctx.device)
        mass = torch.zeros(self.m, device=ctx.device)
        if rows.numel():
            f = predict(self.module, val.x[rows])
            if self.p_val is not None:
                stats = distill_loss(f, teacher_probs=self.p_val[rows], backend=cfg.backend, validate=False)
            else:
                stats = distill_loss(f, labels=val.y[rows], backend=cfg.backend, validate=False)
            error += stats.error.float()
            mass += stats.mass.float()
        ctx.all_reduce_(error, mass)
        self.loss_fn.update_weights(error, mass)

    def _uses_validation_dro(self) -> bool:
        return self.cfg.objective in ("robust", "tradeoff") and self.method != "group-dro"

    def _progress(self):
        disable = self.quiet or not self.ctx.is_main or not sys.stderr.isatty()
        from tqdm.auto import tqdm

        label = self.method if self.method not in (None, "distill") else self.cfg.objective
        return tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"{self.cfg.command} {label}",
            unit="step",
            disable=disable,
            dynamic_ncols=True,
            leave=False,
        )

    def _train(self) -> None:
        cfg, ctx, train = self.cfg, self.ctx, self.data.train
        self.model.train()
        bar = self._progress()
        window = self.log_window  # sums since the last "train" record: loss, hits, rows, steps
        # loss and accuracy: training batches since the last record; worst: last validation worst-class accuracy
        shown = {"loss": "-", "acc": "-", "worst": "-"}
        while self.epoch < cfg.epochs:
            order = epoch_order(cfg.seed, self.epoch, len(train), cfg.batch_size).to(ctx.device)
            if self.augment is not None:
                self.aug_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "augment", self.epoch))
                if self.aug_state is not None:
                    self.aug_gen.set_state(self.aug_state)
                    self.aug_state = None
            while self.batch < self.steps_per_epoch:
                rows = order[self.batch]
                x = train.x[rows]
                if self.augment is not None:
                    x = augment_images(x, self.aug_gen, **self.augment)
                rows = shard(rows, ctx.rank, ctx.world_size)
                x = shard(x, ctx.rank, ctx.world_size)
                y = train.y[rows]
                f = self.model(x)
                out = self._batch_loss(f, rows, x, y)
                self.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                if self.method == "group-dro":
                    risk, mass = out.risk.detach().float().clone(), out.mass.detach().float().clone()
                    ctx.all_reduce_(risk, mass)
                    self.loss_fn.update(risk, mass)
                self.step += 1
                self.batch += 1
                window["loss"] += out.loss.detach().float()
                window["hits"] += (f.detach().argmax(1) == y).sum()
                window["rows"] += y.numel()
                window["steps"] += 1
                if self._uses_validation_dro() and self.step % cfg.dro_every == 0:
                    self._dro_validation_update()
                if self.step % LOG_EVERY == 0 or self.batch == self.steps_per_epoch:
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
                    weights = self._dro_weights()
                    if weights is not None:  # lambda over training (a sync the record above already makes)
                        record["dro_weights"] = weights.tolist()
                        record["dro_distance"] = float(distance_from_uniform(weights))
                    self.run.log(record)
                    shown.update(loss=f"{loss_avg:.3f}", acc=f"{acc:.3f}")
                    bar.set_postfix(shown, refresh=False)
                    for value in window.values():
                        value.zero_()
                bar.update(1)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self._save_checkpoint()
            self.epoch += 1
            self.batch = 0
            if cfg.eval_every and self.epoch % cfg.eval_every == 0 and self.epoch < cfg.epochs and ctx.is_main:
                shown["worst"] = f"{self._log_eval():.3f}"
                bar.set_postfix(shown, refresh=False)
        bar.close()

    def _log_eval(self) -> float:
        val = self.data.val
        rep = report(predict(self.module, val.x), val.y, self.m)
        record = {
            "event": "eval",
            "split": "val",
            "epoch": self.epoch,
            "step": self.step,
            "accuracy": rep["accuracy"],
            "balanced_accuracy": rep["balanced_accuracy"],
            "worst_accuracy": rep["worst_accuracy"],
        }
        if isinstance(self.loss_fn, RobustDistillationLoss) and self._uses_validation_dro():
            record["dro_weights"] = self.loss_fn.dro.weights.tolist()
        elif isinstance(self.loss_fn, ClassDRO):
            record["dro_weights"] = self.loss_fn.weights.tolist()
        self.run.log(record)
        return rep["worst_accuracy"]

    # ---------------------------------------------------------------------------------- results
    def _dro_weights(self) -> Tensor | None:
        if isinstance(self.loss_fn, ClassDRO):
            return self.loss_fn.weights
        if self._uses_validation_dro():
            return self.loss_fn.dro.weights
        return None

    def _finish(self) -> RunResult:
        ctx = self.ctx
        self.aug_gen = None
        self._save_checkpoint()
        weights = self._dro_weights()
        per_rank = ctx.all_gather_object(None if weights is None else weights.tolist())
        metrics: dict[str, Any] = {}
        if ctx.is_main:
            save_model_file(self.run.model_path, self.module, self._model_spec())
            metrics = self._final_metrics(self.module)
            metrics["steps"] = self.step
            metrics["dro_weights"] = per_rank[0]
            if weights is not None:
                metrics["dro"] = {
                    "every": None if self.method == "group-dro" else self.cfg.dro_every,
                    "step_size": self.cfg.dro_step,
                    "updates": self.step if self.method == "group-dro" else self.step // self.cfg.dro_every,
                    "distance_from_uniform": float(distance_from_uniform(weights)),
                }
            if ctx.enabled:
                metrics["distributed"] = {"world_size": ctx.world_size, "dro_weights_per_rank": per_rank}
            self.run.write_metrics(metrics)
        ctx.barrier()
        return RunResult(self.run.path, self.config_dict, metrics)

    def _final_metrics(self, model: nn.Module) -> dict[str, Any]:
        cfg, data = self.cfg, self.data
        metrics: dict[str, Any] = {"command": cfg.command, "objective": cfg.objective}
        if self.student:
            metrics["method"] = self.method
        logits = {}
        for name in ("val", "test"):
            part = getattr(data, name)
            logits[name] = predict(model, part.x)
            metrics[name] = report(logits[name], part.y, self.m)
        if not self.student:
            metrics["calibration"] = teacher_calibration(logits["test"], data.test.y, 1.0)
        metrics["prior"] = self.prior.tolist()
        if self.teacher is not None:
            gamma = cfg.gamma
            metrics["teacher_calibration"] = {
                "temperature": gamma,
                "test": teacher_calibration(predict(self.teacher, data.test.x), data.test.y, gamma),
                "val": teacher_calibration(predict(self.teacher, data.val.x), data.val.y, gamma),
            }
        if not self.quiet and self.ctx.is_main:
            print(f"{cfg.command} {cfg.out}: test {summary_line(metrics['test'])}", file=sys.stderr)
        return metrics

    def _post_shift(self) -> RunResult:
        """Post-shift of the teacher (no training): search the shift on validation, write the run."""
        cfg, ctx, data = self.cfg, self.ctx, self.data
        self.teacher = self._load_teacher()
        self.prior = data.train_prior.clamp_min(_PRIOR_FLOOR)
        self.prior = self.prior / self.prior.sum()
        log_shift, history = post_shift_search(
            predict(self.teacher, data.val.x), data.val.y, self.prior, step_size=cfg.dro_step
        )
        model = PostShift(self.teacher, self.m).to(ctx.device)
        model.log_shift.copy_(log_shift)
        metrics: dict[str, Any] = {}
        if ctx.is_main:
            best = max(history, key=lambda r: (r["worst"], r["mean"]))
            for record in history[:: max(1, len(history) // 20)] + [best]:
                self.run.log({"event": "post-shift", "step": 0, **record})
            teacher_spec = load_model_file(cfg.teacher, "cpu")[1]
            spec = {
                **self._model_spec(post_shift=True),
                "model": teacher_spec["model"],
                "model_options": teacher_spec.get("model_options", {}),
            }
            save_model_file(self.run.model_path, model, spec)
            metrics = self._final_metrics(model)
            metrics["steps"] = 0
            metrics["post_shift"] = {
                "log_shift": log_shift.tolist(),
                "best_iteration": best["iteration"],
                "val_worst": best["worst"],
            }
            self.run.write_metrics(metrics)
        ctx.barrier()
        return RunResult(self.run.path, self.config_dict, metrics)
