"""Data protocol (docs/protocol.md), the data sources and image augmentation."""

from __future__ import annotations

import itertools
import json
import math
import pickle

import numpy as np
import pytest
import torch
from conftest import write_cifar10, write_cifar_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from rkd_engine.data import (
    Dataset,
    Split,
    augment_images,
    default_augmentation,
    load_dataset,
    long_tail_counts,
)
from rkd_engine.data.protocol import split_indices


# ---------------------------------------------------------------------------------------------- profile
def test_long_tail_counts_hand_worked():
    # n_y = floor(100 * 10^(-y/9)): 10^(-1/9) = 0.774, 10^(-2/9) = 0.599, ..., 10^-1
    assert long_tail_counts(100, 10, 10) == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    assert long_tail_counts(1000, 3, 100) == [1000, 100, 10]
    assert long_tail_counts(7, 1, 50) == [7]
    assert long_tail_counts(5, 4, 1) == [5, 5, 5, 5]
    assert long_tail_counts(5, 3, 100) == [5, 1, 1]  # at least one example per class


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5000), st.integers(2, 120), st.floats(1.0, 500.0))
def test_long_tail_counts_profile(n_max, m, rho):
    counts = long_tail_counts(n_max, m, rho)
    assert len(counts) == m and counts[0] == n_max
    assert all(a >= b >= 1 for a, b in itertools.pairwise(counts))
    assert counts[-1] == max(1, math.floor(round(n_max / rho, 9)))


@pytest.mark.parametrize(
    "args, error",
    [((0, 10, 10.0), ValueError), ((10, 0, 10.0), ValueError), ((10, 3, 0.5), ValueError),
     ((10, 3, float("inf")), ValueError), ((10.0, 3, 10.0), ValueError), ((10, 3, "10"), TypeError)],
)  # fmt: skip
def test_long_tail_counts_rejects_bad_arguments(args, error):
    with pytest.raises(error):
        long_tail_counts(*args)


# ---------------------------------------------------------------------------------------------- digits
def test_digits_protocol():
    data = load_dataset("digits", imbalance=10.0, seed=0)
    assert data.name == "digits" and data.is_image and data.num_classes == 10
    assert data.input_shape == (1, 8, 8) and data.train.x.shape[1:] == (1, 8, 8)
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.int64
    for split in (data.val, data.test):
        assert split.class_counts(10).tolist() == [30] * 10
    # the smallest digits class has 174 images; 60 are held out, so n_max = 114
    assert data.train.class_counts(10).tolist() == long_tail_counts(114, 10, 10.0)
    torch.testing.assert_close(data.train_prior, data.train.class_counts(10).float() / len(data.train))
    # standardised with the training statistics (one channel)
    assert abs(float(data.train.x.mean())) < 1e-5 and abs(float(data.train.x.std(unbiased=False)) - 1) < 1e-4
    summary = json.loads(json.dumps(data.describe()))
    assert summary["train_counts"][0] == 114
    assert summary["realised_imbalance"] == pytest.approx(114 / 11)


def test_digits_is_reproducible_and_seed_dependent():
    a, b, c = (load_dataset("digits", imbalance=50.0, seed=s) for s in (3, 3, 4))
    for name in ("train", "val", "test"):
        torch.testing.assert_close(getattr(a, name).x, getattr(b, name).x, rtol=0, atol=0)
        assert torch.equal(getattr(a, name).y, getattr(b, name).y)
    assert not torch.equal(a.val.x, c.val.x)
    assert a.train.class_counts(10).tolist() == long_tail_counts(114, 10, 50.0)


# ---------------------------------------------------------------------------------------------- npz
def _write_npz(path, n_per_class=(40, 50, 60), features=3, **extra):
    """Rows with a unique id in feature 0 and the label copied into feature 1."""
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)]).astype(np.int64)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(y.size, features)).astype(np.float32)
    x[:, 0] = np.arange(y.size)
    x[:, 1] = y
    np.savez(path, x=x, y=y, **extra)
    return x, y


def test_npz_splits_are_disjoint_balanced_and_paired(tmp_path):
    path = tmp_path / "d.npz"
    _write_npz(path)
    data = load_dataset(f"npz:{path}", imbalance=4.0, seed=1, val_per_class=5, test_per_class=7)
    assert not data.is_image and data.input_shape == (3,) and data.num_classes == 3
    assert data.val.class_counts(3).tolist() == [5, 5, 5] and data.test.class_counts(3).tolist() == [7, 7, 7]
    assert data.train.class_counts(3).tolist() == long_tail_counts(40 - 12, 3, 4.0)  # n_max = smallest rest
    ids = [set(s.x[:, 0].tolist()) for s in (data.train, data.val, data.test)]
    assert sum(map(len, ids)) == len(data.train) + len(data.val) + len(data.test)  # no duplicates
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])  # disjoint
    # every row keeps its own label: feature 1 (the label, standardised) is one value per class
    for split in (data.train, data.val, data.test):
        for c in range(3):
            assert split.x[split.y == c, 1].unique().numel() == 1
    per_label = [data.train.x[data.train.y == c, 1][0] for c in range(3)]
    assert per_label[0] < per_label[1] < per_label[2]


def test_npz_integer_images_match_float_images(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(60, 2, 4, 4), dtype=np.uint8)
    y = np.repeat(np.arange(3), 20)
    np.savez(tmp_path / "u8.npz", x=x, y=y)
    np.savez(tmp_path / "f32.npz", x=x.astype(np.float32), y=y)
    a = load_dataset(f"npz:{tmp_path / 'u8.npz'}", seed=4)
    b = load_dataset(f"npz:{tmp_path / 'f32.npz'}", seed=4)
    assert a.train.x.dtype == torch.float32
    torch.testing.assert_close(a.train.x, b.train.x, rtol=0, atol=0)
    torch.testing.assert_close(a.test.x, b.test.x, rtol=0, atol=0)


def test_npz_official_test_set_and_images(tmp_path):
    path = tmp_path / "img.npz"
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 20)
    x = rng.random((80, 6, 5)).astype(np.float32)  # (N, H, W): one channel
    np.savez(
        path,
        x=x,
        y=y,
        x_test=np.full((12, 6, 5), 7.0),
        y_test=np.repeat(np.arange(4), 3),
    )
    data = load_dataset(f"npz:{path}", imbalance=2.0, val_per_class=4)
    assert data.is_image and data.input_shape == (1, 6, 5) and data.test.x.shape == (12, 1, 6, 5)
    assert data.test.class_counts(4).tolist() == [3, 3, 3, 3]
    assert torch.all(data.test.x == data.test.x[0, 0, 0, 0])  # the constant official test images
    assert data.train.class_counts(4).tolist() == long_tail_counts(16, 4, 2.0)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x": np.zeros((6, 2))}, "'y'"),
        ({"x": np.zeros((6, 2)), "y": np.zeros(6)}, "integer labels"),
        ({"x": np.zeros((6, 2)), "y": np.zeros((6, 1), dtype=int)}, "1-D"),
        ({"x": np.zeros((5, 2)), "y": np.zeros(6, dtype=int)}, "N = len"),
        ({"x": np.full((6, 2), np.nan), "y": np.zeros(6, dtype=int)}, "NaN"),
        ({"x": np.zeros((6, 2)), "y": np.array([0, 0, 2, 2, 2, 0])}, r"classes \[1\]"),
        ({"x": np.zeros((6, 2)), "y": np.array([0, 0, -1, 1, 1, 0])}, "0..m-1"),
        (
            {
                "x": np.zeros((6, 2)),
                "y": np.zeros(6, dtype=int),
                "x_test": np.zeros((1, 2)),
            },
            "x_test",
        ),
        ({"x": np.array([["a", "b"]] * 6), "y": np.zeros(6, dtype=int)}, "numeric"),
    ],
)
def test_npz_bad_arrays_are_named(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        load_dataset(f"npz:{path}")


def test_npz_missing_or_unreadable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"junk\.npz"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")
    with pytest.raises(ValueError, match=r"obj\.npz.*without pickle"):  # object arrays need pickle: refused
        np.savez(
            tmp_path / "obj.npz",
            x=np.array([{}] * 6, dtype=object),
            y=np.zeros(6, dtype=int),
        )
        load_dataset(f"npz:{tmp_path / 'obj.npz'}")


def test_too_few_examples_for_held_out_sets(tmp_path):
    path = tmp_path / "small.npz"
    _write_npz(path, n_per_class=(10, 12))
    with pytest.raises(ValueError, match="class 0 has 10 examples"):
        load_dataset(f"npz:{path}", val_per_class=5, test_per_class=5)


# ---------------------------------------------------------------------------------------------- synthetic
def test_synthetic_options_and_reproducibility():
    data = load_dataset("synthetic:m=4,d=6,n=50,sep=5", imbalance=5.0, seed=2)
    assert data.input_shape == (6,) and data.num_classes == 4 and not data.is_image
    assert data.val.class_counts(4).tolist() == [10] * 4 and data.test.class_counts(4).tolist() == [10] * 4
    assert data.train.class_counts(4).tolist() == long_tail_counts(30, 4, 5.0)
    again = load_dataset("synthetic:m=4,d=6,n=50,sep=5", imbalance=5.0, seed=2)
    assert torch.equal(data.train.x, again.train.x)
    other = load_dataset("synthetic:m=4,d=6,n=50,sep=5", imbalance=5.0, seed=3)
    assert not torch.equal(data.train.x, other.train.x)
    default = load_dataset("synthetic")
    assert default.num_classes == 10 and default.input_shape == (20,)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("imagenet", "unknown data source"),
        ("digits:extra", "no argument"),
        ("synthetic:q=3", "key one of"),
        ("synthetic:m=three", "must be int"),
        ("synthetic:n=2", "n >= 3"),
        ("npz", "needs a path"),
        ("cifar10", "needs a folder"),
        ("synthetic:sep=-1", "sep"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(spec)


# ---------------------------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_loader(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    write_cifar10(folder)
    data = load_dataset(f"cifar10:{tmp_path}", imbalance=5.0, seed=0, val_per_class=2)
    assert data.name == "cifar10" and data.is_image and data.num_classes == 10
    assert data.input_shape == (3, 32, 32) and data.train.x.shape[1:] == (3, 32, 32)
    assert data.val.class_counts(10).tolist() == [2] * 10
    assert data.test.class_counts(10).tolist() == [3] * 10  # the whole official test batch
    assert data.train.class_counts(10).tolist() == long_tail_counts(18, 10, 5.0)  # 20 per class - 2
    marker = data.test.x[:, 0, 0, 0]
    assert torch.all(marker == marker[0]) and torch.all(data.train.x[:, 0, 0, 0] < marker[0])
    assert torch.all(data.val.x[:, 0, 0, 0] < marker[0])  # validation carved from the training batches
    assert default_augmentation(data) == {"pad": 4, "flip": True}


def test_cifar100_loader(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(folder / "train", np.repeat(np.arange(100), 3), label_key=b"fine_labels")
    write_cifar_batch(folder / "test", np.arange(100), label_key=b"fine_labels", marker=255)
    data = load_dataset(f"cifar100:{tmp_path}", imbalance=2.0, val_per_class=1)
    assert data.num_classes == 100 and len(data.test) == 100 and len(data.val) == 100
    assert data.train.class_counts(100).tolist() == long_tail_counts(2, 100, 2.0)


def test_cifar_missing_files_are_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset(f"cifar10:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="lacks train, test"):
        load_dataset(f"cifar100:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(f"cifar10:{tmp_path / 'absent'}")


def test_cifar_bad_batches(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump(
            {b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]},
            f,
            protocol=2,
        )
    with pytest.raises(ValueError, match=r"data_batch_2.*\(N, 3072\)"):
        load_dataset(f"cifar10:{tmp_path}")
    write_cifar_batch(tmp_path / "data_batch_2", [0, 1, 10])
    with pytest.raises(ValueError, match=r"0\.\.9"):
        load_dataset(f"cifar10:{tmp_path}")
    write_cifar_batch(tmp_path / "data_batch_2", [0, 1], label_key=b"fine_labels")
    with pytest.raises(ValueError, match="labels"):
        load_dataset(f"cifar10:{tmp_path}")


class _Exploit:
    def __reduce__(self):
        return (print, ("code ran",))


def test_cifar_loader_runs_no_code_from_the_pickle(tmp_path, capsys):
    write_cifar10(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match=r"refusing to load .*print"):
        load_dataset(f"cifar10:{tmp_path}")
    assert "code ran" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- augmentation
def _candidates(image, pad):
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    h, w = image.shape[-2:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            yield dy, dx, False, crop
            yield dy, dx, True, crop.flip(-1)


def test_augment_images_is_a_crop_and_flip_of_each_row():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 6, 5)
    out = augment_images(x, gen, pad=2, flip=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    drawn = []
    for image, result in zip(x, out, strict=True):
        matches = [(dy, dx, f) for dy, dx, f, c in _candidates(image, 2) if torch.equal(c, result)]
        assert matches, "an output row is not a padded crop (or its mirror) of its input row"
        drawn.append(matches[0])
    assert len(set(drawn)) > 10  # offsets and flips vary across the batch
    assert any(f for _, _, f in drawn) and not all(f for _, _, f in drawn)


def test_augment_images_determinism_and_identity():
    x = torch.randn(16, 1, 8, 8)
    a = augment_images(x, torch.Generator().manual_seed(5), pad=4, flip=True)
    b = augment_images(x, torch.Generator().manual_seed(5), pad=4, flip=True)
    c = augment_images(x, torch.Generator().manual_seed(6), pad=4, flip=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert augment_images(x, torch.Generator(), pad=0, flip=False) is x
    flipped = augment_images(x, torch.Generator().manual_seed(1), pad=0, flip=True)
    assert all(torch.equal(o, i) or torch.equal(o, i.flip(-1)) for o, i in zip(flipped, x, strict=True))
    shifted = augment_images(x, torch.Generator().manual_seed(1), pad=1, flip=False)
    assert all(
        any(torch.equal(c, o) for dy, dx, f, c in _candidates(i, 1) if not f) for o, i in zip(shifted, x, strict=True)
    )


@pytest.mark.parametrize(
    "kwargs, error",
    [({"pad": -1, "flip": True}, ValueError), ({"pad": 1.5, "flip": True}, ValueError)],
)
def test_augment_images_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        augment_images(torch.zeros(2, 1, 4, 4), torch.Generator(), **kwargs)
    with pytest.raises(ValueError, match="N, C, H, W"):
        augment_images(torch.zeros(2, 16), torch.Generator(), pad=1, flip=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_images_on_cuda_matches_cpu():
    x = torch.randn(32, 3, 32, 32)
    cpu = augment_images(x, torch.Generator().manual_seed(0), pad=4, flip=True)
    gpu = augment_images(x.cuda(), torch.Generator().manual_seed(0), pad=4, flip=True)
    assert torch.equal(cpu, gpu.cpu())


def test_default_augmentation_and_dataset_helpers():
    digits = load_dataset("digits")
    assert default_augmentation(digits) is None  # 8x8 digits are not mirror-invariant
    assert default_augmentation(load_dataset("synthetic:n=20")) is None
    with pytest.raises(TypeError):
        default_augmentation("digits")
    moved = digits.to("cpu")
    assert isinstance(moved, Dataset) and torch.equal(moved.train.x, digits.train.x)
    torch.testing.assert_close(float(digits.train_prior.sum()), 1.0)


def test_split_validates_its_tensors():
    with pytest.raises(TypeError, match="float32"):
        Split(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="int64"):
        Split(torch.zeros(3, 2), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="N = len"):
        Split(torch.zeros(4, 2), torch.zeros(3, dtype=torch.int64))
    assert len(Split(torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64))) == 3


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"imbalance": 0.5}, ValueError), ({"imbalance": "10"}, TypeError), ({"seed": 1.0}, TypeError),
     ({"val_per_class": 0}, ValueError), ({"test_per_class": -2}, ValueError)],
)  # fmt: skip
def test_bad_protocol_arguments(tmp_path, kwargs, error):
    # imbalance and seed are checked before any file is read: the folder does not exist
    spec = f"cifar10:{tmp_path / 'absent'}" if "imbalance" in kwargs or "seed" in kwargs else "synthetic:n=20"
    with pytest.raises(error):
        load_dataset(spec, **kwargs)


def test_split_indices_directly():
    y = torch.arange(3).repeat_interleave(10)
    train, val, test = split_indices(y, 3, imbalance=2.0, seed=0, val_per_class=2, test_per_class=3)
    assert torch.bincount(y[train], minlength=3).tolist() == long_tail_counts(5, 3, 2.0)
    assert torch.bincount(y[val], minlength=3).tolist() == [2, 2, 2]
    assert torch.bincount(y[test], minlength=3).tolist() == [3, 3, 3]
    assert len(set(train.tolist()) | set(val.tolist()) | set(test.tolist())) == len(train) + len(val) + len(test)
    with pytest.raises(ValueError, match="test_per_class is required"):
        split_indices(y, 3, imbalance=2.0, seed=0, val_per_class=2, test_per_class=None)
    with pytest.raises(ValueError, match=r"no example of classes \[2\]"):
        split_indices(y, 3, imbalance=2.0, seed=0, val_per_class=2, test_per_class=None, y_test=torch.tensor([0, 1]))
