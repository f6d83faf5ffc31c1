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
from rkd_engine.dro import ClassDRO
from rkd_engine.errors import TrainingDiverged
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
from rkd_engine.training.dro_schedule import DROSchedule
from rkd_engine.training.evaluation import (
    load_model_file,
    predict,
    report,
    save_model_file,
    summary_line,
    teacher_calibration,
)
from rkd_engine.training.external import load_external_teacher
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
from rkd_engine.training.teacher_cache import (
    TeacherCache,
    check_student_use,
    resolve_cache_config,
    topk_target_mass,
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
        self.fingerprint = data_fingerprint(cfg.data)
        # Everything that can fail on a bad option is checked before the run directory is touched.
        self._check_backend()
        self._check_teacher_data()
        seed_everything(derive_seed(cfg.seed, "init"))
        self.new_model = self._make_model() if self.method != "post-shift" else None
        checkpoint = self._open_run_dir()
        if isinstance(checkpoint, RunResult):
            return checkpoint
        if self.method == "post-shift":
            return self._post_shift()
        self._build(checkpoint)
        self._train()
        return self._finish()

    def _make_model(self) -> nn.Module:
        cfg, data = self.cfg, self.data
        try:
            return build_model(cfg.model, tuple(data.input_shape), self.m, **cfg.model_options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--model {cfg.model}: {exc}") from None

    def _check_backend(self) -> None:
        """``--backend`` (or ``RKD_BACKEND``) must be able to run this run's losses on its device."""
        from rkd_engine.ops.dispatch import select_backend

        cfg = self.cfg
        forced = os.environ.get("RKD_BACKEND") if cfg.backend == "auto" else None
        try:
            select_backend(cfg.backend, self.ctx.device, torch.float32, self.m)
        except (RuntimeError, ValueError) as exc:
            which = f"RKD_BACKEND={forced}" if forced else f"--backend {cfg.backend}"
            raise ConfigError(f"{which}: {str(exc).splitlines()[0]}") from None

    def _check_teacher_data(self) -> None:
        """A student's teacher must have been trained on the same data files (same fingerprint)."""
        if not self.student or self.cfg.teacher is None:
            return
        stored = RunDir(self.cfg.teacher).read_data_fingerprint()
        theirs = stored.get("sha256") if stored else None
        if theirs and self.fingerprint and theirs != self.fingerprint:
            raise ConfigError(
                f"--data {self.cfg.data}: the file(s) changed since the teacher {self.cfg.teacher} was trained on "
                f"them (sha256 {theirs[:12]}... then, {self.fingerprint[:12]}... now); restore them or retrain the teacher"
            )

    def _check_same_data(self) -> None:
        stored = self.run.read_data_fingerprint()
        theirs = stored.get("sha256") if stored else None
        if theirs and self.fingerprint and theirs != self.fingerprint:
            raise RunDirError(
                f"cannot resume {self.run.path}: the file(s) of --data {self.cfg.data} changed since the run started "
                f"(sha256 {theirs[:12]}... then, {self.fingerprint[:12]}... now); restore them or start a new run"
            )

    def _finished_result(self) -> RunResult:
        """A finished run asked to resume: nothing to do, nothing touched."""
        metrics = self.run.read_metrics()
        if not self.quiet and self.ctx.is_main:
            print(f"{self.cfg.command} {self.run.path}: the run has finished; nothing to resume", file=sys.stderr)
        return RunResult(self.run.path, self.config_dict, metrics if self.ctx.is_main else {})

    def _create(self) -> None:
        ctx, run = self.ctx, self.run
        ctx.barrier()
        if ctx.is_main:
            run.create(self.config_dict, overwrite=True)
            run.write_data_fingerprint(self.cfg.data, self.fingerprint)
        ctx.barrier()

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

    def _open_run_dir(self) -> dict[str, Any] | RunResult | None:
        run, ctx = self.run, self.ctx
        if self.resume and run.never_started():
            self._create()  # a failed start: replaced by this run, whatever its options were
            return None
        if self.resume:
            stored = run.read_config()
            differ = semantic_diff(stored, self.config_dict)
            if differ:
                # Defaults derived from other options (the DRO step from the epochs) follow them: name the cause.
                differ = [k for k in differ if k not in self.filled] or differ
                detail = ", ".join(f"{flag(k)} {stored.get(k)!r} -> {self.config_dict.get(k)!r}" for k in differ[:5])
                raise ConfigError(f"cannot resume {run.path} with different options ({detail})")
            self._check_same_data()
            if run.is_finished():
                return self._finished_result()
            if not run.checkpoint_path.exists():
                self._create()
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
        self._create()
        return None

    def _load_teacher(self) -> nn.Module:
        cfg = self.cfg
        if getattr(cfg, "teacher_checkpoint", None) is not None:
            return load_external_teacher(
                cfg.teacher_checkpoint,
                model=cfg.teacher_model,
                model_options=cfg.teacher_model_options,
                input_shape=tuple(self.data.input_shape),
                num_classes=self.m,
                device=self.ctx.device,
            )
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
        self.module = self.new_model.to(ctx.device)
        self.model = ctx.wrap(self.module)
        self.teacher = None
        self.g_train = None  # cached teacher scores on the training set (only without augmentation)
        self.p_val = None
        self.topk_train = None  # top-k teacher of the training set (from a top-k cache)
        self.teacher_held_out = None  # cached teacher scores of the val and test sets
        prior = data.train_prior.clamp_min(_PRIOR_FLOOR)
        if self.student and self.method != "group-dro" and cfg.teacher_cache is not None:
            prior = self._use_teacher_cache().clamp_min(_PRIOR_FLOOR)
        elif self.student and self.method != "group-dro":
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
        if self._uses_validation_dro():
            self.dro_schedule = DROSchedule(
                self.loss_fn,
                every=cfg.dro_every,
                labels=data.val.y if self.p_val is None else None,
                teacher_probs=self.p_val,
                val_batch=cfg.val_batch,
                seed=cfg.seed,
                backend=cfg.backend,
                rank=ctx.rank,
                world_size=ctx.world_size,
                reduce=ctx.all_reduce_,
            )
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
        self.last_checkpoint_step: int | None = None
        self.last_finite_step = 0
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

    def _use_teacher_cache(self) -> Tensor:
        """Teacher outputs from ``--teacher-cache`` (the teacher is neither loaded nor run); returns ``pi``."""
        cfg, data, device = self.cfg, self.data, self.ctx.device
        cache = TeacherCache.open(cfg.teacher_cache)
        check_student_use(cache, method=self.method, augment=self.augment, cache_augmented=cfg.cache_augmented)
        cache.check_data(data)
        self.teacher_held_out = {name: cache.logits(name, device) for name in ("val", "test")}
        if cfg.val_labels == "teacher":
            self.p_val = torch.softmax(self.teacher_held_out["val"] / cfg.val_gamma, dim=1)
        if cache.layout == "dense":
            self.g_train = cache.logits("train", device)
            return self._target_marginal(self.g_train, data.train.y)
        self.topk_train = cache.topk("train", cfg.gamma, device)
        a = float(cfg.teacher_weight) if self.method == "hinton" else 1.0
        return topk_target_mass(self.topk_train, data.train.y, tail=cfg.topk_tail, teacher_weight=a) / len(data.train)

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
            self.loss_fn.load_state_dict(ck["loss"])
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
    def _batch_loss(self, f: Tensor, rows: Tensor, x: Tensor, y: Tensor) -> LossOutput:
        """The method's loss and per-class statistics on one (shard of a) batch."""
        cfg = self.cfg
        if not self.student:
            return self.loss_fn(f, labels=y)
        if self.method == "group-dro":
            return distill_loss(f, labels=y, class_weights=self.loss_fn.costs, backend=cfg.backend, validate=False)
        if self.topk_train is not None:  # a top-k teacher cache (docs/wide_heads.md): q = (1 - a) e_y + a p~
            return distill_loss(
                f,
                labels=None if self.method == "distill" else y,
                teacher_topk=self.topk_train.rows(rows),
                topk_tail=cfg.topk_tail,
                teacher_weight=None if self.method == "distill" else self._weight(f, y),
                class_costs=self.loss_fn.costs,
                class_weights=self.loss_fn.class_weights,
                student_temperature=self.loss_fn.student_temperature,
                backend=cfg.backend,
                validate=False,
            )
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
        val = self.data.val
        self.dro_schedule.maybe_update(self.step, lambda rows: predict(self.module, val.x[rows]))

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
                if self._uses_validation_dro():
                    self._dro_validation_update()
                if self.step % LOG_EVERY == 0 or self.batch == self.steps_per_epoch:
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
        held_out = getattr(self, "teacher_held_out", None)  # from a teacher cache
        if self.teacher is not None or held_out is not None:
            gamma = cfg.gamma
            if held_out is None:
                held_out = {name: predict(self.teacher, getattr(data, name).x) for name in ("test", "val")}
            metrics["teacher_calibration"] = {
                "temperature": gamma,
                "test": teacher_calibration(held_out["test"], data.test.y, gamma),
                "val": teacher_calibration(held_out["val"], data.val.y, gamma),
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
