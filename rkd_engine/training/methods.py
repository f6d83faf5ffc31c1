"""Training methods as objects: the teacher run and each student method of docs/baselines.md.

A ``Method`` is what ``rkd_engine.training.engine`` asks of a run's method, in the order it asks:

1. ``check(fingerprint)``: refusals that need the data, before the run directory is touched;
2. ``prepare()``: what the method needs before training: its teacher signal (a teacher model, a dense or
   top-k teacher cache), the class prior ``pi`` and the loss (``self.loss_fn``, whose ``state_dict`` is
   the checkpoint's ``"loss"`` entry), and its DRO schedule;
3. ``loss(f, rows, x, y)``: the loss and per-class statistics of one (shard of a) batch;
4. ``after_step(step, out, score)``: its DRO step after each optimiser step (the validation update of
   docs/dro.md every ``K`` steps, Group DRO's update from the batch, or nothing);
5. ``after_training(model)`` and the ``*_metrics`` hooks: what it writes once trained.

A method that ``trains = False`` (post-shift) has no loop: ``prepare`` then ``after_training(None)``
returns the model to write. The engine never looks at a method's name; ``METHODS`` maps the names of
``rkd student --method`` (and ``"teacher"``) to the classes, and ``make_method`` picks one. The option
checks and defaults that depend on the method are the class's too: ``config.validate`` calls
``check_config`` and ``config.resolve_defaults`` calls ``config_defaults``, both driven by class
attributes (``needs_teacher``, ``default_teacher_weight``, ``own_objective``, ...). A new student method
is one new class here, registered with ``@register``, plus its name in ``config.STUDENT_METHODS`` (the
``--method`` choices; see CONTRIBUTING.md).

The per-row math of the baselines (teacher margin, AdaAlpha, AdaMargin, post-shift) lives in
``rkd_engine.training.baselines`` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rkd_engine.data import Dataset
from rkd_engine.dro import ClassDRO
from rkd_engine.losses import LossOutput, RobustDistillationLoss, distill_loss
from rkd_engine.training.baselines import (
    POST_SHIFT_ITERATIONS,
    PostShift,
    ada_alpha_weight,
    ada_margin_shift,
    post_shift_search,
    teacher_margin,
)
from rkd_engine.training.config import ConfigError, StudentConfig, TrainConfig
from rkd_engine.training.distributed import DistContext
from rkd_engine.training.dro_schedule import DROSchedule
from rkd_engine.training.evaluation import load_model_file, predict, report, teacher_calibration
from rkd_engine.training.external import load_external_teacher
from rkd_engine.training.runs import RunDir
from rkd_engine.training.schedule import distance_from_uniform
from rkd_engine.training.teacher_cache import TeacherCache, check_student_use, topk_target_mass

__all__ = [
    "METHODS",
    "POST_SHIFT_ITERATIONS",
    "AdaAlpha",
    "AdaMargin",
    "Distill",
    "GroupDRO",
    "Hinton",
    "Method",
    "MethodInputs",
    "PostShiftMethod",
    "Teacher",
    "PostShift",
    "ada_alpha_weight",
    "ada_margin_shift",
    "load_teacher",
    "make_method",
    "method_class",
    "post_shift_search",
    "register",
    "teacher_margin",
]

PRIOR_FLOOR = 1e-8  # smallest class prior kept (a class the teacher never predicts still needs pi > 0)
Score = Callable[[Tensor], Tensor]  # validation rows -> the model's scores on them (eval mode)


@dataclass
class MethodInputs:
    """What a method sees of its run: the resolved config, the processes, the data (on the run's device),
    its class count and the augmentation (``None`` when off)."""

    cfg: TrainConfig
    ctx: DistContext
    data: Dataset
    num_classes: int
    augment: dict | None


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` the method named ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def method_class(cfg: TrainConfig) -> type[Method]:
    """The method class of a config: ``"teacher"`` for ``rkd teacher``, ``cfg.method`` for ``rkd student``."""
    name = getattr(cfg, "method", "teacher")
    if name not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(n for n in METHODS if n != 'teacher')}, got {name!r}")
    return METHODS[name]


def make_method(inputs: MethodInputs) -> Method:
    """The method object of a run (the class of ``method_class(inputs.cfg)``)."""
    return method_class(inputs.cfg)(inputs)


def load_teacher(cfg: TrainConfig, data: Dataset, device: torch.device | str) -> nn.Module:
    """The frozen teacher of a student config: ``--teacher-checkpoint`` or the model of ``--teacher RUN``."""
    m = data.num_classes
    if getattr(cfg, "teacher_checkpoint", None) is not None:
        return load_external_teacher(
            cfg.teacher_checkpoint,
            model=cfg.teacher_model,
            model_options=cfg.teacher_model_options,
            input_shape=tuple(data.input_shape),
            num_classes=m,
            device=device,
        )
    teacher, spec = load_model_file(cfg.teacher, device)
    if spec["num_classes"] != m or tuple(spec["input_shape"]) != tuple(data.input_shape):
        raise ConfigError(
            f"--teacher {cfg.teacher}: its model takes {tuple(spec['input_shape'])} inputs with "
            f"{spec['num_classes']} classes, the data has {tuple(data.input_shape)} and {m}"
        )
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _normalised(prior: Tensor) -> Tensor:
    prior = prior.clamp_min(PRIOR_FLOOR)
    return prior / prior.sum()


class Method:
    """The interface of a training method, and the behaviour its subclasses share unless they override it:
    a ``RobustDistillationLoss`` of the run's objective on one-hot labels, ``pi`` the training label
    prior, validation DRO updates against one-hot validation labels for the robust and trade-off
    objectives, the trained model written as it is."""

    name: ClassVar[str] = ""  # the key of ``METHODS``: ``--method NAME``, or "teacher"
    trains: ClassVar[bool] = True  # False: no training loop (``after_training(None)`` makes the model)
    student: ClassVar[bool] = False  # written as ``"method"`` in the model spec and the metrics
    named: ClassVar[bool] = False  # the progress bar and run name show the name (a baseline), not the objective
    # The method's options, checked and filled by ``rkd_engine.training.config`` before anything is loaded
    # (``check_config``, ``config_defaults``): a method states its rules here, config.py never names it.
    needs_teacher: ClassVar[bool] = False  # a student run needs --teacher, --teacher-checkpoint or --teacher-cache
    teacher_checkpoint_refusal: ClassVar[str | None] = None  # why it takes no --teacher-checkpoint (None: it does)
    teacher_cache_refusal: ClassVar[str | None] = None  # why --teacher-cache cannot serve it (None: it can)
    default_teacher_weight: ClassVar[float | None] = None  # --teacher-weight's default (None: it takes none)
    without_teacher_weight: ClassVar[str] = "has no teacher target"  # what it does instead of --teacher-weight
    own_objective: ClassVar[bool] = False  # its own worst-class objective: --objective stays standard, no --tau
    default_dro_step: ClassVar[float | None] = None  # --dro-step's default (None: the validation schedule's)
    needs_label_probability: ClassVar[bool] = False  # reads the teacher's p_y in every row: no top-k cache

    def __init__(self, inputs: MethodInputs) -> None:
        self.inputs = inputs
        self.cfg = inputs.cfg
        self.m = inputs.num_classes
        self.loss_fn: nn.Module | None = None
        self.prior: Tensor | None = None
        self.dro_schedule: DROSchedule | None = None

    # ------------------------------------------------------------------------- configuration
    @classmethod
    def check_config(cls, cfg: StudentConfig) -> None:
        """Refuse (``ConfigError`` naming the option) what this method cannot do with a student config;
        called by ``config.validate`` once every value is in range, before anything is loaded."""
        method = f"--method {cls.name}"
        if cfg.teacher_weight is not None and cls.default_teacher_weight is None:
            takers = " or ".join(name for name, c in METHODS.items() if c.default_teacher_weight is not None)
            raise ConfigError(
                f"--teacher-weight is used by --method {takers} only ({method} {cls.without_teacher_weight})"
            )
        if cfg.teacher_cache is not None and cls.teacher_cache_refusal is not None:
            raise ConfigError(f"--teacher-cache cannot serve {method}: {cls.teacher_cache_refusal}")
        if cfg.teacher_checkpoint is not None and cls.teacher_checkpoint_refusal is not None:
            raise ConfigError(f"{method} takes no --teacher-checkpoint ({cls.teacher_checkpoint_refusal})")
        given = (cfg.teacher, cfg.teacher_checkpoint, cfg.teacher_cache)
        if cls.needs_teacher and all(value is None for value in given):
            raise ConfigError(
                f"--teacher RUN_DIR is required for {method} (train one with `rkd teacher`, or give a teacher "
                "trained elsewhere with --teacher-checkpoint FILE, or its outputs with --teacher-cache CACHE)"
            )
        if cls.own_objective and cfg.objective != "standard":
            raise ConfigError(f"{method} is its own worst-class objective: drop --objective {cfg.objective}")
        if cls.own_objective and cfg.tau != 1.0:
            raise ConfigError(f"--tau has no effect with {method}")

    @classmethod
    def config_defaults(cls, cfg: TrainConfig) -> dict[str, Any]:
        """The options whose default is the method's (``--dro-step``, ``--teacher-weight``), where not given."""
        out: dict[str, Any] = {}
        if cls.default_dro_step is not None and cfg.dro_step is None:
            out["dro_step"] = cls.default_dro_step
        if cls.default_teacher_weight is not None and cfg.teacher_weight is None:
            out["teacher_weight"] = cls.default_teacher_weight
        return out

    # ------------------------------------------------------------------------------- identity
    @property
    def reported_name(self) -> str | None:
        """The ``"method"`` of the model spec and ``metrics.json`` (``None`` for a teacher)."""
        return self.name if self.student else None

    @property
    def label(self) -> str:
        """What the progress bar shows: the objective, or the method's name for a baseline (``named``)."""
        return self.name if self.named else self.cfg.objective

    # ------------------------------------------------------------------------ before training
    def check(self, fingerprint: str | None) -> None:
        """Refuse a bad setting before the run directory is touched (``ConfigError``): a student's teacher
        run must have been trained on the same data files (same ``fingerprint``)."""
        teacher = getattr(self.cfg, "teacher", None)
        if teacher is None:
            return
        stored = RunDir(teacher).read_data_fingerprint()
        theirs = stored.get("sha256") if stored else None
        if theirs and fingerprint and theirs != fingerprint:
            raise ConfigError(
                f"--data {self.cfg.data}: the file(s) changed since the teacher {teacher} was trained on "
                f"them (sha256 {theirs[:12]}... then, {fingerprint[:12]}... now); restore them or retrain the teacher"
            )

    def prepare(self) -> None:
        """Build the prior, the loss and the DRO schedule."""
        self.prior = _normalised(self.inputs.data.train_prior)
        self.loss_fn = self._objective_loss(temperature=1.0, student_temperature=1.0)
        self._validation_schedule(p_val=None)

    def _objective_loss(self, *, temperature: float, student_temperature: float) -> RobustDistillationLoss:
        cfg = self.cfg
        return RobustDistillationLoss(
            self.m,
            cfg.objective,
            alpha=cfg.alpha if cfg.objective == "tradeoff" else None,
            temperature=temperature,
            student_temperature=student_temperature,
            prior=self.prior.cpu(),
            step_size=cfg.dro_step,
            backend=cfg.backend,
        ).to(self.inputs.ctx.device)

    def _validation_schedule(self, p_val: Tensor | None) -> None:
        """The validation DRO update of docs/dro.md (robust and trade-off objectives only)."""
        cfg, ctx, val = self.cfg, self.inputs.ctx, self.inputs.data.val
        if cfg.objective not in ("robust", "tradeoff"):
            return
        self.dro_schedule = DROSchedule(
            self.loss_fn,
            every=cfg.dro_every,
            labels=val.y if p_val is None else None,
            teacher_probs=p_val,
            val_batch=cfg.val_batch,
            seed=cfg.seed,
            backend=cfg.backend,
            rank=ctx.rank,
            world_size=ctx.world_size,
            reduce=ctx.all_reduce_,
        )

    # ------------------------------------------------------------------------------ training
    def loss(self, f: Tensor, rows: Tensor, x: Tensor, y: Tensor) -> LossOutput:
        """The loss and per-class statistics of scores ``f`` on training ``rows`` (inputs ``x``, labels ``y``)."""
        return self.loss_fn(f, labels=y)

    def after_step(self, step: int, out: LossOutput, score: Score) -> None:
        """The DRO step after optimiser step ``step`` (``out``: that step's loss output)."""
        if self.dro_schedule is not None:
            self.dro_schedule.maybe_update(step, score)

    def dro_weights(self) -> Tensor | None:
        """``lambda`` of the method's DRO (``None`` without one): logged, and in ``metrics.json``."""
        return None if self.dro_schedule is None else self.loss_fn.dro.weights

    def dro_metrics(self, steps: int, weights: Tensor) -> dict[str, Any]:
        """``metrics["dro"]``: the schedule of the updates and how far ``lambda`` moved."""
        return {
            "every": self.cfg.dro_every,
            "step_size": self.cfg.dro_step,
            "updates": steps // self.cfg.dro_every,
            "distance_from_uniform": float(distance_from_uniform(weights)),
        }

    def state_dict(self) -> dict[str, Any]:
        """The loss state (``lambda``, prior) kept in checkpoints under ``"loss"``."""
        return self.loss_fn.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_fn.load_state_dict(state)

    # ------------------------------------------------------------------------- after training
    def after_training(self, model: nn.Module | None) -> nn.Module:
        """The model to write once trained (the trained model itself unless the method says otherwise)."""
        return model

    def model_spec(self) -> dict[str, Any]:
        """The saved model's spec: how ``load_model_file`` rebuilds it, and what made it."""
        cfg, data = self.cfg, self.inputs.data
        return {
            "model": cfg.model,
            "model_options": dict(cfg.model_options),
            "input_shape": list(data.input_shape),
            "num_classes": self.m,
            "post_shift": False,
            "command": cfg.command,
            "objective": cfg.objective,
            "method": self.reported_name,
        }

    def final_metrics(self, model: nn.Module) -> dict[str, Any]:
        """The final model's reports on the validation and test sets, the prior, and the method's extras."""
        cfg, data = self.cfg, self.inputs.data
        metrics: dict[str, Any] = {"command": cfg.command, "objective": cfg.objective}
        if self.student:
            metrics["method"] = self.name
        logits = {}
        for name in ("val", "test"):
            part = getattr(data, name)
            logits[name] = predict(model, part.x)
            metrics[name] = report(logits[name], part.y, self.m)
        metrics.update(self.model_metrics(logits))
        metrics["prior"] = self.prior.tolist()
        metrics.update(self.teacher_metrics())
        return metrics

    def model_metrics(self, logits: dict[str, Tensor]) -> dict[str, Any]:
        """Metrics of the trained model's held-out scores ``logits`` (``"val"``, ``"test"``) beyond the reports."""
        return {"calibration": teacher_calibration(logits["test"], self.inputs.data.test.y, 1.0)}

    def teacher_metrics(self) -> dict[str, Any]:
        """Metrics of the method's teacher (its calibration at ``gamma``), if it has one."""
        return {}

    def log_records(self) -> list[dict[str, Any]]:
        """Records for ``log.jsonl`` once trained (beyond the loop's "train" and "eval" records)."""
        return []

    def result_metrics(self, steps: int, per_rank: list[list[float] | None]) -> dict[str, Any]:
        """The last entries of ``metrics.json``: ``lambda`` (``per_rank``: each process's, as lists), the
        DRO schedule after ``steps`` steps, and the processes when there are several."""
        ctx, weights = self.inputs.ctx, self.dro_weights()
        metrics: dict[str, Any] = {"dro_weights": per_rank[0]}
        if weights is not None:
            metrics["dro"] = self.dro_metrics(steps, weights)
        if ctx.enabled:
            metrics["distributed"] = {"world_size": ctx.world_size, "dro_weights_per_rank": per_rank}
        return metrics


@register
class Teacher(Method):
    """``rkd teacher``: the objective's loss on one-hot labels (``q = e_y``), ``pi`` the training label
    prior, validation DRO updates against one-hot labels (the defaults of ``Method``)."""

    name = "teacher"


@register
class Distill(Method):
    """``rkd student``: the objective's loss on ``q = p = softmax(g / gamma)`` of a teacher run (``a = 1``),
    ``pi`` the teacher's training marginal, validation DRO against ``p`` at ``val_gamma`` (or labels).

    The teacher signal comes from ``--teacher`` / ``--teacher-checkpoint`` (its outputs on the training set
    are computed once when the inputs never change, per batch under augmentation) or from a dense or
    top-k ``--teacher-cache`` (the teacher is then neither loaded nor run)."""

    name = "distill"
    student = True
    needs_teacher = True
    without_teacher_weight = "uses a = 1"

    def __init__(self, inputs: MethodInputs) -> None:
        super().__init__(inputs)
        self.teacher: nn.Module | None = None
        self.g_train: Tensor | None = None  # teacher scores on the training set (only without augmentation)
        self.topk_train = None  # top-k teacher of the training set (from a top-k cache)
        self.held_out: dict[str, Tensor] | None = None  # teacher scores of the val and test sets
        self.p_val: Tensor | None = None

    def prepare(self) -> None:
        cfg, data = self.cfg, self.inputs.data
        if cfg.teacher_cache is not None:
            prior = self._use_teacher_cache()
        else:
            self.teacher = load_teacher(cfg, data, self.inputs.ctx.device)
            g_train = predict(self.teacher, data.train.x)
            prior = self._target_marginal(g_train, data.train.y)
            if self.inputs.augment is None:
                self.g_train = g_train
            if cfg.val_labels == "teacher":
                self.p_val = torch.softmax(predict(self.teacher, data.val.x) / cfg.val_gamma, dim=1)
        self.prior = _normalised(prior)
        self.loss_fn = self._objective_loss(temperature=cfg.gamma, student_temperature=cfg.tau)
        self._validation_schedule(self.p_val)

    def _use_teacher_cache(self) -> Tensor:
        """Teacher outputs from ``--teacher-cache``; returns the (unnormalised) ``pi``."""
        cfg, data, device = self.cfg, self.inputs.data, self.inputs.ctx.device
        cache = TeacherCache.open(cfg.teacher_cache)
        check_student_use(
            cache,
            method=self.name,
            needs_label_probability=self.needs_label_probability,
            augment=self.inputs.augment,
            cache_augmented=cfg.cache_augmented,
        )
        cache.check_data(data)
        self.held_out = {name: cache.logits(name, device) for name in ("val", "test")}
        if cfg.val_labels == "teacher":
            self.p_val = torch.softmax(self.held_out["val"] / cfg.val_gamma, dim=1)
        if cache.layout == "dense":
            self.g_train = cache.logits("train", device)
            return self._target_marginal(self.g_train, data.train.y)
        self.topk_train = cache.topk("train", cfg.gamma, device)
        a = self.cache_weight()
        return topk_target_mass(self.topk_train, data.train.y, tail=cfg.topk_tail, teacher_weight=a) / len(data.train)

    @torch.no_grad()
    def _target_marginal(self, g: Tensor, y: Tensor) -> Tensor:
        """``mass / n`` of the training target ``q`` (no augmentation): ``pi_t`` when ``a = 1``."""
        mass = torch.zeros(self.m, device=g.device)
        for i in range(0, g.shape[0], 4096):
            gi, yi = g[i : i + 4096], y[i : i + 4096]
            out = distill_loss(
                gi,
                labels=yi,
                teacher_logits=gi,
                temperature=self.cfg.gamma,
                teacher_weight=self.weight(gi, yi),
                backend=self.cfg.backend,
                validate=False,
            )
            mass += out.mass.to(mass.dtype)
        return mass / g.shape[0]

    def weight(self, g: Tensor, y: Tensor) -> float | Tensor:
        """The teacher weight ``a`` of ``q = (1 - a) e_y + a p`` (a float, or a (B,) tensor per row)."""
        return 1.0

    def cache_weight(self) -> float:
        """``a`` for a top-k cache (which holds no teacher margin: a constant)."""
        return 1.0

    def teacher_logits(self, rows: Tensor, x: Tensor) -> Tensor:
        """The teacher's scores ``g`` of the batch: cached, or the teacher run on the (augmented) inputs."""
        if self.g_train is not None:
            return self.g_train[rows]
        with torch.no_grad():
            return self.teacher(x).float()

    def loss(self, f: Tensor, rows: Tensor, x: Tensor, y: Tensor) -> LossOutput:
        if self.topk_train is not None:  # a top-k teacher cache (docs/wide_heads.md): q = (1 - a) e_y + a p~
            return self._topk_loss(f, rows, y)
        g = self.teacher_logits(rows, x)
        return self.loss_fn(f, teacher_logits=g.to(f.dtype))

    def _topk_loss(self, f: Tensor, rows: Tensor, y: Tensor, *, labelled: bool = False) -> LossOutput:
        return distill_loss(
            f,
            labels=y if labelled else None,
            teacher_topk=self.topk_train.rows(rows),
            topk_tail=self.cfg.topk_tail,
            teacher_weight=self.weight(f, y) if labelled else None,
            class_costs=self.loss_fn.costs,
            class_weights=self.loss_fn.class_weights,
            student_temperature=self.loss_fn.student_temperature,
            backend=self.cfg.backend,
            validate=False,
        )

    def model_metrics(self, logits: dict[str, Tensor]) -> dict[str, Any]:
        return {}

    def teacher_metrics(self) -> dict[str, Any]:
        data, held_out = self.inputs.data, self.held_out
        if self.teacher is None and held_out is None:
            return {}
        if held_out is None:
            held_out = {name: predict(self.teacher, getattr(data, name).x) for name in ("test", "val")}
        gamma = self.cfg.gamma
        return {
            "teacher_calibration": {
                "temperature": gamma,
                "test": teacher_calibration(held_out["test"], data.test.y, gamma),
                "val": teacher_calibration(held_out["val"], data.val.y, gamma),
            }
        }


@register
class Hinton(Distill):
    """Hinton et al.: ``q = (1 - a) e_y + a p`` with a constant ``a`` (``--teacher-weight``)."""

    name = "hinton"

    named = True
    default_teacher_weight = 0.5

    def weight(self, g: Tensor, y: Tensor) -> float | Tensor:
        return float(self.cfg.teacher_weight)

    def cache_weight(self) -> float:
        return float(self.cfg.teacher_weight)

    def loss(self, f: Tensor, rows: Tensor, x: Tensor, y: Tensor) -> LossOutput:
        if self.topk_train is not None:
            return self._topk_loss(f, rows, y, labelled=True)
        g = self.teacher_logits(rows, x)
        return self.loss_fn(f, labels=y, teacher_logits=g.to(f.dtype), teacher_weight=self.weight(g, y))


@register
class AdaAlpha(Hinton):
    """AdaAlpha: the per-row teacher weight ``a_i = clip(mu_i, 0, 1)`` of the teacher margin ``mu``."""

    name = "ada-alpha"
    default_teacher_weight = None
    without_teacher_weight = "sets a per example"
    needs_label_probability = True

    def weight(self, g: Tensor, y: Tensor) -> float | Tensor:
        return ada_alpha_weight(teacher_margin(g, y))

    def cache_weight(self) -> float:
        return 1.0


@register
class AdaMargin(Hinton):
    """AdaMargin: ``f_iy - delta_i`` with ``delta_i = margin_scale (1 - clip(mu_i, 0, 1))``, constant ``a``."""

    name = "ada-margin"
    default_teacher_weight = 1.0
    needs_label_probability = True

    def loss(self, f: Tensor, rows: Tensor, x: Tensor, y: Tensor) -> LossOutput:
        g = self.teacher_logits(rows, x)
        f = ada_margin_shift(f, y, teacher_margin(g, y), self.cfg.margin_scale)
        return self.loss_fn(f, labels=y, teacher_logits=g.to(f.dtype), teacher_weight=self.weight(g, y))


@register
class GroupDRO(Method):
    """Group DRO without a teacher: class costs ``lambda / pi`` of a ``ClassDRO`` that moves after every
    step from the batch's per-class risk (summed over processes), ``pi`` the training label prior."""

    name = "group-dro"
    student = True

    named = True
    teacher_checkpoint_refusal = "it has no teacher"
    teacher_cache_refusal = "it has no teacher"
    own_objective = True
    default_dro_step = 0.01

    def prepare(self) -> None:
        self.prior = _normalised(self.inputs.data.train_prior)
        dro = ClassDRO(self.m, alpha=1.0, step_size=self.cfg.dro_step, prior=self.prior.cpu())
        self.loss_fn = dro.to(self.inputs.ctx.device)

    def loss(self, f: Tensor, rows: Tensor, x: Tensor, y: Tensor) -> LossOutput:
        return distill_loss(f, labels=y, class_weights=self.loss_fn.costs, backend=self.cfg.backend, validate=False)

    def after_step(self, step: int, out: LossOutput, score: Score) -> None:
        risk, mass = out.risk.detach().float().clone(), out.mass.detach().float().clone()
        self.inputs.ctx.all_reduce_(risk, mass)
        self.loss_fn.update(risk, mass)

    def dro_weights(self) -> Tensor | None:
        return self.loss_fn.weights

    def dro_metrics(self, steps: int, weights: Tensor) -> dict[str, Any]:
        return {
            "every": None,
            "step_size": self.cfg.dro_step,
            "updates": steps,
            "distance_from_uniform": float(distance_from_uniform(weights)),
        }

    def model_metrics(self, logits: dict[str, Tensor]) -> dict[str, Any]:
        return {}


@register
class PostShiftMethod(Distill):
    """Post-shift of the teacher (no training): the shift ``lambda / pi`` with the best worst-class
    validation accuracy, found by the search of ``baselines.post_shift_search``."""

    name = "post-shift"
    trains = False

    named = True
    without_teacher_weight = "has no teacher target"
    teacher_checkpoint_refusal = "post-shift needs a --teacher run"
    teacher_cache_refusal = "its model is the teacher itself (give --teacher)"
    own_objective = True
    default_dro_step = 0.1

    def prepare(self) -> None:
        self.teacher = load_teacher(self.cfg, self.inputs.data, self.inputs.ctx.device)
        self.prior = _normalised(self.inputs.data.train_prior)

    def after_training(self, model: nn.Module | None) -> nn.Module:
        data = self.inputs.data
        log_shift, self.history = post_shift_search(
            predict(self.teacher, data.val.x), data.val.y, self.prior, step_size=self.cfg.dro_step
        )
        self.best = max(self.history, key=lambda r: (r["worst"], r["mean"]))
        self.log_shift = log_shift
        shifted = PostShift(self.teacher, self.m).to(self.inputs.ctx.device)
        shifted.log_shift.copy_(log_shift)
        return shifted

    def log_records(self) -> list[dict[str, Any]]:
        """About 20 iterations of the search and the best one, for ``log.jsonl``."""
        history = self.history
        return [{"event": "post-shift", "step": 0, **r} for r in history[:: max(1, len(history) // 20)] + [self.best]]

    def model_spec(self) -> dict[str, Any]:
        teacher_spec = load_model_file(self.cfg.teacher, "cpu")[1]
        return {
            **super().model_spec(),
            "post_shift": True,
            "model": teacher_spec["model"],
            "model_options": teacher_spec.get("model_options", {}),
        }

    def result_metrics(self, steps: int, per_rank: list[list[float] | None]) -> dict[str, Any]:
        return {
            "post_shift": {
                "log_shift": self.log_shift.tolist(),
                "best_iteration": self.best["iteration"],
                "val_worst": self.best["worst"],
            }
        }
