"""Teachers trained elsewhere: ``rkd student --teacher-checkpoint FILE``.

``FILE`` is one of
  - a state dict (``torch.save(model.state_dict(), FILE)``, or a mapping holding it under ``"state_dict"``
    or ``"model"``), loaded into ``--teacher-model NAME`` built for the data (a built-in name or the
    user's ``package.module:factory``, with ``--teacher-model-option KEY=VALUE``);
  - a ``torch.export`` program (``torch.export.save``; export it with a dynamic batch dimension);
  - a TorchScript program (``torch.jit.save``).
The teacher is probed once with a batch of two zero inputs of the data's shape: its scores must be
``(2, m)`` with ``m`` the data's class count.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rkd_engine.models import build_model
from rkd_engine.training.config import ConfigError

PROBE_ROWS = 2


class FrozenProgram(nn.Module):
    """A compiled teacher program (``torch.export`` or TorchScript) run as it was saved: ``train()`` and
    ``eval()`` change nothing, since the program's mode was fixed when it was exported."""

    def __init__(self, program: nn.Module, kind: str) -> None:
        super().__init__()
        self.program = program
        self.kind = kind
        self.training = False

    def train(self, mode: bool = True) -> FrozenProgram:  # noqa: ARG002 - the program's mode is fixed
        return self

    def forward(self, x: Tensor) -> Tensor:
        out = self.program(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def _state_dict(payload: Any, path: Path) -> Mapping[str, Tensor]:
    if isinstance(payload, Mapping):
        for key in ("state_dict", "model"):
            inner = payload.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return inner
        if payload and all(isinstance(v, Tensor) for v in payload.values()):
            return payload
    raise ConfigError(
        f"--teacher-checkpoint {path}: expected a state dict (a mapping of parameter names to tensors), "
        f"got {type(payload).__name__}"
    )


def _load_program(path: Path, device: torch.device) -> nn.Module:
    errors = []
    try:
        program = torch.export.load(str(path))
        return FrozenProgram(program.module().to(device), "torch.export")
    except Exception as exc:  # not an export archive: try TorchScript next
        errors.append(f"torch.export: {type(exc).__name__}")
    try:
        return FrozenProgram(torch.jit.load(str(path), map_location=device), "torchscript")
    except Exception as exc:
        errors.append(f"TorchScript: {type(exc).__name__}")
    raise ConfigError(
        f"--teacher-checkpoint {path}: neither a torch.export program nor a TorchScript file ({'; '.join(errors)}); "
        "for a state dict pass --teacher-model NAME or package.module:factory"
    )


def load_external_teacher(
    path: str | Path,
    *,
    model: str | None,
    model_options: Mapping[str, Any],
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device | str,
) -> nn.Module:
    """The frozen teacher in ``path`` in eval mode on ``device``, its class count checked against the data."""
    path = Path(path).expanduser()
    device = torch.device(device)
    if not path.is_file():
        raise ConfigError(f"--teacher-checkpoint {path}: no such file")
    if model is not None:
        try:
            payload = torch.load(path, map_location=device, weights_only=True)
        except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as exc:
            raise ConfigError(
                f"--teacher-checkpoint {path}: cannot read it as a state dict ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
        state = _state_dict(payload, path)
        try:
            teacher = build_model(model, tuple(input_shape), num_classes, **dict(model_options))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--teacher-model {model}: {exc}") from None
        try:
            teacher.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(
                f"--teacher-checkpoint {path}: the weights do not fit --teacher-model {model}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        teacher = teacher.to(device).eval()
    else:
        if model_options:
            raise ConfigError("--teacher-model-option needs --teacher-model (a program carries its own model)")
        teacher = _load_program(path, device)
    probe = torch.zeros(PROBE_ROWS, *input_shape, device=device)
    try:
        with torch.no_grad():
            out = teacher(probe)
    except Exception as exc:  # the user's program may raise anything on a wrong shape
        raise ConfigError(
            f"--teacher-checkpoint {path}: the teacher fails on a batch of {PROBE_ROWS} inputs of shape "
            f"{tuple(input_shape)} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "a torch.export program needs a dynamic batch dimension"
        ) from None
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != PROBE_ROWS:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"--teacher-checkpoint {path}: the teacher must return (B, m) scores, got {shape}")
    if out.shape[1] != num_classes:
        raise ConfigError(
            f"--teacher-checkpoint {path}: the teacher scores {out.shape[1]} classes, the data has {num_classes}"
        )
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
