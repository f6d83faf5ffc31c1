"""Run directories, atomic checkpoints and the random-number state of a run.

A run directory holds ``config.json`` (the resolved options), ``log.jsonl`` (one JSON record per
logged step and per evaluation), ``checkpoint.pt`` (everything needed to continue exactly),
``model.pt`` (the final model, loadable without the config) and ``metrics.json`` (the final
classification reports). Every file is written to a temporary name, flushed to disk and renamed, so a
run killed at any instant leaves either the old file or the new one, never a torn one.

``.rkd-run`` marks a directory as written by rkd and lists the extra files rkd wrote into it
(``eval*.json``); ``--overwrite`` deletes only the run's own files and those listed, and refuses a
non-empty directory without the marker. ``data.json`` holds the fingerprint of the data files.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rkd_engine.errors import UserError
from rkd_engine.training.config import semantic_diff

CHECKPOINT_FORMAT = "rkd-checkpoint-v1"
MODEL_FORMAT = "rkd-model-v1"
RUN_MARKER = ".rkd-run"
RUN_FORMAT = "rkd-run-v1"
# The files every run writes (and ``--overwrite`` may delete), besides those listed in the marker.
RUN_FILES = ("config.json", "log.jsonl", "metrics.json", "checkpoint.pt", "model.pt", "data.json")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or model file that cannot be used: unreadable, corrupt, or from another config."""

    exit_status = 1


class RunDirError(UserError, RuntimeError):
    """A run directory that cannot be used as asked (exists without ``--resume``, missing files...)."""


def derive_seed(seed: int, *tags: object) -> int:
    """A 63-bit seed that is a pure function of ``seed`` and ``tags`` (stable across processes)."""
    digest = hashlib.sha256(json.dumps([seed, *tags], default=str).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` from ``seed``."""
    torch.manual_seed(derive_seed(seed, "torch"))
    np.random.seed(derive_seed(seed, "numpy") % (1 << 32))
    random.seed(derive_seed(seed, "python"))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any) -> None:
    """Write ``path`` atomically: ``write(fileobj)`` into a temporary file, fsync, ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is not None and str(exc.filename) != str(tmp):
            raise
        # Name the file being written (not its temporary twin), e.g. for a full disk.
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, written atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    atomic_write(path, lambda fh: fh.write(data))


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save(obj)``, written atomically."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def capture_rng_state() -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and Python random states, in ``torch.load(weights_only)`` types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunDir:
    """The files of one run. Only the writer process (rank 0) writes; every process may read."""

    def __init__(self, path: str | Path, *, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer

    config_path = property(lambda self: self.path / "config.json")
    log_path = property(lambda self: self.path / "log.jsonl")
    metrics_path = property(lambda self: self.path / "metrics.json")
    checkpoint_path = property(lambda self: self.path / "checkpoint.pt")
    model_path = property(lambda self: self.path / "model.pt")

    marker_path = property(lambda self: self.path / RUN_MARKER)
    data_path = property(lambda self: self.path / "data.json")

    def is_rkd_run(self) -> bool:
        """Whether rkd created this directory (it holds the ``.rkd-run`` marker)."""
        return self.marker_path.is_file()

    def never_started(self) -> bool:
        """An rkd run that saved nothing to continue from (no checkpoint, model or metrics): replaceable."""
        return self.is_rkd_run() and not any(
            p.exists() for p in (self.checkpoint_path, self.model_path, self.metrics_path)
        )

    def is_finished(self) -> bool:
        """Whether the run finished (``model.pt`` and ``metrics.json`` are there)."""
        return self.model_path.is_file() and self.metrics_path.is_file()

    def check_new(self, *, overwrite: bool) -> None:
        """Raise unless a new run may start here.

        Allowed: a missing or empty directory; an rkd run that never saved anything (a failed start);
        with ``overwrite``, an rkd run (with the marker). A directory rkd did not create is never
        overwritten.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} exists and is not a directory")
        if not self.path.is_dir() or not any(self.path.iterdir()) or self.never_started():
            return
        if not self.is_rkd_run():
            raise RunDirError(
                f"--out {self.path} is a non-empty directory that rkd did not create (no {RUN_MARKER} marker): "
                + ("--overwrite only replaces rkd runs; " if overwrite else "")
                + "choose another --out"
            )
        if not overwrite:
            raise RunDirError(
                f"run directory {self.path} already exists: pass --resume to continue it, --overwrite to "
                "start it again, or choose another --out"
            )

    def _marker(self) -> dict[str, Any]:
        try:
            marker = json.loads(self.marker_path.read_text())
        except (OSError, ValueError):
            return {}
        return marker if isinstance(marker, dict) else {}

    def register_file(self, name: str) -> None:
        """Record in the marker that rkd wrote ``name`` into this run (so ``--overwrite`` may delete it)."""
        marker = self._marker()
        if not marker:
            return
        files = [f for f in marker.get("files", []) if isinstance(f, str)]
        if name not in files:
            marker["files"] = files + [name]
            atomic_write_json(self.marker_path, marker)

    def create(self, config: Mapping[str, Any], *, overwrite: bool) -> None:
        """Start a new run: (re)create the directory, write the marker, ``config.json``, an empty log.

        Replacing an existing run deletes only the files rkd wrote (``RUN_FILES`` and those listed in
        the marker); call ``check_new`` first.
        """
        if not self.writer:
            return
        if self.is_rkd_run():
            listed = [f for f in self._marker().get("files", []) if isinstance(f, str) and "/" not in f]
            for name in (*RUN_FILES, *listed):
                if name not in (".", ".."):
                    (self.path / name).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.marker_path, {"format": RUN_FORMAT, "command": config.get("command"), "files": []})
        atomic_write_json(self.config_path, dict(config))
        atomic_write(self.log_path, lambda fh: None)

    def read_data_fingerprint(self) -> dict[str, Any] | None:
        """``data.json`` of the run (``{"data": spec, "sha256": ...}``), ``None`` if the run has none."""
        try:
            record = json.loads(self.data_path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def write_data_fingerprint(self, spec: str, sha256: str | None) -> None:
        if self.writer:
            atomic_write_json(self.data_path, {"data": spec, "sha256": sha256})

    def read_config(self, required: tuple[str, ...] = ()) -> dict[str, Any]:
        """The resolved options of this run; ``RunDirError`` unless it is a JSON object holding ``required``."""
        try:
            config = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            raise RunDirError(f"{self.path} is not a run directory (no config.json)") from None
        except IsADirectoryError:
            raise RunDirError(f"{self.config_path} is a directory, not a run's config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunDirError(f"{self.config_path} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise RunDirError(f"{self.config_path} must hold a JSON object of options, got {type(config).__name__}")
        missing = [k for k in required if k not in config]
        if missing:
            raise RunDirError(f"{self.config_path} lacks the option(s) {', '.join(missing)}; it is damaged")
        return config

    def read_metrics(self) -> dict[str, Any]:
        """The final metrics of a finished run."""
        try:
            return json.loads(self.metrics_path.read_text())
        except FileNotFoundError:
            raise RunDirError(f"run {self.path} has not finished (no metrics.json); resume it with --resume") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunDirError(f"{self.metrics_path} is not valid JSON: {exc}") from None

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one JSON record to ``log.jsonl``."""
        if not self.writer:
            return
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(dict(record)) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop the log records written after ``step`` (by a run that was killed after its checkpoint)."""
        if not self.writer or not self.log_path.exists():
            return
        kept = []
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
            # Records of the checkpoint's own step were written before it, except the evaluation
            # that follows an epoch's last step, which the resumed run writes again.
            at = record.get("step", 0)
            if at < step or (at == step and record.get("event") != "eval"):
                kept.append(line)
        data = "".join(line + "\n" for line in kept).encode()
        atomic_write(self.log_path, lambda fh: fh.write(data))

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        if self.writer:
            atomic_write_json(self.metrics_path, dict(metrics))

    def save_checkpoint(self, state: dict[str, Any], config: Mapping[str, Any]) -> None:
        """Write ``checkpoint.pt`` atomically, stamped with the config it belongs to."""
        if not self.writer:
            return
        payload = {"format": CHECKPOINT_FORMAT, "config": dict(config), **state}
        atomic_torch_save(self.checkpoint_path, payload)

    def load_checkpoint(self, config: Mapping[str, Any], map_location: torch.device | str = "cpu") -> dict[str, Any]:
        """Read ``checkpoint.pt`` and check that it belongs to ``config``; ``CheckpointError`` otherwise."""
        path = self.checkpoint_path
        if not path.exists():
            raise CheckpointError(f"cannot resume {self.path}: it has no checkpoint.pt (nothing was saved yet)")
        payload = load_torch_file(path, map_location, what="checkpoint")
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not an rkd checkpoint (expected format {CHECKPOINT_FORMAT!r})")
        differ = semantic_diff(payload.get("config", {}), config)
        if differ:
            detail = ", ".join(f"{k}: {payload['config'].get(k)!r} -> {config.get(k)!r}" for k in differ[:5])
            raise CheckpointError(
                f"{path} was written with a different configuration ({detail}); resume with the run's own options "
                "or start a new run with another --out"
            )
        return payload


def _is_damaged(path: Path) -> bool:
    """Whether ``path`` is shown to be damaged: rkd writes zip archives (torch.save's format), so a file
    that is not a readable zip archive, or whose members fail their CRC check, is corrupt."""
    try:
        if not zipfile.is_zipfile(path):
            return True
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is not None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError):
        return True


def load_torch_file(path: Path, map_location: torch.device | str, *, what: str) -> Any:
    """``torch.load`` (weights only) with a clear error.

    Only a file shown to be damaged (a torn archive, a truncated pickle) is reported as corrupt with
    the advice to delete it; any other failure (a CUDA tensor on a machine without CUDA, a permission
    error) names its cause and touches nothing.
    """
    device = torch.device(map_location) if isinstance(map_location, str) else map_location
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"cannot load {what} {path} onto {device}: no CUDA GPU is available here (use cpu)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{what} {path} is a directory, not a file") from None
    except PermissionError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror}") from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        first = lines[0][:300]
        if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in first:
            # torch's long preamble; the reason is the line after "WeightsUnpickler error:".
            _, _, after = str(exc).partition("WeightsUnpickler error:")
            reason = [line.strip() for line in after.splitlines() if line.strip()]
            first = reason[0].split(". Please use")[0][:300] if reason else first
            if "Unsupported global" in first:
                raise CheckpointError(
                    f"{what} {path} holds Python objects that rkd never writes ({first}); it was refused without "
                    "running them: it is not an rkd file"
                ) from None
        if _is_damaged(path):
            raise CheckpointError(
                f"{what} {path} is corrupt or truncated and cannot be read ({type(exc).__name__}: {first}); "
                "delete it to start over"
            ) from None
        raise CheckpointError(f"cannot load {what} {path} ({type(exc).__name__}: {first})") from None
