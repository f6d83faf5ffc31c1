"""Image folders: the data source ``folder:DIR`` (PNG and JPEG decoded with Pillow; no torchvision).

Layouts: ``DIR/<class>/<image>`` (validation and test carved from it), or ``DIR/train/<class>/...``
and ``DIR/test/<class>/...`` (``test/`` is the official test set). Class indices follow the sorted
class-folder names. Options after a comma: ``folder:DIR,size=32,channels=3`` (``size`` N or HxW, the
size every image is resized to; ``channels`` 3 for RGB or 1 for grey).

Scanning reads only file names, and nothing is held in memory: ``ImageFolder[rows]`` decodes just
the rows asked for, and a split of the protocol of docs/protocol.md is ``ImageRows`` (paths and labels;
each access decodes its rows, with no cache). ``load_dataset`` makes one streaming pass over the
training images for the standardisation statistics and reads the headers of the validation and test
images, so an unreadable or corrupt image is reported, with its path, before training starts.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rkd_engine.data.protocol import LazyRows

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_SIZE = 32
_MAX_LISTED_ERRORS = 5
_MOMENT_CHUNK = 256  # images decoded at a time by the statistics pass


def _parse_size(value: str) -> tuple[int, int]:
    parts = value.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes, default=0) < 1:
        raise ValueError(f"folder option size must be N or HxW with positive integers, got {value!r}")
    return (sizes[0], sizes[-1])


def parse_folder_spec(arg: str) -> tuple[Path, tuple[int, int], int]:
    """``DIR[,size=N|HxW][,channels=1|3]`` -> (folder, (H, W), channels)."""
    size, channels = (DEFAULT_SIZE, DEFAULT_SIZE), 3
    path, options = arg, []
    while True:
        head, comma, tail = path.rpartition(",")
        if not comma or "=" not in tail or tail.split("=", 1)[0].strip() not in ("size", "channels"):
            break
        path = head
        options.append(tail)
    for item in options:
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key == "size":
            size = _parse_size(value)
        elif value not in ("1", "3"):
            raise ValueError(f"folder option channels must be 1 (grey) or 3 (RGB), got {value!r}")
        else:
            channels = int(value)
    if not path.strip():
        raise ValueError("the folder source needs a folder: 'folder:DIR'")
    return Path(path.strip()).expanduser(), size, channels


class ImageFolder:
    """The images under one folder, one sub-folder per class, decoded on demand.

    ``images[rows]`` (an index tensor, list or slice) is a uint8 tensor ``(len(rows), C, H, W)``;
    ``labels`` is int64 ``(N,)``; ``shape`` is ``(N, C, H, W)``. Also a map-style dataset:
    ``images.item(i)`` is ``(x, y)`` with ``x`` float32 in [0, 1], for a ``DataLoader``.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        size: tuple[int, int] = (DEFAULT_SIZE, DEFAULT_SIZE),
        channels: int = 3,
        classes: Sequence[str] | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"folder:{root}: no such folder")
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            classes = found
        else:
            extra = sorted(set(found) - set(classes))
            if extra:
                raise ValueError(f"folder:{root}: class folder(s) {extra} are not among the training classes")
        if not classes:
            raise ValueError(f"folder:{root}: expected one sub-folder per class, found none")
        self.root = root
        self.classes = list(classes)
        self.size = (int(size[0]), int(size[1]))
        self.channels = int(channels)
        paths: list[Path] = []
        labels: list[int] = []
        for index, name in enumerate(self.classes):
            folder = root / name
            files = (
                sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
                if folder.is_dir()
                else []
            )
            paths += files
            labels += [index] * len(files)
        if not paths:
            raise ValueError(f"folder:{root}: no PNG or JPEG images in its class folders")
        self.paths = paths
        self.labels = torch.tensor(labels, dtype=torch.int64)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.channels, *self.size)

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB" if self.channels == 3 else "L")
            image = image.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
            array = np.array(image, dtype=np.uint8)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def __getitem__(self, rows: Tensor | Sequence[int] | slice) -> Tensor:
        if isinstance(rows, slice):
            indices = range(len(self))[rows]
        elif isinstance(rows, Tensor):
            indices = rows.reshape(-1).tolist()
        else:
            indices = list(rows)
        out = torch.empty((len(indices), *self.shape[1:]), dtype=torch.uint8)
        errors = []
        for k, i in enumerate(indices):
            path = self.paths[i]
            try:
                out[k] = torch.from_numpy(self._decode(path))
            except Exception as exc:  # Pillow raises many kinds (OSError, SyntaxError, ValueError...)
                errors.append(f"{path} ({type(exc).__name__}: {exc})")
        self._raise_unreadable(errors)
        return out

    def _raise_unreadable(self, errors: list[str]) -> None:
        if errors:
            listed = "; ".join(errors[:_MAX_LISTED_ERRORS])
            more = f"; and {len(errors) - _MAX_LISTED_ERRORS} more" if len(errors) > _MAX_LISTED_ERRORS else ""
            raise ValueError(f"folder:{self.root}: cannot read {len(errors)} image(s): {listed}{more}")

    def check(self, indices: Sequence[int]) -> None:
        """Open images ``indices`` and read their headers (no pixel is decoded); unreadable ones are reported."""
        from PIL import Image

        errors = []
        for i in indices:
            path = self.paths[i]
            try:
                with Image.open(path) as image:
                    image.size  # noqa: B018 - the header is parsed by open; size is its first field
            except Exception as exc:
                errors.append(f"{path} ({type(exc).__name__}: {exc})")
        self._raise_unreadable(errors)

    def rows(self, indices: Tensor, *, scale: float = 1.0 / 255.0) -> ImageRows:
        """Rows ``indices`` as ``ImageRows``: read on access, float32 pixels times ``scale``."""
        return ImageRows(self, indices, scale=scale)

    def item(self, i: int) -> tuple[Tensor, int]:
        """Image ``i`` as float32 ``(C, H, W)`` in [0, 1] and its label."""
        return self[[i]][0].float().div_(255.0), int(self.labels[i])


class ImageRows(LazyRows):
    """Some rows of an ``ImageFolder`` as the ``x`` of a ``Split``: decoded on every access, never kept.

    ``rows[key]`` (int, slice, list or index tensor) is float32 ``(len, C, H, W)`` (``(C, H, W)`` for an
    int) on ``device``: the pixels times ``scale``, standardised with the per-channel statistics of
    the reference rows (``standardise_by_``; the training split's) once those are set.
    """

    def __init__(
        self, images: ImageFolder, indices: Tensor, *, scale: float = 1.0 / 255.0, device: str = "cpu"
    ) -> None:
        self.images = images
        self.indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu()
        self.scale = float(scale)
        self.device = torch.device(device)
        self.shape = (int(self.indices.numel()), images.channels, *images.size)
        self.reference: ImageRows | None = None
        self._moments: tuple[Tensor, Tensor] | None = None

    def _raw(self, positions: Sequence[int]) -> Tensor:
        return self.images[self.indices[list(positions)]].to(torch.float32).mul_(self.scale)

    def __getitem__(self, key: int | slice | Sequence[int] | Tensor) -> Tensor:
        n = self.shape[0]
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if not -n <= key < n:
                raise IndexError(f"row {key} is out of range for {n} rows")
            return self[[int(key) % n]][0]
        if isinstance(key, slice):
            positions = list(range(n)[key])
        elif isinstance(key, Tensor):
            key = key.reshape(-1).cpu()
            positions = (key.nonzero().flatten() if key.dtype == torch.bool else key).tolist()
        else:
            positions = list(key)
        x = self._raw(positions)
        if self.reference is not None:
            mean, inv_std = self.reference.moments()
            x.sub_(mean).mul_(inv_std)
        return x.to(self.device)

    def to(self, device: torch.device | str) -> ImageRows:
        """These rows, delivered on ``device``."""
        moved = copy.copy(self)
        moved.device = torch.device(device)
        return moved

    def moments(self) -> tuple[Tensor, Tensor]:
        """Per-channel mean and inverse deviation ``(1, C, 1, 1)`` of the raw rows (one streaming pass, kept)."""
        if self._moments is None:
            total = torch.zeros(self.shape[1], dtype=torch.float64)
            squares = torch.zeros_like(total)
            for start in range(0, self.shape[0], _MOMENT_CHUNK):
                x = self._raw(range(start, min(start + _MOMENT_CHUNK, self.shape[0]))).to(torch.float64)
                total += x.sum(dim=(0, 2, 3))
                squares += x.square().sum(dim=(0, 2, 3))
            count = max(1, self.shape[0] * self.shape[2] * self.shape[3])
            mean = total / count
            std = (squares / count - mean.square()).clamp_min(0.0).sqrt()
            inv_std = torch.where(std < 1e-6, torch.ones_like(std), std).reciprocal()
            self._moments = (mean.float().view(1, -1, 1, 1), inv_std.float().view(1, -1, 1, 1))
        return self._moments

    def standardise_by_(self, reference: ImageRows) -> None:
        """Standardise every row read from now on with ``reference.moments()``."""
        self.reference = reference

    def check(self) -> None:
        """Read every row's header (no decoding); unreadable images are reported with their paths."""
        self.images.check(self.indices.tolist())

    def digest(self) -> str:
        """``sha256:`` of the rows' file names and bytes, the size, the channels, the scale and the reference rows
        (the same for copies on any device and for another load of the same folder)."""
        h = hashlib.sha256(f"folder:{self.shape}:{self.scale}".encode())
        for i in self.indices.tolist():
            path = self.images.paths[i]
            h.update(str(path.relative_to(self.images.root)).encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
        if self.reference is not None:  # which rows' statistics (their bytes are in the training split's key)
            h.update(b"standardised by rows " + self.reference.indices.numpy().tobytes())
        return "sha256:" + h.hexdigest()


def load_folder(arg: str) -> tuple[ImageFolder, Tensor, int, tuple[ImageFolder, Tensor] | None]:
    """``folder:ARG`` -> (images, labels, m, official test or None)."""
    root, size, channels = parse_folder_spec(arg)
    if not root.is_dir():
        raise ValueError(f"folder:{root}: no such folder")
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        train = ImageFolder(train_dir, size=size, channels=channels)
        test = ImageFolder(test_dir, size=size, channels=channels, classes=train.classes)
        official = (test, test.labels)
    else:
        train = ImageFolder(root, size=size, channels=channels)
        official = None
    return train, train.labels, len(train.classes), official
