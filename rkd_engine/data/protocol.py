"""The data protocol of docs/protocol.md: long-tailed training sets, balanced held-out sets.

A training set is long-tailed with the exponential profile ``n_y = n_max * rho^(-y/(m-1))`` (class 0
the head, imbalance ratio ``rho = n_0 / n_{m-1}``); the validation and test sets are balanced and
disjoint from it and from each other. Every draw is fixed by one seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rkd_engine.errors import DataError


def check_imbalance(imbalance: float) -> float:
    """``imbalance`` as a float, or a TypeError/ValueError unless it is a finite number ``rho >= 1``."""
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)):
        raise TypeError(f"imbalance must be a number >= 1, got {type(imbalance).__name__}")
    if not math.isfinite(imbalance) or imbalance < 1:
        raise ValueError(f"imbalance (rho = n_0 / n_(m-1)) must be a finite number >= 1, got {imbalance}")
    return float(imbalance)


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Per-class training sizes ``n_y = floor(n_max * rho^(-y/(m-1)))``, at least 1, for ``y = 0..m-1``.

    ``imbalance`` is ``rho >= 1`` (1 gives a balanced set of ``n_max`` per class); with ``m == 1`` the
    single class gets ``n_max``.
    """
    if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1:
        raise ValueError(f"n_max must be an integer >= 1, got {n_max!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    check_imbalance(imbalance)
    if num_classes == 1:
        return [n_max]
    # round() first so that e.g. 100 * 10^-1 = 9.999999999999998 counts as 10.
    rho = float(imbalance)
    return [max(1, math.floor(round(n_max * rho ** (-y / (num_classes - 1)), 9))) for y in range(num_classes)]


class LazyRows:
    """Inputs read on access (a ``Split.x`` not held in memory, e.g. the images of a folder).

    ``x[key]`` (an int, a slice, a list or an index tensor) gives those rows as a float32 tensor on
    ``device``, as indexing a tensor would. Subclasses define ``shape``, ``__getitem__``, ``to(device)``,
    ``digest()`` (a ``sha256:`` key of what the rows hold), ``moments()`` (per-channel mean and inverse
    deviation of the raw rows, for ``standardise_``), ``standardise_by_(reference)`` and ``check()``
    (a cheap test that every row can be read).
    """

    dtype = torch.float32
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]


@dataclass
class Split:
    """One split of a data set: inputs ``x`` (float32, ``N x features`` or ``N x C x H x W``), labels ``y`` (int64).

    ``x`` is a tensor, or ``LazyRows`` read on access (image folders).
    """

    x: Tensor | LazyRows
    y: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.x, (Tensor, LazyRows)) or not isinstance(self.y, Tensor):
            raise TypeError("Split.x and Split.y must be torch.Tensors (Split.x may be LazyRows)")
        if self.x.dtype != torch.float32:
            raise TypeError(f"Split.x must be float32, got {self.x.dtype}")
        if self.y.dtype != torch.int64 or self.y.ndim != 1:
            raise TypeError(f"Split.y must be a 1-D int64 tensor, got {self.y.dtype} of shape {tuple(self.y.shape)}")
        if self.x.ndim < 2 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"Split.x must be (N, ...) with N = len(y) = {self.y.shape[0]}, got shape {tuple(self.x.shape)}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> Split:
        """This split on ``device``."""
        return Split(self.x.to(device), self.y.to(device))

    def class_counts(self, num_classes: int) -> Tensor:
        """Number of examples of each class, int64 ``(m,)``."""
        return torch.bincount(self.y, minlength=num_classes)


@dataclass
class Dataset:
    """A long-tailed training split and balanced, disjoint validation and test splits (docs/protocol.md)."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    train: Split
    val: Split
    test: Split
    is_image: bool

    @property
    def train_prior(self) -> Tensor:
        """The label prior ``pi`` of the training split: class frequencies, float32 ``(m,)``."""
        counts = self.train.class_counts(self.num_classes).to(torch.float32)
        return counts / counts.sum().clamp_min(1.0)

    def to(self, device: torch.device | str) -> Dataset:
        """This data set with every split on ``device``."""
        return Dataset(
            self.name,
            self.num_classes,
            self.input_shape,
            self.train.to(device),
            self.val.to(device),
            self.test.to(device),
            self.is_image,
        )

    def describe(self) -> dict:
        """A JSON-serialisable summary: sizes, per-class training counts and the realised imbalance ratio."""
        counts = self.train.class_counts(self.num_classes).tolist()
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "is_image": self.is_image,
            "train_size": len(self.train),
            "val_size": len(self.val),
            "test_size": len(self.test),
            "train_counts": counts,
            "realised_imbalance": max(counts) / max(1, min(counts)),
        }


def check_seed(seed: int) -> int:
    """``seed``, or a TypeError unless it is an int."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return seed


def _class_indices(y: Tensor, num_classes: int) -> list[Tensor]:
    """Indices of the examples of each class, in data order."""
    order = torch.argsort(y, stable=True)
    counts = torch.bincount(y, minlength=num_classes).tolist()
    return list(torch.split(order, counts))


def split_indices(
    y: Tensor,
    num_classes: int,
    *,
    imbalance: float,
    seed: int,
    val_per_class: int,
    test_per_class: int | None,
    y_test: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Indices of the training, validation and test rows, each in a random order.

    Balanced held-out sets are drawn per class first. Without ``y_test``, ``val_per_class`` and then
    ``test_per_class`` rows of each class are drawn at random from ``y``. With ``y_test`` (an official
    test set) validation is carved from ``y`` and the test indices select ``test_per_class`` rows per
    class of ``y_test`` (default: the size of its smallest class, i.e. all of an already balanced set).
    The training set takes ``long_tail_counts(n_max, m, imbalance)[c]`` of the remaining rows of class
    ``c``, ``n_max`` being the smallest number remaining, so every class fills its quota. Fixed by ``seed``.
    """
    check_seed(seed)
    if val_per_class is None:
        raise ValueError("val_per_class is required")
    if test_per_class is None and y_test is None:
        raise ValueError("test_per_class is required without an official test set (y_test)")
    for name, value in (("val_per_class", val_per_class), ("test_per_class", test_per_class)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    gen = torch.Generator().manual_seed(seed)
    pool = _class_indices(y, num_classes)
    held_out = val_per_class + (test_per_class if y_test is None else 0)
    for c, idx in enumerate(pool):
        if idx.numel() <= held_out:
            what = "val_per_class" if y_test is not None else "val_per_class + test_per_class"
            raise DataError(
                f"class {c} has {idx.numel()} examples but {what} = {held_out} leaves none for training: "
                "pass smaller val_per_class/test_per_class"
            )
    val_idx, test_idx, rest = [], [], []
    for idx in pool:
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        val_idx.append(idx[:val_per_class])
        test_idx.append(idx[val_per_class:held_out])
        rest.append(idx[held_out:])
    quota = long_tail_counts(min(r.numel() for r in rest), num_classes, imbalance)
    train_idx = torch.cat([r[:n] for r, n in zip(rest, quota, strict=True)])
    if y_test is not None:
        test_pool = _class_indices(y_test, num_classes)
        smallest = min(idx.numel() for idx in test_pool)
        if smallest == 0:
            empty = [c for c, idx in enumerate(test_pool) if idx.numel() == 0]
            raise DataError(f"the test set has no example of classes {empty}; a balanced test set needs every class")
        per_class = smallest if test_per_class is None else test_per_class
        if per_class > smallest:
            raise DataError(f"test_per_class = {per_class} but the test set's smallest class has {smallest} examples")
        test_idx = [idx[torch.randperm(idx.numel(), generator=gen)[:per_class]] for idx in test_pool]
    return tuple(
        idx[torch.randperm(idx.numel(), generator=gen)] for idx in (train_idx, torch.cat(val_idx), torch.cat(test_idx))
    )


def standardise_(train: Split, *others: Split, is_image: bool) -> None:
    """Standardise every split in place with the training split's mean and standard deviation.

    Images use one mean and deviation per channel, feature vectors one per feature; a constant
    channel or feature (deviation below 1e-6) is only centred. The splits must own their ``x``.
    ``LazyRows`` are standardised on access: one streaming pass over the training rows computes the
    statistics (an unreadable training row is reported here), and the other splits' rows are checked.
    """
    if isinstance(train.x, LazyRows):
        train.x.moments()
        for split in others:
            split.x.check()
        for split in (train, *others):
            split.x.standardise_by_(train.x)
        return
    dims = (0, 2, 3) if is_image and train.x.ndim == 4 else (0,)
    var, mean = torch.var_mean(train.x, dim=dims, correction=0, keepdim=True)
    std = var.sqrt()
    inv_std = torch.where(std < 1e-6, torch.ones_like(std), std).reciprocal()
    for split in (train, *others):
        split.x.sub_(mean).mul_(inv_std)
