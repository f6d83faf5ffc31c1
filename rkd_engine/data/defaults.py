"""Default training protocol of each data source: model, epochs, batch size, learning rate, weight decay.

A command given no training options takes them from ``default_protocol(dataset)``, so a first run on a
source trains something sensible for that source (and prints what it chose). Sources with a known
protocol have a fixed entry; ``npz:`` (and any other source) gets one derived from the data: its size,
its number of classes and whether it holds images or feature vectors.

- ``digits`` (8x8 images, a few hundred training rows at ``rho = 100``): the demo's protocol, an MLP
  with one hidden layer of 128 units, 30 epochs, batch 64, SGD lr 0.1, weight decay 5e-4, no
  augmentation. Measured here (long-tailed digits, ``rho = 100``, 5 seeds): 77.4 / 11.3 % test
  average / worst-class accuracy for the standard teacher, where the small CNN (the previous ``auto``
  model) reached 59.7 / 0.0 in the same 30 epochs and the two-layer 256-unit MLP 75.6 / 2.7.
- ``cifar10``, ``cifar100``: the CIFAR-LT protocol of the paper's study (``benchmarks/recipes/``): a
  ResNet-32, 200 epochs, batch 128, lr 0.1, weight decay 1e-4, crop and flip (not measured here: no
  CIFAR on this machine).
- ``synthetic`` and derived defaults: an MLP with one hidden layer of 128 units for feature vectors
  and images smaller than 16 pixels a side, a ResNet-20 for larger images; batch 64 below 20 000
  training rows, else 128; about 3000 SGD steps, between 30 and 200 epochs; lr 0.1, weight decay 5e-4.

The imbalance ratio every command defaults to is ``DEFAULT_IMBALANCE`` (the paper's ``rho = 100``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rkd_engine.data.protocol import Dataset

DEFAULT_IMBALANCE = 100.0
# Derived protocol: about this many SGD steps, within these epochs.
TARGET_STEPS = 3000
EPOCH_RANGE = (30, 200)
LARGE_TRAIN = 20_000  # training rows from which the batch grows from 64 to 128
SMALL_IMAGE = 16  # images with a side below this go to the MLP


@dataclass(frozen=True)
class Protocol:
    """A data source's default training options (``TrainConfig`` names) and where they come from."""

    model: str
    model_options: dict = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    origin: str = ""

    def options(self) -> dict[str, Any]:
        """The options as ``TrainConfig`` keyword values."""
        return {
            "model": self.model,
            "model_options": dict(self.model_options),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
        }


_KNOWN = {
    "digits": Protocol("mlp", {"hidden_sizes": [128]}, 30, 64, 0.1, 5e-4, "measured on long-tailed digits"),
    "cifar10": Protocol("resnet32", {}, 200, 128, 0.1, 1e-4, "the paper's CIFAR-LT protocol"),
    "cifar100": Protocol("resnet32", {}, 200, 128, 0.1, 1e-4, "the paper's CIFAR-LT protocol"),
}


def default_protocol(dataset: Dataset) -> Protocol:
    """The default training protocol for ``dataset`` (see the module docstring)."""
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a rkd_engine.data.Dataset, got {type(dataset).__name__}")
    known = _KNOWN.get(dataset.name)
    if known is not None:
        return known
    n = len(dataset.train)
    image = dataset.is_image and len(dataset.input_shape) == 3
    small = not image or min(dataset.input_shape[1:]) < SMALL_IMAGE
    model, options = ("mlp", {"hidden_sizes": [128]}) if small else ("resnet20", {})
    batch = 64 if n < LARGE_TRAIN else 128
    steps = max(1, math.ceil(n / batch))
    epochs = min(EPOCH_RANGE[1], max(EPOCH_RANGE[0], math.ceil(TARGET_STEPS / steps)))
    kind = f"{'x'.join(str(s) for s in dataset.input_shape)} images" if image else "feature vectors"
    origin = f"derived from the data ({n} training rows of {kind}, {dataset.num_classes} classes)"
    return Protocol(model, options, epochs, batch, 0.1, 5e-4, origin)
