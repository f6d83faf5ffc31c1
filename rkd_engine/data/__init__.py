"""Data for the protocol of docs/protocol.md: long-tailed training sets, balanced validation and test sets.

``load_dataset(spec)`` returns a ``Dataset`` (train, val, test ``Split``s) from ``digits``, ``synthetic``,
``npz:PATH``, ``cifar10:DIR`` or ``cifar100:DIR``; ``augment_images`` crops and flips image batches in
plain torch and ``default_augmentation`` says which augmentation a data set is trained with;
``default_protocol`` gives a data set's default training options (model, epochs, batch, lr).
"""

from __future__ import annotations

from rkd_engine.data.augment import augment_images, default_augmentation
from rkd_engine.data.defaults import DEFAULT_IMBALANCE, Protocol, default_protocol
from rkd_engine.data.protocol import Dataset, Split, long_tail_counts
from rkd_engine.data.sources import SOURCES, load_dataset

__all__ = [
    "DEFAULT_IMBALANCE",
    "Protocol",
    "SOURCES",
    "Dataset",
    "Split",
    "augment_images",
    "default_augmentation",
    "default_protocol",
    "load_dataset",
    "long_tail_counts",
]
