"""Model files and evaluation: ``model.pt`` of a run, batched prediction, ``rkd eval``.

The reports are ``rkd_engine.metrics.classification_report`` (accuracy, balanced, worst-1 and worst-k
accuracy, per-class recall, ECE; docs/metrics.md) and, for a teacher's probabilities,
``per_class_calibration_error`` (section 6).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rkd_engine.metrics import classification_report, per_class_calibration_error
from rkd_engine.models import build_model
from rkd_engine.training.baselines import PostShift
from rkd_engine.training.runs import (
    MODEL_FORMAT,
    CheckpointError,
    RunDir,
    atomic_torch_save,
    atomic_write_json,
    load_torch_file,
)

EVAL_BATCH = 1024


def save_model_file(path: Path, model: nn.Module, spec: Mapping[str, Any]) -> None:
    """Write ``model.pt``: the weights and what ``build_model`` needs to rebuild the model."""
    payload = {"format": MODEL_FORMAT, **dict(spec), "state_dict": model.state_dict()}
    atomic_torch_save(path, payload)


def load_model_file(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model saved in ``path`` (a run directory or a ``model.pt``), in eval mode, and its spec."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model.pt").exists():
            raise CheckpointError(f"run {path} has no model.pt: it has not finished (resume it with --resume)")
        path = path / "model.pt"
    payload = load_torch_file(path, device, what="model file")
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not an rkd model file (expected format {MODEL_FORMAT!r})")
    spec = {k: v for k, v in payload.items() if k != "state_dict"}
    model = build_model(spec["model"], tuple(spec["input_shape"]), spec["num_classes"], **spec.get("model_options", {}))
    if spec.get("post_shift"):
        model = PostShift(model, spec["num_classes"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: the weights do not fit model {spec['model']!r}: {str(exc).splitlines()[0]}"
        ) from None
    return model.to(device).eval(), spec


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = EVAL_BATCH) -> Tensor:
    """Scores ``f`` (N, m) float32 of ``model`` in eval mode (the mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch_size]).float() for i in range(0, x.shape[0], batch_size)])
    finally:
        model.train(was_training)


def report(logits: Tensor, labels: Tensor, num_classes: int) -> dict[str, Any]:
    """``classification_report`` of the scores (k = 3 for worst-k)."""
    return classification_report(logits, labels, num_classes, k=min(3, num_classes))


def teacher_calibration(teacher_logits: Tensor, labels: Tensor, gamma: float) -> dict[str, Any]:
    """Per-class calibration error of ``p = softmax(g / gamma)`` against held-out labels."""
    probs = torch.softmax(teacher_logits.double() / gamma, dim=1)
    return per_class_calibration_error(probs, labels)


def summary_line(rep: Mapping[str, Any]) -> str:
    """``accuracy 91.3  balanced 91.3  worst 80.0  worst-3 84.4`` (percent)."""
    return (
        f"accuracy {100 * rep['accuracy']:.1f}  balanced {100 * rep['balanced_accuracy']:.1f}  "
        f"worst {100 * rep['worst_accuracy']:.1f}  worst-{rep['k']} {100 * rep['worst_k_accuracy']:.1f}"
    )


def evaluate_run(
    run_dir: str | Path,
    *,
    data: str | None = None,
    splits: tuple[str, ...] = ("val", "test"),
    device: str = "cpu",
    write: bool = True,
) -> dict[str, Any]:
    """Evaluate a finished run's model on its own data split (or on ``data``, with the run's other
    data options) and write ``eval.json`` (``eval-<source>.json`` for other data) into the run.

    Returns ``{"run", "data", split: classification_report, ...}``.
    """
    from rkd_engine.data import load_dataset
    from rkd_engine.data.sources import data_fingerprint
    from rkd_engine.errors import DataError

    run = RunDir(run_dir)
    config = run.read_config(required=("data", "imbalance", "data_seed"))
    model, spec = load_model_file(run.path, device)
    source = data if data is not None else config["data"]
    if data is None:
        stored = run.read_data_fingerprint()
        theirs = stored.get("sha256") if stored else None
        now = data_fingerprint(source) if theirs else None
        if theirs and now and theirs != now:
            raise DataError(
                f"the file(s) of {source} changed since {run.path} was trained on them (sha256 {theirs[:12]}... "
                f"then, {now[:12]}... now): its own split cannot be rebuilt; pass --data to evaluate on other data"
            )
    dataset = load_dataset(
        source,
        imbalance=config["imbalance"],
        seed=config["data_seed"],
        val_per_class=config.get("val_per_class"),
        test_per_class=config.get("test_per_class"),
    )
    if dataset.num_classes != spec["num_classes"] or tuple(dataset.input_shape) != tuple(spec["input_shape"]):
        raise DataError(
            f"data {source!r} has {dataset.num_classes} classes of shape {tuple(dataset.input_shape)} but the model "
            f"of {run.path} expects {spec['num_classes']} of shape {tuple(spec['input_shape'])}"
        )
    result: dict[str, Any] = {"run": str(run.path), "data": source}
    for name in splits:
        if name not in ("train", "val", "test"):
            raise ValueError(f"splits must be among train, val, test, got {name!r}")
        part = getattr(dataset, name).to(device)
        result[name] = report(predict(model, part.x), part.y, dataset.num_classes)
    if write:
        write_eval(run.path, result, data=data)
    return result


def write_eval(run_dir: str | Path, result: Mapping[str, Any], *, data: str | None = None) -> Path:
    """Write ``evaluate_run``'s ``result`` into the run: ``eval.json`` (``eval-<source>.json`` for other data)."""
    run = RunDir(run_dir)
    if data is None:
        name = "eval.json"
    else:
        name = "eval-" + "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in data) + ".json"
    atomic_write_json(run.path / name, dict(result))
    run.register_file(name)
    return run.path / name
