"""Run configurations: one dataclass per command, filled from defaults, a YAML/JSON file and flags.

Every option is a dataclass field whose metadata carries its help text and value kind, so the CLI
flags (``--batch-size``), the config-file keys (``batch_size`` or ``batch-size``) and the resolved
``config.json`` of a run all come from one table. Values are checked by ``validate``; a bad value
raises ``ConfigError`` (a ``ValueError``) with a one-line message naming the option.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rkd_engine.data.defaults import DEFAULT_IMBALANCE, Protocol
from rkd_engine.errors import UserError
from rkd_engine.ops.constants import BACKENDS as _KERNEL_BACKENDS
from rkd_engine.ops.constants import OBJECTIVES

if TYPE_CHECKING:
    from rkd_engine.training.methods import Method

STUDENT_METHODS = ("distill", "hinton", "post-shift", "group-dro", "ada-alpha", "ada-margin")
VAL_LABELS = ("teacher", "onehot")
AUGMENT = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", *_KERNEL_BACKENDS)

# Options that do not change what a run computes: a run may be resumed with different values.
NON_SEMANTIC = frozenset({"out", "device", "backend", "checkpoint_every"})
# Options a student takes from its teacher's run unless given (the teacher's data split must be reused).
INHERITED_DATA = ("data", "imbalance", "val_per_class", "test_per_class", "data_seed")


class ConfigError(UserError, ValueError):
    """A bad option value or combination; the message names the option and what was expected."""


def _opt(default: Any, kind: str, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field carrying its CLI kind, help and choices (immutable defaults only)."""
    return field(default=default, metadata={"kind": kind, "help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Options shared by teacher and student training (docs/dro.md and docs/protocol.md)."""

    out: str | None = _opt(None, "optstr", "run directory (default: runs/<command>-<objective>-seed<seed>)")
    data: str | None = _opt(
        "digits", "optstr", "data source: digits | synthetic[:m=..,d=..,n=..] | npz:PATH | cifar10:DIR | cifar100:DIR"
    )
    imbalance: float | None = _opt(
        None, "optfloat", f"imbalance ratio rho = n_0 / n_(m-1) of the training set (default {DEFAULT_IMBALANCE:g})"
    )
    val_per_class: int | None = _opt(None, "optint", "validation examples per class (default: the source's)")
    test_per_class: int | None = _opt(None, "optint", "test examples per class (default: the source's)")
    data_seed: int | None = _opt(None, "optint", "seed of the data split (default: --seed)")
    model: str = _opt(
        "auto",
        "str",
        "mlp | cnn | resnet8 | resnet20 | resnet32 | resnet56 | package.module:factory | auto (the data source's default)",
    )
    model_options: dict = field(
        default_factory=dict,
        metadata={
            "kind": "options",
            "help": "model keyword KEY=VALUE (repeatable), e.g. hidden_sizes=[128]",
            "choices": None,
        },
    )
    epochs: int | None = _opt(None, "optint", "training epochs (default: the data source's)")
    batch_size: int | None = _opt(
        None, "optint", "global batch size, split over processes under torchrun (default: the data source's)"
    )
    lr: float | None = _opt(None, "optfloat", "peak learning rate of SGD (default: the data source's)")
    momentum: float = _opt(0.9, "float", "SGD momentum")
    weight_decay: float | None = _opt(None, "optfloat", "SGD weight decay (default: the data source's)")
    warmup_epochs: float = _opt(1.0, "float", "epochs of linear learning-rate warm-up")
    lr_decay_at: tuple = _opt((0.5, 0.75), "floats", "fractions of training where the learning rate decays")
    lr_decay: float = _opt(0.1, "float", "factor applied to the learning rate at each decay point")
    objective: str = _opt("standard", "str", "training objective (docs/objectives.md)", OBJECTIVES)
    alpha: float | None = _opt(None, "optfloat", "trade-off alpha in [0, 1] (objective tradeoff only)")
    dro_step: float | None = _opt(
        None,
        "optfloat",
        "DRO step size eta (default: 0.1 sqrt((log m / T) / (log 10 / 100)) for T updates; 0.01 for group-dro)",
    )
    dro_every: int | None = _opt(
        None, "optint", "DRO weight update every N training steps (default: 4 an epoch, at most every 32 steps)"
    )
    val_batch: int = _opt(4096, "int", "validation rows per DRO update (all of them if fewer)")
    augment: str = _opt("auto", "str", "image augmentation (auto: the data source's default)", AUGMENT)
    seed: int = _opt(0, "int", "seed of initialisation, batch order and augmentation")
    checkpoint_every: int = _opt(200, "int", "write a checkpoint every N steps (0: only at the end)")
    eval_every: int = _opt(1, "int", "evaluate on the validation set every N epochs (0: only at the end)")
    device: str = _opt("auto", "str", "cpu | cuda | auto (cuda when available)", DEVICES)
    backend: str = _opt("auto", "str", "loss backend", BACKENDS)

    command = "teacher"

    def to_dict(self) -> dict[str, Any]:
        """The options as plain JSON values."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                list(value) if isinstance(value, tuple) else (dict(value) if isinstance(value, dict) else value)
            )
        return out


@dataclass
class TeacherConfig(TrainConfig):
    """``rkd teacher``: a classifier trained on labels with one of the paper's objectives."""

    command = "teacher"


@dataclass
class StudentConfig(TrainConfig):
    """``rkd student``: a classifier distilled from a teacher run (or a baseline method)."""

    data: str | None = _opt(None, "optstr", "data source (default: the teacher's; must match it)")
    imbalance: float | None = _opt(None, "optfloat", "imbalance ratio (default: the teacher's)")
    teacher: str | None = _opt(None, "optstr", "teacher run directory (written by `rkd teacher`)")
    teacher_checkpoint: str | None = _opt(
        None, "optstr", "a teacher trained elsewhere: a state dict (with --teacher-model), torch.export or TorchScript"
    )
    teacher_model: str | None = _opt(None, "optstr", "model of --teacher-checkpoint's state dict (NAME or pkg.mod:fn)")
    teacher_model_options: dict = field(
        default_factory=dict,
        metadata={"kind": "options", "help": "--teacher-model keyword KEY=VALUE (repeatable)", "choices": None},
    )
    method: str = _opt("distill", "str", "student method", STUDENT_METHODS)
    gamma: float = _opt(1.0, "float", "teacher temperature gamma: p = softmax(g / gamma)")
    tau: float = _opt(1.0, "float", "student temperature tau on the teacher term (Hinton)")
    teacher_weight: float | None = _opt(
        None, "optfloat", "a in q = (1-a) e_y + a p (hinton: default 0.5; ada-margin: default 1)"
    )
    val_labels: str = _opt("teacher", "str", "labels of the validation DRO updates", VAL_LABELS)
    val_gamma: float | None = _opt(None, "optfloat", "teacher temperature for validation labels (default: --gamma)")
    margin_scale: float = _opt(1.0, "float", "ada-margin: largest per-example margin delta")
    # Offline teacher (rkd_engine/training/teacher_cache.py).
    teacher_cache: str | None = _opt(
        None,
        "optstr",
        "teacher-output cache (written by `rkd cache-teacher`): train without loading or running the teacher",
    )
    topk_tail: str = _opt(
        "renormalize",
        "str",
        "top-k cache: the target off the top k classes (docs/wide_heads.md)",
        ("renormalize", "uniform"),
    )
    cache_augmented: bool = _opt(
        False,
        "bool",
        "accept a teacher cache with augmentation on: every augmented view is then distilled towards the "
        "teacher's outputs on the UN-augmented image (online, the teacher sees the augmented view), which "
        "changes the method",
    )

    command = "student"


CONFIG_CLASSES: dict[str, type[TrainConfig]] = {"teacher": TeacherConfig, "student": StudentConfig}


def flag(name: str) -> str:
    """The CLI flag of an option: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def option_fields(cls: type[TrainConfig]) -> list[dataclasses.Field]:
    """The option fields of a config class, in declaration order."""
    return list(dataclasses.fields(cls))


def _fail(name: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{flag(name)} must be {expected}, got {value!r}")


def convert(name: str, kind: str, value: Any) -> Any:
    """Convert a flag string or a config-file value to the option's kind; ``ConfigError`` if it cannot."""
    if kind == "optstr" and isinstance(value, str) and not value.strip() and name in ("data", "out", "teacher"):
        raise _fail(name, "a non-empty string (or leave it out for the default)", value)
    if kind in ("optint", "optfloat", "optstr"):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        kind = kind[3:]
    if kind == "int":
        if isinstance(value, bool):
            raise _fail(name, "an integer", value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _fail(name, "an integer", value)
    if kind == "float":
        if isinstance(value, bool):
            raise _fail(name, "a number", value)
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise _fail(name, "a number", value) from None
        if not math.isfinite(out):
            raise _fail(name, "a finite number", value)
        return out
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise _fail(name, "true or false", value)
    if kind == "str":
        if not isinstance(value, str):
            raise _fail(name, "a string", value)
        return value
    if kind == "floats":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise _fail(name, "a comma-separated list of numbers", value)
        return tuple(convert(name, "float", v) for v in items if not (isinstance(v, str) and not v.strip()))
    if kind == "options":
        if isinstance(value, Mapping):
            return {str(k): v for k, v in value.items()}
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise _fail(name, "KEY=VALUE", value)
        out = {}
        for item in items:
            key, eq, raw = str(item).partition("=")
            if not eq or not key.strip():
                raise _fail(name, "KEY=VALUE", item)
            try:
                out[key.strip()] = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise _fail(name, "KEY=VALUE with a YAML value", item) from None
        return out
    raise AssertionError(f"unknown option kind {kind!r}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON (``.json``) mapping of options; keys may use - or _."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not a text file (expected YAML or JSON)") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys) if path.suffix.lower() == ".json" else load_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError, DuplicateKeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"--config {path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {first}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


class DuplicateKeyError(ValueError):
    """A mapping key given twice in a config file (YAML and JSON would silently keep the last one)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"the key {key!r} is given twice")
        out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(f"the key {key!r} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises ``DuplicateKeyError`` for a mapping key given twice."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def merge(cls: type[TrainConfig], *layers: Mapping[str, Any], source: str = "") -> TrainConfig:
    """A config of ``cls`` from its defaults overlaid by ``layers`` (later wins), values converted.

    Unknown keys raise ``ConfigError`` listing the known ones.
    """
    fields = {f.name: f for f in option_fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            key = key.replace("-", "_")
            if key not in fields:
                where = f" in {source}" if source else ""
                raise ConfigError(
                    f"unknown option {key!r}{where} for `rkd {cls.command}`; known: {', '.join(sorted(fields))}"
                )
            values[key] = convert(key, fields[key].metadata["kind"], value)
    return cls(**values)


def _check(cond: bool, name: str, expected: str, value: Any) -> None:
    if not cond:
        raise _fail(name, expected, value)


def validate(cfg: TrainConfig) -> None:
    """Check every value and combination; raise ``ConfigError`` naming the first bad option."""
    for f in option_fields(type(cfg)):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise _fail(f.name, "one of " + ", ".join(choices), value)
    _check(cfg.imbalance is None or cfg.imbalance >= 1, "imbalance", "a number >= 1", cfg.imbalance)
    for name in ("val_per_class", "test_per_class"):
        value = getattr(cfg, name)
        _check(value is None or value >= 1, name, "an integer >= 1", value)
    for name in ("epochs", "batch_size", "dro_every", "val_batch"):
        value = getattr(cfg, name)
        _check(value is None or value >= 1, name, "an integer >= 1", value)
    for name in ("seed", "data_seed"):
        value = getattr(cfg, name)
        _check(value is None or 0 <= value < 2**63, name, "an integer in [0, 2^63)", value)
    for name in ("checkpoint_every", "eval_every"):
        _check(getattr(cfg, name) >= 0, name, "an integer >= 0", getattr(cfg, name))
    _check(cfg.lr is None or cfg.lr > 0, "lr", "a number > 0", cfg.lr)
    _check(0 <= cfg.momentum < 1, "momentum", "a number in [0, 1)", cfg.momentum)
    _check(cfg.weight_decay is None or cfg.weight_decay >= 0, "weight_decay", "a number >= 0", cfg.weight_decay)
    _check(cfg.warmup_epochs >= 0, "warmup_epochs", "a number >= 0", cfg.warmup_epochs)
    _check(0 < cfg.lr_decay <= 1, "lr_decay", "a number in (0, 1]", cfg.lr_decay)
    _check(
        all(0 < t < 1 for t in cfg.lr_decay_at) and list(cfg.lr_decay_at) == sorted(cfg.lr_decay_at),
        "lr_decay_at",
        "increasing fractions in (0, 1)",
        ",".join(str(t) for t in cfg.lr_decay_at),
    )
    _check(cfg.dro_step is None or cfg.dro_step > 0, "dro_step", "a number > 0", cfg.dro_step)
    if cfg.objective == "tradeoff":
        _check(
            cfg.alpha is not None and 0 <= cfg.alpha <= 1,
            "alpha",
            "a number in [0, 1] for --objective tradeoff",
            cfg.alpha,
        )
    elif cfg.alpha is not None:
        raise ConfigError(f"--alpha is only used with --objective tradeoff (got --objective {cfg.objective})")
    if cfg.data is not None and not cfg.data.strip():
        raise _fail("data", "a data source such as 'digits'", cfg.data)
    if isinstance(cfg, StudentConfig):
        _validate_student(cfg)


def _validate_student(cfg: StudentConfig) -> None:
    _check(cfg.gamma > 0, "gamma", "a number > 0", cfg.gamma)
    _check(cfg.tau > 0, "tau", "a number > 0", cfg.tau)
    _check(cfg.val_gamma is None or cfg.val_gamma > 0, "val_gamma", "a number > 0", cfg.val_gamma)
    _check(cfg.margin_scale >= 0, "margin_scale", "a number >= 0", cfg.margin_scale)
    if cfg.teacher_weight is not None:
        _check(0 <= cfg.teacher_weight <= 1, "teacher_weight", "a number in [0, 1]", cfg.teacher_weight)
    given = [
        name
        for name, value in (
            ("--teacher", cfg.teacher),
            ("--teacher-checkpoint", cfg.teacher_checkpoint),
            ("--teacher-cache", cfg.teacher_cache),
        )
        if value is not None
    ]
    if cfg.teacher_checkpoint is not None and len(given) > 1:  # a cache names the teacher run it came from
        raise ConfigError(f"pass one teacher: {' or '.join(given)}, not several")
    if (cfg.teacher_model is not None or cfg.teacher_model_options) and cfg.teacher_checkpoint is None:
        raise ConfigError("--teacher-model and --teacher-model-option describe --teacher-checkpoint FILE: pass it too")
    _method_class(cfg).check_config(cfg)  # what the method itself refuses (rkd_engine/training/methods.py)


def _method_class(cfg: TrainConfig) -> type[Method]:
    """The ``Method`` class of ``cfg`` (imported when needed: ``methods`` imports this module)."""
    from rkd_engine.training.methods import method_class

    return method_class(cfg)


def resolve_defaults(cfg: TrainConfig, *, cuda_available: bool) -> TrainConfig:
    """Fill the values that default to something computed (device, data seed, step size, ...)."""
    changes: dict[str, Any] = {}
    if cfg.data is None:
        changes["data"] = "digits"
    if cfg.imbalance is None:
        changes["imbalance"] = DEFAULT_IMBALANCE
    if cfg.device == "auto":
        changes["device"] = "cuda" if cuda_available else "cpu"
    if cfg.data_seed is None:
        changes["data_seed"] = cfg.seed
    # The method's own defaults (a baseline's --dro-step, --teacher-weight). Validation DRO's step depends
    # on the run's number of updates: ``resolve_data_defaults`` sets it.
    method = _method_class(cfg)
    changes.update(method.config_defaults(cfg))
    if isinstance(cfg, StudentConfig) and cfg.val_gamma is None:
        changes["val_gamma"] = cfg.gamma
    if cfg.out is None:
        label = method.name if method.named else cfg.objective
        changes["out"] = str(Path("runs") / f"{cfg.command}-{label}-seed{cfg.seed}")
    return dataclasses.replace(cfg, **changes)


def resolve_data_defaults(cfg: TrainConfig, dataset: Any, protocol: Protocol) -> tuple[TrainConfig, dict[str, Any]]:
    """Fill the options that default to the data source's ``protocol`` and the DRO schedule of the run.

    Returns the config and the values filled (a dict: what a run prints so a user knows what ran). The
    DRO schedule (``rkd_engine.training.schedule``): ``dro_every`` gives about 4 updates an epoch, at
    most every 32 steps; ``dro_step`` is ``0.1 sqrt((log m / T) / (log 10 / 100))`` for the ``T``
    updates the run makes. Both only where the objective updates ``lambda`` from validation.
    """
    from rkd_engine.training.schedule import default_dro_every, default_dro_step, steps_per_epoch

    filled: dict[str, Any] = {}
    for name, value in protocol.options().items():
        if name == "model":
            if cfg.model == "auto":
                filled["model"] = value
                if not cfg.model_options:
                    filled["model_options"] = protocol.model_options
        elif name != "model_options" and getattr(cfg, name) is None:
            filled[name] = value
    cfg = dataclasses.replace(cfg, **filled)
    # Resolved for every run (config.json holds concrete values), reported where lambda moves.
    per_epoch = steps_per_epoch(len(dataset.train), cfg.batch_size)
    schedule: dict[str, Any] = {}
    if cfg.dro_every is None:
        schedule["dro_every"] = default_dro_every(per_epoch)
    updates = cfg.epochs * per_epoch // schedule.get("dro_every", cfg.dro_every)
    if cfg.dro_step is None:
        schedule["dro_step"] = default_dro_step(dataset.num_classes, updates)
    cfg = dataclasses.replace(cfg, **schedule)
    if cfg.objective in ("robust", "tradeoff") and not _method_class(cfg).own_objective:
        filled.update(schedule, dro_updates=updates)
    return cfg, filled


def semantic_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Names of the options that change what a run computes and differ between two resolved configs."""
    keys = (set(stored) | set(current)) - NON_SEMANTIC
    return sorted(k for k in keys if _canon(stored.get(k)) != _canon(current.get(k)))


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
