"""Data sources behind ``load_dataset``: ``digits``, ``synthetic``, ``npz:PATH``, ``cifar10:DIR``, ``cifar100:DIR``."""

from __future__ import annotations

import hashlib
import math
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from rkd_engine.data.defaults import DEFAULT_IMBALANCE
from rkd_engine.data.folder import ImageFolder, ImageRows, load_folder
from rkd_engine.data.protocol import Dataset, Split, check_imbalance, check_seed, split_indices, standardise_
from rkd_engine.errors import DataError, DataNotFoundError

SOURCES: tuple[str, ...] = (
    "digits",
    "synthetic",
    "npz:PATH",
    "cifar10:DIR",
    "cifar100:DIR",
    "folder:DIR",
)

# Default options of the synthetic Gaussian mixture; see ``_synthetic``.
SYNTHETIC_DEFAULTS: dict[str, float | int] = {
    "m": 10,
    "d": 20,
    "n": 500,
    "sep": 3.0,
    "data_seed": 0,
}

_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
        "labels": b"labels",
        "num_classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ("train",),
        "test": ("test",),
        "labels": b"fine_labels",
        "num_classes": 100,
    },
}


def load_dataset(
    spec: str,
    *,
    imbalance: float = DEFAULT_IMBALANCE,
    seed: int = 0,
    val_per_class: int | None = None,
    test_per_class: int | None = None,
) -> Dataset:
    """Load a data set and split it by the protocol of docs/protocol.md.

    ``spec`` is one of
      - ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as ``1 x 8 x 8`` images
        scaled to [0, 1]; default 30 validation and 30 test images per class;
      - ``synthetic`` or ``synthetic:m=10,d=20,n=500,sep=3,data_seed=0``: a mixture of ``m`` unit-variance
        Gaussians in ``d`` dimensions whose means (drawn with ``data_seed``) lie ``sep`` apart on average,
        ``n`` points per class; default ``n // 5`` validation and test points per class;
      - ``npz:PATH``: arrays ``x`` (``N x features``, ``N x H x W`` or ``N x C x H x W``) and ``y`` (``N``
        integer labels ``0..m-1``), optionally ``x_test``/``y_test`` as an official test set; default 10%
        of the smallest class for validation and for test;
      - ``cifar10:DIR``, ``cifar100:DIR``: the python-pickle CIFAR folders (``DIR`` is the folder holding
        ``data_batch_1..5`` and ``test_batch``, or ``train`` and ``test`` for CIFAR-100, or its parent).
        The official test batch is the test set; validation (default 10% of the smallest class: 500 per
        class for CIFAR-10, 50 for CIFAR-100) is carved from the training batches;
      - ``folder:DIR[,size=32][,channels=3]``: PNG/JPEG images, one sub-folder per class (or ``train/``
        and ``test/`` folders of class folders), resized to ``size``; only the chosen rows are decoded
        (``rkd_engine.data.folder``); default 10% of the smallest class for validation (and test).

    Balanced, disjoint validation and test sets are drawn per class first; the training set takes
    ``long_tail_counts(n_max, m, imbalance)`` of the remaining examples (class 0 the head, ``n_max`` the
    smallest remaining class size). Every split is standardised with the training split's statistics
    (per channel for images, per feature otherwise). Everything is fixed by ``seed``.
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string such as 'digits', got {type(spec).__name__}")
    check_imbalance(imbalance)
    check_seed(seed)
    raw = _read_source(spec, seed)
    x, y, m, official_test = raw.x, raw.y, raw.m, raw.official_test
    x_test, y_test = official_test if official_test is not None else (x, y)
    train_idx, val_idx, test_idx = split_indices(
        y,
        m,
        imbalance=imbalance,
        seed=seed,
        val_per_class=raw.default[0] if val_per_class is None else val_per_class,
        test_per_class=raw.default[1] if test_per_class is None else test_per_class,
        y_test=None if official_test is None else y_test,
    )
    # Inputs stay in their stored dtype (uint8 for CIFAR) until the rows are chosen.
    train, val, test = (
        Split(_take(xs, idx, raw.scale), ys[idx])
        for xs, ys, idx in ((x, y, train_idx), (x, y, val_idx), (x_test, y_test, test_idx))
    )
    standardise_(train, val, test, is_image=raw.is_image)
    return Dataset(raw.name, m, tuple(x.shape[1:]), train, val, test, raw.is_image)


class _Raw(NamedTuple):
    """A source's examples before the protocol splits them."""

    name: str
    x: Tensor  # in its stored dtype (uint8 for CIFAR); a folder source decodes only the rows taken from it
    y: Tensor
    m: int
    official_test: tuple[Tensor, Tensor] | None  # (x, y) of an official test set, else None
    is_image: bool
    default: tuple[int, int | None]  # validation and test examples per class (None: the official test set)
    scale: float = 1.0  # multiplies the stored inputs (CIFAR: uint8 pixels to [0, 1])


def _tenth(y: Tensor, m: int) -> int:
    """10% of the smallest class (at least 1): the default validation and test size of a file source."""
    return max(1, int(torch.bincount(y, minlength=m).min()) // 10)


def _read_source(spec: str, seed: int) -> _Raw:
    """The examples of the source ``spec`` names (see ``load_dataset``); ``seed`` draws synthetic data."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits":
        if arg:
            raise DataError(f"the digits source takes no argument, got {spec!r}")
        x, y, m = _digits()
        return _Raw("digits", x, y, m, None, True, (30, 30))
    if kind == "synthetic":
        x, y, m, n = _synthetic(arg, seed)
        return _Raw("synthetic", x, y, m, None, False, (max(1, n // 5), max(1, n // 5)))
    if kind == "npz":
        if not arg:
            raise DataError("the npz source needs a path: 'npz:PATH'")
        x, y, m, official_test = _npz(Path(arg).expanduser())
        default = (_tenth(y, m), None if official_test is not None else _tenth(y, m))
        return _Raw("npz", x, y, m, official_test, x.ndim == 4, default)
    if kind in _CIFAR:
        if not arg:
            raise DataError(f"the {kind} source needs a folder: '{kind}:DIR'")
        x, y, official_test = _cifar(kind, Path(arg).expanduser())
        m = _CIFAR[kind]["num_classes"]
        return _Raw(kind, x, y, m, official_test, True, (_tenth(y, m), None), scale=1.0 / 255.0)
    if kind == "folder":
        if not arg:
            raise ValueError("the folder source needs a folder: 'folder:DIR'")
        x, y, m, official_test = load_folder(arg)  # x decodes only the rows chosen by the split
        default = (_tenth(y, m), None if official_test is not None else _tenth(y, m))
        return _Raw("folder", x, y, m, official_test, True, default, scale=1.0 / 255.0)
    raise DataError(f"unknown data source {spec!r}; expected one of {', '.join(SOURCES)}")


def _take(x: Tensor | ImageFolder, idx: Tensor, scale: float) -> Tensor | ImageRows:
    """Rows ``idx`` of ``x`` as float32 times ``scale``; an image folder's stay on disk, read on access."""
    return x.rows(idx, scale=scale) if isinstance(x, ImageFolder) else _to_float(x[idx], scale)


def _to_float(x: Tensor, scale: float) -> Tensor:
    x = x.to(torch.float32)
    return x.mul_(scale) if scale != 1.0 else x


def _digits() -> tuple[Tensor, Tensor, int]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return x, y, 10


def _parse_options(arg: str, defaults: dict[str, float | int], source: str) -> dict[str, float | int]:
    options = dict(defaults)
    for item in filter(None, (part.strip() for part in arg.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in defaults:
            raise DataError(f"bad {source} option {item!r}: expected key=value with key one of {', '.join(defaults)}")
        kind = type(defaults[key])
        try:
            options[key] = kind(value) if kind is float else int(value)
        except ValueError:
            raise DataError(f"{source} option {key} must be {kind.__name__}, got {value!r}") from None
    return options


def _synthetic(arg: str, seed: int) -> tuple[Tensor, Tensor, int, int]:
    """``n`` points per class of ``x ~ N(mu_y, I_d)``, ``mu_y ~ N(0, s^2 I_d)`` with ``s = sep / sqrt(2 d)``.

    ``E ||mu_a - mu_b|| ~= sep``. The means depend on ``data_seed`` only, the sample on ``seed`` too, so
    several seeds draw different samples of one distribution.
    """
    opts = _parse_options(arg, SYNTHETIC_DEFAULTS, "synthetic")
    m, d, n, sep = int(opts["m"]), int(opts["d"]), int(opts["n"]), float(opts["sep"])
    if m < 1 or d < 1 or n < 3:
        raise DataError(f"synthetic needs m >= 1, d >= 1 and n >= 3, got m={m}, d={d}, n={n}")
    if not math.isfinite(sep) or sep < 0:
        raise DataError(f"synthetic option sep must be a finite number >= 0, got {sep}")
    means = torch.randn(
        m,
        d,
        generator=torch.Generator().manual_seed(int(opts["data_seed"])),
        dtype=torch.float64,
    )
    means = means * (sep / math.sqrt(2 * d))
    gen = torch.Generator().manual_seed(1_000_003 * int(opts["data_seed"]) + seed)
    y = torch.arange(m).repeat_interleave(n)
    x = means[y] + torch.randn(m * n, d, generator=gen, dtype=torch.float64)
    return x.to(torch.float32), y, m, n


def _check_arrays(x: np.ndarray, y: np.ndarray, where: str, xname: str, yname: str) -> tuple[Tensor, Tensor]:
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: {yname} must hold integer labels, got dtype {y.dtype}")
    if y.ndim != 1:
        raise DataError(f"{where}: {yname} must be 1-D (N,), got shape {y.shape}")
    if x.ndim not in (2, 3, 4) or x.shape[0] != y.shape[0]:
        raise DataError(
            f"{where}: {xname} must be (N, features), (N, H, W) or (N, C, H, W) with N = len({yname}) = "
            f"{y.shape[0]}, got shape {x.shape}"
        )
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{where}: {xname} must be numeric, got dtype {x.dtype}")
    if y.size == 0:
        raise DataError(f"{where}: {yname} is empty")
    if y.min() < 0:
        raise DataError(f"{where}: {yname} must be labels 0..m-1, found {y.min()}")
    if x.dtype in (np.uint8, np.int8, np.int16, np.int32, np.int64):
        xt = torch.from_numpy(np.ascontiguousarray(x))  # kept compact; made float32 once the rows are chosen
    else:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if not torch.isfinite(xt).all():
            raise DataError(f"{where}: {xname} contains NaN or infinite values")
    if x.ndim == 3:
        xt = xt.unsqueeze(1)
    return xt, torch.from_numpy(y.astype(np.int64))


def _classes_without_examples(counts: Tensor) -> str:
    """``classes [3, 7] have no example`` (at most the first 10 listed)."""
    empty = torch.nonzero(counts == 0).flatten()
    shown = empty[:10].tolist()
    more = f" and {empty.numel() - 10} more" if empty.numel() > 10 else ""
    return f"classes {shown}{more} have no example"


def data_fingerprint(spec: str) -> str | None:
    """SHA-256 of the files behind a data source (``npz:PATH``, ``cifar10:DIR``, ``cifar100:DIR``).

    ``None`` for the built-in sources (``digits``, ``synthetic``), which are generated, or when the
    files cannot be found (``load_dataset`` reports that). A run stores it so that a replaced file is
    noticed by resume, students and ``rkd eval``.
    """
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "npz" and arg:
        files = [Path(arg).expanduser()]
    elif kind in _CIFAR and arg:
        root = Path(arg).expanduser()
        info = _CIFAR[kind]
        if (root / info["folder"]).is_dir():
            root = root / info["folder"]
        files = [root / n for n in info["train"] + info["test"]]
    else:
        return None
    digest = hashlib.sha256()
    for file in files:
        try:
            with open(file, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError:
            return None
    return digest.hexdigest()


def _npz(path: Path) -> tuple[Tensor, Tensor, int, tuple[Tensor, Tensor] | None]:
    if not path.is_file():
        raise DataNotFoundError(f"npz data file not found: {path}")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"{path} is not a readable .npz file ({type(err).__name__}: {err})") from None
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path} is a single .npy array, not an .npz archive: save it with np.savez(path, x=..., y=...)"
        )
    with arrays:
        missing = [k for k in ("x", "y") if k not in arrays.files]
        if missing:
            raise DataError(f"{path} lacks the array(s) {missing}; it holds {arrays.files[:20]} (need 'x' and 'y')")
        has_test = "x_test" in arrays.files or "y_test" in arrays.files
        if has_test and not ("x_test" in arrays.files and "y_test" in arrays.files):
            raise DataError(f"{path} holds only one of 'x_test' and 'y_test'; give both or neither")
        try:
            loaded = {k: arrays[k] for k in ("x", "y", "x_test", "y_test") if k in arrays.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            # object arrays (which need pickle), or a truncated or damaged archive member
            reason = (
                "it holds object arrays, which cannot be read without pickle: save numeric arrays"
                if "allow_pickle" in str(err)
                else "it is truncated or damaged"
            )
            raise DataError(
                f"{path}: cannot read its arrays ({type(err).__name__}: {str(err)[:200]}); {reason}"
            ) from None
    x, y = _check_arrays(loaded["x"], loaded["y"], str(path), "x", "y")
    test = _check_arrays(loaded["x_test"], loaded["y_test"], str(path), "x_test", "y_test") if has_test else None
    m = int(y.max()) + 1
    if m > y.numel():  # before bincount: a label of 10^12 would allocate terabytes
        raise DataError(
            f"{path}: labels must cover every class 0..m-1, but the largest label is {m - 1} and there are only "
            f"{y.numel()} examples"
        )
    counts = torch.bincount(y, minlength=m)
    if (counts == 0).any():
        raise DataError(f"{path}: labels must cover every class 0..{m - 1}; {_classes_without_examples(counts)}")
    if test is not None:
        if test[0].shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: x_test has example shape {tuple(test[0].shape[1:])}, x has {tuple(x.shape[1:])}")
        if int(test[1].max()) >= m:
            raise DataError(f"{path}: y_test holds label {int(test[1].max())} but y has only classes 0..{m - 1}")
    return x, y, m, test


# The only globals a CIFAR batch refers to (numpy arrays; protocol-2 bytes of Python 3).
_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _ArrayUnpickler(pickle.Unpickler):
    """Loads the CIFAR pickles (dicts, lists, numpy arrays) and refuses every other global: no code runs."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays")
        if module.startswith("numpy") and module.endswith("multiarray"):
            try:
                from numpy._core import multiarray
            except ImportError:  # numpy < 2
                from numpy.core import multiarray
            return getattr(multiarray, name)
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[Tensor, Tensor]:
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
    ) as err:
        raise DataError(f"{path} is not a CIFAR python-pickle batch: {err}") from err
    if not isinstance(batch, dict):  # bad file content, not a bad argument type
        raise DataError(f"{path} is not a CIFAR batch: expected a dict, got {type(batch).__name__}")
    batch = {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
    missing = [k.decode() for k in (b"data", label_key) if k not in batch]
    if missing:
        raise DataError(f"{path} lacks the key(s) {missing}; it holds {sorted(k.decode() for k in batch)}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be a uint8 array (N, 3072), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {label_key.decode()!r} must be {data.shape[0]} integer labels, got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32))  # uint8; scaled once the rows are chosen
    return x, torch.from_numpy(labels.astype(np.int64))


def _cifar(kind: str, root: Path) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    info = _CIFAR[kind]
    if not root.is_dir():
        raise DataNotFoundError(f"{kind} folder not found: {root}")
    if (root / info["folder"]).is_dir():
        root = root / info["folder"]
    names = info["train"] + info["test"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise DataNotFoundError(
            f"{kind} folder {root} lacks {', '.join(missing)} (expected the python-pickle files {', '.join(names)})"
        )
    parts = [_read_cifar_batch(root / n, info["labels"], info["num_classes"]) for n in names]
    k = len(info["train"])
    x = torch.cat([p[0] for p in parts[:k]])
    y = torch.cat([p[1] for p in parts[:k]])
    counts = torch.bincount(y, minlength=info["num_classes"])
    if (counts == 0).any():
        raise DataError(f"{kind} training batches in {root}: {_classes_without_examples(counts)}")
    return x, y, (parts[k][0], parts[k][1])
