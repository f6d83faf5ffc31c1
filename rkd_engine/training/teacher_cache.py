"""Offline teachers: a teacher's outputs computed once and stored, read by every student of a sweep.

``cache_teacher(RUN_DIR, CACHE)`` (``rkd cache-teacher``) runs a finished teacher run once over its
data split (training, validation and test sets, in evaluation mode, without augmentation) and writes
a directory that numpy alone can read:

- ``manifest.json``: format, layout, ``m``, ``k``, temperatures, dtype, provenance (teacher run and
  the SHA-256 of its ``model.pt``, data source, split seed, imbalance, held-out sizes, digests of
  every split's inputs and labels) and, for every array file, its shape, dtype, size and SHA-256;
- ``val.logits.npy``, ``test.logits.npy``: the dense teacher scores ``g`` (N x m) of the held-out
  sets (the DRO validation labels ``softmax(g / val_gamma)`` and the teacher-calibration metrics);
- the training set, either *dense*: ``train.logits.npy`` (N x m), which serves any temperature, or
  *top-k* (docs/wide_heads.md): ``train.topk_indices.npy`` (N x k, int32, the ``k`` largest
  scores of each row, in decreasing order), ``train.topk_logits.npy`` (N x k) and
  ``train.log_normalizer.npy`` (N x T, float32): ``log sum_j exp(g_j / gamma_t)`` over all ``m``
  classes for each temperature ``gamma_t`` of the cache. A student at ``gamma_t`` takes
  ``p_ij = exp(g_ij / gamma_t - log_normalizer_it)`` on ``K_i``: the exact tempered probabilities of
  the dense teacher, restricted to the top ``k`` (so at ``k = m`` the target is the dense one).

Creation is atomic and resumable: rows are written into ``CACHE.partial/`` in chunks, with the
number of rows done recorded after each chunk; the finished directory is renamed to ``CACHE`` only
after its manifest (with checksums) is written, so a killed run never leaves a cache that looks
complete, and the same call continues it. Opening a cache checks every file's size (a truncated
file) and, by default, its SHA-256 (a corrupted one).

Students use a cache with ``StudentConfig(teacher_cache=CACHE)`` (``rkd student --teacher-cache``):
the teacher is then neither loaded nor run. ``TeacherCacheDataset`` yields ``(x, y, teacher)`` for
training loops of one's own.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rkd_engine.data import Dataset, Split, load_dataset
from rkd_engine.data.protocol import LazyRows
from rkd_engine.errors import UserError
from rkd_engine.training.config import INHERITED_DATA, ConfigError, flag
from rkd_engine.training.evaluation import EVAL_BATCH, load_model_file
from rkd_engine.training.runs import RunDir, atomic_write_json

CACHE_FORMAT = "rkd-teacher-cache-v1"
DEFAULT_TEMPERATURES = (1.0, 3.0, 5.0)  # the paper's gamma grid
DTYPES = {"float32": np.float32, "float16": np.float16}
SPLITS = ("train", "val", "test")
TOPK_TAILS = ("renormalize", "uniform")
_HASH_CHUNK = 1 << 24  # bytes hashed at a time


class CacheError(UserError, ValueError):
    """A teacher cache that cannot be used as asked: missing, incomplete, corrupt, or made for other data."""


# ------------------------------------------------------------------------------------------ helpers
def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_CHUNK):
            h.update(block)
    return "sha256:" + h.hexdigest()


def tensor_digest(t: Tensor | LazyRows) -> str:
    """``sha256:<hex>`` of a tensor's dtype, shape and bytes (row order matters); ``LazyRows`` give their own."""
    if isinstance(t, LazyRows):
        return t.digest()
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}:{list(t.shape)}".encode())
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)
    data = flat.numpy()
    for i in range(0, data.size, _HASH_CHUNK):
        h.update(data[i : i + _HASH_CHUNK].tobytes())
    return "sha256:" + h.hexdigest()


def _temperatures(values: Sequence[float]) -> tuple[float, ...]:
    try:
        temps = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise CacheError(f"--temperatures must be numbers > 0, got {values!r}") from None
    if not temps or any(not (math.isfinite(t) and t > 0) for t in temps):
        raise CacheError(f"--temperatures must be numbers > 0, got {list(values)!r}")
    return tuple(sorted(set(temps)))


def _split_info(split: Split) -> dict[str, Any]:
    return {"rows": len(split), "inputs": tensor_digest(split.x), "labels": tensor_digest(split.y)}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) for the duration of the block."""
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fsync_tree(path: Path) -> None:
    for p in [*path.iterdir(), path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ writing
def _layout(split: str, topk: int | None) -> list[tuple[str, str]]:
    """``(array name, dtype key)`` of a split's files; dtype key ``"out"`` is the cache's dtype."""
    if split != "train" or topk is None:
        return [("logits", "out")]
    return [("topk_indices", "int32"), ("topk_logits", "out"), ("log_normalizer", "float32")]


def _shape(name: str, rows: int, m: int, topk: int | None, num_temps: int) -> tuple[int, ...]:
    if name == "logits":
        return (rows, m)
    if name == "log_normalizer":
        return (rows, num_temps)
    return (rows, topk)


def cache_teacher(
    run_dir: str | Path,
    out: str | Path,
    *,
    top_k: int | None = None,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    dtype: str = "float32",
    device: str = "cpu",
    overwrite: bool = False,
    dataset: Dataset | None = None,
    quiet: bool = False,
) -> TeacherCache:
    """Write the outputs of the teacher in ``run_dir`` into the cache directory ``out``; return it opened.

    ``top_k=None`` stores dense scores of the training set; an integer ``1 <= k <= m`` stores the top
    ``k`` of each row and the log-normalisers at ``temperatures``. ``dtype`` ("float32" or "float16")
    is that of the stored scores. A complete cache made from the same teacher with the same options
    is returned as it is; another one at ``out`` is replaced only with ``overwrite``. An interrupted
    call leaves ``out.partial/``, which the next call with the same arguments continues.
    ``dataset`` skips loading the data (it must be the teacher's split).
    """
    run_dir, out = Path(run_dir), Path(out)
    temps = _check_options(top_k, temperatures, dtype, device)
    run, teacher_cfg = _teacher_run(run_dir)
    teacher_digest = file_digest(run.model_path)
    data_opts = {k: teacher_cfg.get(k) for k in INHERITED_DATA}
    dataset = dataset if dataset is not None else _load_split(data_opts)
    m = dataset.num_classes
    if top_k is not None and top_k > m:
        raise CacheError(f"--top-k {top_k} exceeds the number of classes m = {m}")
    options = {
        "teacher_digest": teacher_digest,
        "layout": "dense" if top_k is None else "topk",
        "k": m if top_k is None else top_k,
        "temperatures": list(temps),
        "dtype": dtype,
        "data": data_opts,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with _locked(out.with_name(f".{out.name}.lock")):
        if out.exists():
            existing = _existing(out, options, overwrite)
            if existing is not None:
                return existing
        splits = {name: _split_info(getattr(dataset, name)) for name in SPLITS}
        progress = _open_partial(partial, {**options, "splits": splits})
        teacher, spec = load_model_file(run.model_path, device)
        if spec["num_classes"] != m or tuple(spec["input_shape"]) != tuple(dataset.input_shape):
            raise CacheError(
                f"teacher {run_dir} takes {tuple(spec['input_shape'])} inputs with {spec['num_classes']} classes; "
                f"its data has {tuple(dataset.input_shape)} and {m}"
            )
        for name in SPLITS:
            _write_split(
                partial, progress, name, getattr(dataset, name), teacher, m, device, top_k, temps, dtype, quiet
            )
        teacher_info = {
            "run": str(run_dir.resolve()),
            "model_digest": teacher_digest,
            "model": spec["model"],
            "model_options": spec.get("model_options", {}),
            "objective": teacher_cfg.get("objective"),
            "alpha": teacher_cfg.get("alpha"),
            "seed": teacher_cfg.get("seed"),
        }
        data_info = {**data_opts, "name": dataset.name, "input_shape": list(dataset.input_shape)}
        manifest = _manifest(options, m, teacher_info, data_info, splits, _file_entries(partial, top_k))
        (partial / "progress.json").unlink()
        atomic_write_json(partial / "manifest.json", manifest)
        _fsync_tree(partial)
        _publish(partial, out)
    if not quiet:
        print(f"cache-teacher: wrote {out} ({options['layout']}, k = {options['k']})", file=sys.stderr)
    return TeacherCache.open(out, verify="size")


def _check_options(top_k: int | None, temperatures: Sequence[float], dtype: str, device: str) -> tuple[float, ...]:
    """``cache_teacher``'s options checked (``CacheError``); returns the temperatures."""
    if dtype not in DTYPES:
        raise CacheError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    temps = _temperatures(temperatures)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise CacheError(f"--top-k must be an integer >= 1, got {top_k!r}")
    if device not in ("cpu", "cuda"):
        raise CacheError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CacheError("--device cuda but no CUDA GPU is available here (use --device cpu)")
    return temps


def _teacher_run(run_dir: Path) -> tuple[RunDir, dict[str, Any]]:
    """The finished teacher run at ``run_dir`` and its config (``CacheError`` for a student or unfinished run)."""
    run = RunDir(run_dir)
    teacher_cfg = run.read_config()
    if "teacher" in teacher_cfg or "method" in teacher_cfg:
        raise CacheError(f"{run_dir} is a student run: cache the outputs of a run written by `rkd teacher`")
    if not run.model_path.exists():
        raise CacheError(f"teacher run {run_dir} has not finished (no model.pt): finish it with --resume first")
    return run, teacher_cfg


def _load_split(data_opts: Mapping[str, Any]) -> Dataset:
    """The teacher's data split, from its run's data options."""
    return load_dataset(
        data_opts["data"],
        imbalance=data_opts["imbalance"],
        seed=data_opts["data_seed"],
        val_per_class=data_opts["val_per_class"],
        test_per_class=data_opts["test_per_class"],
    )


def _file_entries(partial: Path, top_k: int | None) -> dict[str, dict[str, Any]]:
    """The manifest's ``files``: path, shape, dtype, size and digest of every array written."""
    files = {}
    for name in SPLITS:
        for array, _ in _layout(name, top_k):
            path = partial / f"{name}.{array}.npy"
            arr = np.load(path, mmap_mode="r")
            files[f"{name}.{array}"] = {
                "path": path.name,
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "bytes": path.stat().st_size,
                "sha256": file_digest(path),
            }
            del arr
    return files


def _manifest(
    options: Mapping[str, Any],
    m: int,
    teacher: dict[str, Any],
    data: dict[str, Any],
    splits: dict[str, Any],
    files: dict[str, Any],
) -> dict[str, Any]:
    from rkd_engine import __version__

    return {
        "format": CACHE_FORMAT,
        "layout": options["layout"],
        "num_classes": m,
        "k": options["k"],
        "temperatures": list(options["temperatures"]),
        "dtype": options["dtype"],
        "augmentation": "none: outputs of the un-augmented inputs, teacher in evaluation mode",
        "teacher": teacher,
        "data": data,
        "splits": splits,
        "files": files,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rkd_version": __version__,
    }


def _publish(partial: Path, out: Path) -> None:
    """Move the complete cache ``partial`` to ``out``; an old cache there goes only once the new one is in place."""
    if out.exists():
        trash = out.with_name(out.name + ".old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(out, trash)
        os.replace(partial, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(partial, out)


def _existing(out: Path, options: Mapping[str, Any], overwrite: bool) -> TeacherCache | None:
    """The complete cache at ``out`` if it was made with ``options``; None if it may be replaced."""
    if not (out / "manifest.json").exists():
        if overwrite:
            return None
        raise CacheError(f"{out} exists and is not a teacher cache (no manifest.json): remove it or pass --overwrite")
    try:
        cache = TeacherCache.open(out)
    except CacheError:
        if overwrite:
            return None
        raise
    made = {
        "teacher_digest": cache.manifest["teacher"]["model_digest"],
        "layout": cache.layout,
        "k": cache.k,
        "temperatures": list(cache.temperatures),
        "dtype": cache.dtype,
        "data": {k: cache.manifest["data"].get(k) for k in INHERITED_DATA},
    }
    if made == dict(options):
        return cache
    if overwrite:
        return None
    differ = ", ".join(f"{k} {made[k]!r} (asked {options[k]!r})" for k in made if made[k] != options[k])
    raise CacheError(f"{out} is a cache made with other options: {differ}; pass --overwrite to replace it")


def _open_partial(partial: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The progress record of ``partial`` if it was started with ``options``; else a fresh directory."""
    record = partial / "progress.json"
    if record.exists():
        try:
            progress = json.loads(record.read_text())
        except json.JSONDecodeError:
            progress = {}
        if progress.get("options") == options:
            return progress
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    progress = {"options": options, "rows_done": {name: 0 for name in SPLITS}}
    atomic_write_json(record, progress)
    return progress


@torch.no_grad()
def _write_split(
    partial: Path,
    progress: dict[str, Any],
    name: str,
    split: Split,
    teacher: torch.nn.Module,
    m: int,
    device: str,
    top_k: int | None,
    temps: tuple[float, ...],
    dtype: str,
    quiet: bool,
) -> None:
    """Fill ``partial/<name>.*.npy`` from row ``progress['rows_done'][name]`` on, chunk by chunk."""
    rows = len(split)
    start = int(progress["rows_done"][name])
    if start >= rows:
        return
    arrays = {}
    for array, kind in _layout(name, top_k):
        path = partial / f"{name}.{array}.npy"
        np_dtype = DTYPES[dtype] if kind == "out" else np.dtype(kind)
        shape = _shape(array, rows, m, top_k, len(temps))
        if start == 0 or not path.exists():
            arrays[array] = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
        else:
            arrays[array] = np.load(path, mmap_mode="r+")
    gammas = torch.tensor(temps, dtype=torch.float32, device=device)
    x = split.x
    # Chunks aligned on EVAL_BATCH from row 0, as ``predict`` evaluates: the scores are bitwise those
    # an online student computes.
    start -= start % EVAL_BATCH
    for i in range(start, rows, EVAL_BATCH):
        g = teacher(x[i : i + EVAL_BATCH].to(device)).float()
        if "logits" in arrays:
            arrays["logits"][i : i + g.shape[0]] = g.cpu().numpy()
        else:
            values, idx = torch.topk(g, top_k, dim=1)
            lse = torch.logsumexp(g[:, None, :] / gammas[None, :, None], dim=2)
            arrays["topk_indices"][i : i + g.shape[0]] = idx.to(torch.int32).cpu().numpy()
            arrays["topk_logits"][i : i + g.shape[0]] = values.cpu().numpy()
            arrays["log_normalizer"][i : i + g.shape[0]] = lse.cpu().numpy()
        for arr in arrays.values():
            arr.flush()
        progress["rows_done"][name] = i + g.shape[0]
        atomic_write_json(partial / "progress.json", progress)
        if not quiet:
            print(f"cache-teacher: {name} {i + g.shape[0]}/{rows}", file=sys.stderr, end="\r")
    if not quiet:
        print(file=sys.stderr)


# ------------------------------------------------------------------------------------------ reading
@dataclass
class TeacherCache:
    """An opened teacher cache (see the module docstring); arrays are memory-mapped on first use."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path, *, verify: str = "checksum") -> TeacherCache:
        """Open the cache at ``path``; ``verify`` is "checksum" (sizes and SHA-256) or "size" (sizes only).

        Raises ``CacheError`` for a missing or incomplete cache and for a truncated or corrupted file.
        """
        path = Path(path)
        if verify not in ("checksum", "size"):
            raise ValueError(f"verify must be 'checksum' or 'size', got {verify!r}")
        mpath = path / "manifest.json"
        if not mpath.exists():
            partial = path.with_name(path.name + ".partial")
            hint = (
                f" ({partial} holds an interrupted `rkd cache-teacher`: run it again to finish)"
                if partial.exists()
                else " (write one with `rkd cache-teacher TEACHER_RUN --out CACHE`)"
            )
            what = "is not a teacher cache (no manifest.json)" if path.exists() else "does not exist"
            raise CacheError(f"teacher cache {path} {what}{hint}")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise CacheError(f"{mpath} is not valid JSON ({exc}): the cache is corrupt, make it again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
            raise CacheError(f"{mpath} is not a teacher-cache manifest (expected format {CACHE_FORMAT!r})")
        for entry in manifest["files"].values():
            fpath = path / entry["path"]
            if not fpath.exists():
                raise CacheError(f"teacher cache {path}: file {entry['path']} is missing; make the cache again")
            size = fpath.stat().st_size
            if size != entry["bytes"]:
                raise CacheError(
                    f"teacher cache {path}: {entry['path']} has {size} bytes, the manifest says {entry['bytes']} "
                    "(truncated or replaced); make the cache again"
                )
            if verify == "checksum" and file_digest(fpath) != entry["sha256"]:
                raise CacheError(
                    f"teacher cache {path}: {entry['path']} does not match its SHA-256 in the manifest (corrupted); "
                    "make the cache again"
                )
        return cls(path, manifest)

    layout = property(lambda self: self.manifest["layout"])
    k = property(lambda self: int(self.manifest["k"]))
    num_classes = property(lambda self: int(self.manifest["num_classes"]))
    temperatures = property(lambda self: tuple(float(t) for t in self.manifest["temperatures"]))
    dtype = property(lambda self: self.manifest["dtype"])

    def rows(self, split: str) -> int:
        """Number of rows of ``split`` ("train", "val" or "test")."""
        return int(self.manifest["splits"][split]["rows"])

    def array(self, split: str, name: str) -> np.ndarray:
        """The memory-mapped array ``<split>.<name>.npy`` (read-only)."""
        key = f"{split}.{name}"
        if key not in self.manifest["files"]:
            have = ", ".join(sorted(self.manifest["files"]))
            raise CacheError(f"teacher cache {self.path} has no array {key!r} (it has {have})")
        return np.load(self.path / self.manifest["files"][key]["path"], mmap_mode="r")

    def logits(self, split: str, device: torch.device | str = "cpu") -> Tensor:
        """Dense teacher scores ``g`` (N x m, float32) of ``split`` (held-out splits always; train if dense)."""
        return torch.from_numpy(np.array(self.array(split, "logits"), dtype=np.float32)).to(device)

    def temperature_index(self, gamma: float) -> int:
        """Position of ``gamma`` in the cache's temperatures; ``CacheError`` naming them if absent."""
        for i, t in enumerate(self.temperatures):
            if math.isclose(t, float(gamma), rel_tol=1e-9, abs_tol=1e-12):
                return i
        listed = ", ".join(f"{t:g}" for t in self.temperatures)
        raise CacheError(
            f"--gamma {gamma:g} is not among the temperatures of top-k teacher cache {self.path} ({listed}); "
            "make a cache with --temperatures including it (a dense cache serves any gamma)"
        )

    def topk(self, split: str, gamma: float, device: torch.device | str = "cpu") -> TopkTeacher:
        """The top-k teacher of ``split`` at temperature ``gamma`` (one of the cache's), loaded on ``device``."""
        t = self.temperature_index(gamma)
        return TopkTeacher(
            indices=torch.from_numpy(np.array(self.array(split, "topk_indices"), dtype=np.int64)).to(device),
            logits=torch.from_numpy(np.array(self.array(split, "topk_logits"), dtype=np.float32)).to(device),
            log_normalizer=torch.from_numpy(np.array(self.array(split, "log_normalizer")[:, t])).to(device),
            gamma=float(gamma),
            num_classes=self.num_classes,
        )

    def check_data(self, dataset: Dataset) -> None:
        """Refuse (``CacheError``) unless ``dataset`` has the cache's rows: same sizes, inputs and labels."""
        if dataset.num_classes != self.num_classes:
            raise CacheError(
                f"teacher cache {self.path} has m = {self.num_classes} classes, the student's data has "
                f"{dataset.num_classes}"
            )
        for name in SPLITS:
            mine = self.manifest["splits"][name]
            split = getattr(dataset, name)
            if len(split) != mine["rows"]:
                raise CacheError(
                    f"teacher cache {self.path} has {mine['rows']} {name} rows, the student's data has {len(split)}: "
                    "it was made from another data split"
                )
            for part, t in (("labels", split.y), ("inputs", split.x)):
                if tensor_digest(t) != mine[part]:
                    raise CacheError(
                        f"teacher cache {self.path}: the student's {name} {part} differ from those the cache was "
                        "made from (another data source, split seed or preprocessing)"
                    )

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse (``ConfigError``) unless the data options in ``options`` are the cache's (None = not given)."""
        made = self.manifest["data"]
        differ = [k for k in INHERITED_DATA if options.get(k) is not None and options.get(k) != made.get(k)]
        if differ:
            detail = ", ".join(f"{flag(k)} {options[k]!r} (cache: {made.get(k)!r})" for k in differ)
            raise ConfigError(
                f"--teacher-cache {self.path} was made for other data: {detail}; a student must use the data split "
                f"its cache was made from (drop {', '.join(flag(k) for k in differ)})"
            )


# --------------------------------------------------------------------------------- top-k teachers
@dataclass
class TopkTeacher:
    """Top-k teacher rows of a cache at one temperature: ``p_ij = exp(g_ij / gamma - log_normalizer_i)``."""

    indices: Tensor  # (N, k) int64
    logits: Tensor  # (N, k) float32, g_ij for j in K_i
    log_normalizer: Tensor  # (N,) float32, log sum_j exp(g_ij / gamma) over all m classes
    gamma: float
    num_classes: int

    def rows(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(indices, probs)`` of the given rows: the ``teacher_topk`` argument of ``distill_loss``."""
        probs = torch.exp(self.logits[rows] / self.gamma - self.log_normalizer[rows, None])
        return self.indices[rows], probs


def dense_target(indices: Tensor, probs: Tensor, num_classes: int, tail: str) -> Tensor:
    """The dense ``p~`` (B x m) of a top-k teacher (docs/wide_heads.md): renormalised, or a uniform tail."""
    if tail not in TOPK_TAILS:
        raise ValueError(f"topk_tail must be one of {', '.join(TOPK_TAILS)}, got {tail!r}")
    kept = probs.sum(dim=1, keepdim=True)
    k = indices.shape[1]
    if tail == "renormalize" or k == num_classes:
        out = torch.zeros(indices.shape[0], num_classes, dtype=probs.dtype, device=probs.device)
        return out.scatter_(1, indices, probs / kept if tail == "renormalize" else probs)
    rest = ((1.0 - kept) / (num_classes - k)).clamp_min(0.0)
    out = rest.expand(indices.shape[0], num_classes).clone()
    return out.scatter_(1, indices, probs)


# ------------------------------------------------------------------------------------ Python API
class TeacherCacheDataset(torch.utils.data.Dataset):
    """``(x, y, teacher)`` examples of one split with its cached teacher outputs, for a training loop.

    ``teacher`` is the row of dense scores ``g`` (m,) for a dense cache (temper it yourself:
    ``softmax(g / gamma)``), or ``(indices, probs)`` (k,) at ``gamma`` for a top-k cache, which
    ``torch.utils.data.DataLoader`` collates into the ``teacher_topk`` argument of ``distill_loss``.
    ``split`` must be the cache's own rows (its size and labels are checked).
    """

    def __init__(
        self, cache: TeacherCache | str | Path, split: Split, *, name: str = "train", gamma: float | None = None
    ):
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache.open(cache)
        if name not in SPLITS:
            raise ValueError(f"name must be one of {', '.join(SPLITS)}, got {name!r}")
        info = self.cache.manifest["splits"][name]
        if len(split) != info["rows"] or tensor_digest(split.y) != info["labels"]:
            raise CacheError(
                f"teacher cache {self.cache.path}: this {name} split is not the one the cache was made from"
            )
        self.split, self.name = split, name
        self.dense = self.cache.layout == "dense" or name != "train"
        if self.dense:
            self._logits = self.cache.array(name, "logits")
        else:
            if gamma is None:
                raise ValueError("a top-k cache needs gamma (one of its temperatures)")
            self._t = self.cache.temperature_index(gamma)
            self._idx = self.cache.array(name, "topk_indices")
            self._vals = self.cache.array(name, "topk_logits")
            self._lse = self.cache.array(name, "log_normalizer")
            self.gamma = float(gamma)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Any]:
        x, y = self.split.x[i], self.split.y[i]
        if self.dense:
            return x, y, torch.from_numpy(np.array(self._logits[i], dtype=np.float32))
        vals = torch.from_numpy(np.array(self._vals[i], dtype=np.float32))
        probs = torch.exp(vals / self.gamma - float(self._lse[i, self._t]))
        return x, y, (torch.from_numpy(np.array(self._idx[i], dtype=np.int64)), probs)


# ------------------------------------------------------------------------------ student training
def resolve_cache_config(config: Any) -> Any:
    """A ``StudentConfig`` with ``teacher_cache`` checked against its options and its blanks filled.

    The data options that are not given come from the cache (they are its teacher's); ``model auto``
    becomes the teacher's model. A given data option that differs from the cache's, or a ``teacher``
    whose ``model.pt`` is not the one the cache was made from, is refused with ``ConfigError``.
    """
    import dataclasses

    cache = TeacherCache.open(config.teacher_cache, verify="size")
    cache.check_options(config.to_dict())
    from rkd_engine.training.methods import method_class  # methods imports this module

    needs = method_class(config).needs_label_probability
    check_student_use(
        cache, method=config.method, needs_label_probability=needs, augment=None, cache_augmented=config.cache_augmented
    )
    if cache.layout == "topk":
        cache.temperature_index(config.gamma)
    made = cache.manifest["data"]
    changes: dict[str, Any] = {k: made.get(k) for k in INHERITED_DATA if getattr(config, k) is None}
    if config.teacher is not None:
        model_path = RunDir(config.teacher).model_path
        digest = file_digest(model_path) if model_path.exists() else None
        if digest != cache.manifest["teacher"]["model_digest"]:
            raise ConfigError(
                f"--teacher-cache {cache.path} was made from the teacher {cache.manifest['teacher']['run']} "
                f"({cache.manifest['teacher']['model_digest'][:19]}...), not from --teacher {config.teacher} "
                f"({'no model.pt' if digest is None else digest[:19] + '...'}): drop --teacher or make the cache again"
            )
    if config.model == "auto":
        changes["model"] = cache.manifest["teacher"]["model"]
        if not config.model_options:
            changes["model_options"] = dict(cache.manifest["teacher"].get("model_options", {}))
    return dataclasses.replace(config, **changes)


def check_student_use(
    cache: TeacherCache, *, method: str, needs_label_probability: bool, augment: dict | None, cache_augmented: bool
) -> None:
    """Refuse (``ConfigError``) the uses of a cache that would silently change the student's method
    (``needs_label_probability``: the method reads the teacher's probability of the label in every row)."""
    if augment is not None and not cache_augmented:
        raise ConfigError(
            f"--teacher-cache {cache.path} holds the teacher's outputs on un-augmented inputs, but augmentation is "
            f"on ({augment}): pass --augment off, or --cache-augmented to distil every augmented view towards the "
            "teacher's outputs on the un-augmented image (this changes the method)"
        )
    if cache.layout == "topk" and needs_label_probability:
        raise ConfigError(
            f"--method {method} needs the teacher's probability of the label in every row, which a top-k cache "
            f"(k = {cache.k} of m = {cache.num_classes}) does not hold: use a dense cache"
        )


@torch.no_grad()
def topk_target_mass(
    teacher: TopkTeacher, labels: Tensor, *, tail: str, teacher_weight: float = 1.0, chunk: int = 4096
) -> Tensor:
    """``mass_j = sum_i q_ij`` of ``q = (1 - a) e_y + a p~`` over all rows (the student's ``pi_t = mass / n``)."""
    m = teacher.num_classes
    mass = torch.zeros(m, dtype=torch.float64, device=labels.device)
    for i in range(0, labels.shape[0], chunk):
        rows = torch.arange(i, min(i + chunk, labels.shape[0]), device=labels.device)
        target = dense_target(*teacher.rows(rows), m, tail)
        mass += teacher_weight * target.sum(0).double()
        if teacher_weight < 1:
            mass += (1 - teacher_weight) * torch.bincount(labels[rows], minlength=m).double()
    return mass.float()
