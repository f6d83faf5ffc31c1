"""Image augmentation in plain torch: random crop with zero padding and horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rkd_engine.data.protocol import Dataset

# Sources whose images are natural photographs, where crops and mirror images keep the label.
_FLIP_INVARIANT = ("cifar10", "cifar100")


def augment_images(x: Tensor, generator: torch.Generator, *, pad: int, flip: bool) -> Tensor:
    """Randomly crop each image of ``x`` (``N x C x H x W``) from its ``pad``-zero-padded version and mirror it.

    Row ``i`` is shifted by offsets drawn uniformly from ``[-pad, pad]`` in each direction and, when
    ``flip``, mirrored left-right with probability 1/2. One gather for the whole batch, on ``x``'s device;
    the random draws come from ``generator`` (on its own device), so the result is a function of the
    generator's state. Returns ``x`` itself when ``pad == 0`` and not ``flip``.
    """
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"x must be an image batch (N, C, H, W), got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be an integer >= 0, got {pad!r}")
    n, _, h, w = x.shape
    if n == 0 or (pad == 0 and not flip):
        return x
    gdev = generator.device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if flip:
        mirrored = (torch.rand(n, generator=generator, device=gdev) < 0.5).to(x.device)
        cols = torch.where(mirrored[:, None], w - 1 - cols, cols)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H) rows of the padded image
    cols = dx[:, None] + cols  # (N, W) columns of the padded image, mirrored where drawn
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def default_augmentation(dataset: Dataset) -> dict | None:
    """The augmentation a source is trained with, as ``augment_images`` keywords, or None for none.

    CIFAR: ``{"pad": 4, "flip": True}`` (He et al. 2016). Digits: None (8x8 digits are neither
    translation- nor mirror-invariant at that size). Other sources (synthetic, npz): None, since nothing
    is known about their invariances. None means a model sees identical inputs every epoch, so teacher
    outputs may be computed once and cached.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a rkd_engine.data.Dataset, got {type(dataset).__name__}")
    if dataset.is_image and dataset.name in _FLIP_INVARIANT:
        return {"pad": 4, "flip": True}
    return None
