"""The user's own models, teachers trained elsewhere and image folders, from the ``rkd`` command line."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from rkd_engine.cli import main
from rkd_engine.data import load_dataset
from rkd_engine.data.folder import ImageFolder, parse_folder_spec
from rkd_engine.losses import RobustDistillationLoss
from rkd_engine.models import build_model
from rkd_engine.training.dro_schedule import DROSchedule

DATA = "synthetic:m=3,d=4,n=40"
FAST = ["--epochs", "1", "--batch-size", "32", "--checkpoint-every", "0", "--device", "cpu"]

USER_MODULE = """
import torch

def tiny(input_shape, num_classes, width=8):
    d = 1
    for s in input_shape:
        d *= s
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, num_classes))

def fixed(width=8):
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 3))

def not_a_model(num_classes):
    return 42
"""


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    name = f"rkd_user_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, name
    sys.modules.pop(name, None)


def _metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_user_factory_from_the_cli_and_model_file(user_dir, capsys):
    tmp, mod = user_dir
    out = tmp / "t"
    argv = ["teacher", "--data", DATA, "--model", f"{mod}:tiny", "--model-option", "width=5", *FAST, "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert _metrics(out)["steps"] >= 1
    from rkd_engine.training.evaluation import load_model_file

    model, spec = load_model_file(out)
    assert spec["model"] == f"{mod}:tiny" and model[1].out_features == 5  # rebuilt from the factory
    # A factory without input_shape / num_classes keywords gets only the options.
    assert isinstance(build_model(f"{mod}:fixed", (4,), 3, width=6), torch.nn.Sequential)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:f", "cannot import module"),
        ("{mod}:missing", "has no attribute"),
        ("{mod}:not_a_model", "must return a torch.nn.Module"),
    ],
)
def test_user_factory_errors_name_the_problem(user_dir, capsys, spec, message):
    tmp, mod = user_dir
    argv = ["teacher", "--data", DATA, "--model", spec.format(mod=mod), *FAST, "--out", str(tmp / "bad")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--model" in err and message in err


def _teacher_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()


@pytest.mark.parametrize("kind", ["export", "torchscript", "state_dict"])
def test_student_from_a_teacher_trained_elsewhere(user_dir, capsys, kind):
    tmp, mod = user_dir
    net = _teacher_net()
    path = tmp / f"teacher-{kind}.pt"
    extra: list[str] = []
    if kind == "export":
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(net, (torch.zeros(4, 4),), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(net), str(path))
    else:
        torch.manual_seed(1)
        own = build_model(f"{mod}:tiny", (4,), 3, width=7)
        torch.save(own.state_dict(), path)
        extra = ["--teacher-model", f"{mod}:tiny", "--teacher-model-option", "width=7"]
    out = tmp / f"s-{kind}"
    argv = ["student", "--data", DATA, "--teacher-checkpoint", str(path), *extra, "--objective", "robust"]
    assert main([*argv, *FAST, "--dro-every", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    metrics = _metrics(out)
    assert metrics["method"] == "distill" and "teacher_calibration" in metrics
    assert metrics["dro_weights"] != [1 / 3] * 3  # the DRO schedule ran


def test_teacher_checkpoint_class_count_and_format_are_checked(user_dir, capsys):
    tmp, mod = user_dir
    wrong = torch.nn.Linear(4, 5)
    torch.jit.save(torch.jit.script(wrong), str(tmp / "five.pt"))
    argv = ["student", "--data", DATA, "--teacher-checkpoint", str(tmp / "five.pt"), *FAST, "--out", str(tmp / "x")]
    assert main(argv) == 2
    assert "scores 5 classes, the data has 3" in capsys.readouterr().err
    torch.save(_teacher_net().state_dict(), tmp / "sd.pt")
    argv = ["student", "--data", DATA, "--teacher-checkpoint", str(tmp / "sd.pt"), *FAST, "--out", str(tmp / "y")]
    assert main(argv) == 2
    assert "--teacher-model" in capsys.readouterr().err
    argv += ["--teacher-model", f"{mod}:tiny"]
    assert main([*argv, "--overwrite"]) == 2
    assert "do not fit --teacher-model" in capsys.readouterr().err
    assert main(["student", "--teacher-model", "mlp", "--data", DATA, *FAST]) == 2
    assert "--teacher-checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------------- image folders
def _write_folder(root, counts, size=(10, 12), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
    for c, n in enumerate(counts):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = np.array(colours[c], dtype=np.float64)
            pixels = np.clip(base + rng.normal(0, 40, (*size, 3)), 0, 255).astype(np.uint8)
            suffix = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.{suffix}")


def test_folder_source_trains_end_to_end(tmp_path, capsys):
    root = tmp_path / "images"
    _write_folder(root, (40, 30, 30))
    data = load_dataset(f"folder:{root},size=8", imbalance=4.0, val_per_class=5, test_per_class=5)
    assert data.input_shape == (3, 8, 8) and data.num_classes == 3 and data.is_image
    assert data.train.class_counts(3).tolist() == [20, 10, 5]
    out = tmp_path / "run"
    argv = ["teacher", "--data", f"folder:{root},size=8", "--imbalance", "4", "--val-per-class", "5"]
    argv += ["--test-per-class", "5", "--epochs", "3", "--lr", "0.05", "--batch-size", "16", "--device", "cpu"]
    assert main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    assert _metrics(out)["test"]["accuracy"] > 0.6  # colours are easy to tell apart
    # A teacher cache of the folder's splits is keyed on its files and serves a student.
    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(out), "--out", str(cache), "--quiet"]) == 0, capsys.readouterr().err
    student = ["student", "--teacher-cache", str(cache), "--objective", "robust", "--epochs", "1"]
    assert main([*student, "--out", str(tmp_path / "s")]) == 0, capsys.readouterr().err
    assert "test" in _metrics(tmp_path / "s")


def test_folder_train_test_layout_and_lazy_decoding(tmp_path):
    _write_folder(tmp_path / "d" / "train", (12, 12, 12))
    _write_folder(tmp_path / "d" / "test", (4, 4, 4), seed=1)
    data = load_dataset(f"folder:{tmp_path / 'd'},size=6x5,channels=1", imbalance=1.0, val_per_class=2)
    assert data.input_shape == (1, 6, 5) and len(data.test) == 12
    images = ImageFolder(tmp_path / "d" / "train", size=(4, 4))
    assert images.shape == (36, 3, 4, 4) and images.labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    assert images[torch.tensor([0, 35])].dtype == torch.uint8
    assert parse_folder_spec("a,b/dir,size=3")[0].name == "dir"


def _count_pillow(monkeypatch) -> dict[str, int]:
    """Counts ``PIL.Image.open`` calls (headers) and pixel decodes (``ImageFile.load``)."""
    from PIL import Image, ImageFile

    counts = {"open": 0, "decode": 0}
    real_open, real_load = Image.open, ImageFile.ImageFile.load

    def counting_open(*args, **kwargs):
        counts["open"] += 1
        return real_open(*args, **kwargs)

    def counting_load(self):
        if getattr(self, "_rkd_counted", False) is False:  # load() is re-entered once decoded
            counts["decode"] += 1
            self._rkd_counted = True
        return real_load(self)

    monkeypatch.setattr(Image, "open", counting_open)
    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return counts


def test_folder_splits_are_read_lazily_with_the_eager_values(tmp_path, monkeypatch):
    from rkd_engine.data.folder import ImageRows
    from rkd_engine.data.protocol import Split, standardise_
    from rkd_engine.training.teacher_cache import tensor_digest

    root = tmp_path / "images"
    _write_folder(root, (30, 20, 12))
    counts = _count_pillow(monkeypatch)
    images = ImageFolder(root, size=(6, 7))
    rows = images.rows(torch.arange(len(images)))
    assert counts == {"open": 0, "decode": 0}  # the dataset keeps paths and labels only
    assert isinstance(rows, ImageRows) and rows.shape == (62, 3, 6, 7) and len(rows) == 62

    data = load_dataset(f"folder:{root},size=6x7", imbalance=3.0, val_per_class=3, test_per_class=3)
    assert all(isinstance(getattr(data, s).x, ImageRows) for s in ("train", "val", "test"))
    # One streaming pass decodes each training image once (the statistics); held-out images: headers only.
    assert counts["decode"] == len(data.train)
    assert counts["open"] == len(data.train) + len(data.val) + len(data.test)
    counts["decode"] = 0
    batch = data.val.x[torch.tensor([4, 0, 7])]
    assert counts["decode"] == 3 and batch.shape == (3, 3, 6, 7) and batch.dtype == torch.float32

    # The values are those of decoding the chosen rows into memory and standardising them there.
    eager = [Split(images[split.x.indices].float() / 255.0, split.y) for split in (data.train, data.val, data.test)]
    standardise_(*eager, is_image=True)
    for lazy, want in zip((data.train, data.val, data.test), eager, strict=True):
        torch.testing.assert_close(lazy.x[:], want.x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lazy.x[1], want.x[1], atol=1e-5, rtol=1e-5)
    moved = data.to("cpu")
    torch.testing.assert_close(moved.test.x[2:5], eager[2].x[2:5], atol=1e-5, rtol=1e-5)
    # Teacher caches key on the files' bytes: a changed image changes the digest.
    before = tensor_digest(data.test.x)
    again = load_dataset(f"folder:{root},size=6x7", imbalance=3.0, val_per_class=3, test_per_class=3)
    for name in ("train", "val", "test"):
        key = tensor_digest(getattr(data, name).x)
        assert tensor_digest(getattr(moved, name).x) == key == tensor_digest(getattr(again, name).x)
    path = images.paths[int(data.test.x.indices[0])]
    path.write_bytes(path.read_bytes() + b"\0")
    assert tensor_digest(data.test.x) != before


def test_folder_reports_corrupt_images_and_bad_layouts(tmp_path):
    root = tmp_path / "imgs"
    _write_folder(root, (6, 6, 6))
    (root / "class_1" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"broken\.png"):
        load_dataset(f"folder:{root}", imbalance=1.0, val_per_class=1, test_per_class=1)
    with pytest.raises(ValueError, match="no such folder"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no PNG or JPEG"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="size"):
        load_dataset(f"folder:{root},size=0")


# ---------------------------------------------------------------------------------- DRO schedule
def test_dro_schedule_updates_every_k_steps_and_round_trips():
    torch.manual_seed(0)
    loss = RobustDistillationLoss(3, "robust", step_size=1.0)
    labels = torch.tensor([0, 1, 2] * 10)
    schedule = DROSchedule(loss, every=3, labels=labels, val_batch=12, seed=1)
    calls = []

    def score(rows):
        calls.append(rows.clone())
        f = torch.zeros(rows.numel(), 3)
        f[:, 0] = 5.0  # always predicts class 0: classes 1 and 2 are always wrong
        return f

    ran = [schedule.maybe_update(step, score) for step in range(1, 10)]
    assert ran == [False, False, True] * 3 and schedule.num_updates == 3
    assert all(c.numel() == 12 for c in calls)
    w = loss.dro.weights
    assert w[1] > w[0] and torch.allclose(w[1], w[2]) and torch.isclose(w.sum(), torch.tensor(1.0))
    other = DROSchedule(RobustDistillationLoss(3, "robust"), every=3, labels=labels)
    other.load_state_dict(schedule.state_dict())
    torch.testing.assert_close(other.dro.weights, w)
    assert other.num_updates == 3
    # Standard and balanced objectives never update; bad targets are refused.
    assert not DROSchedule(RobustDistillationLoss(3, "balanced"), every=1, labels=labels).maybe_update(1, score)
    with pytest.raises(ValueError, match="exactly one"):
        DROSchedule(loss, every=1)
    with pytest.raises(ValueError, match="every"):
        DROSchedule(loss, every=0, labels=labels)


def test_importing_rkd_imports_no_trainer_framework():
    code = (
        "import sys, rkd_engine, rkd_engine.integrations, rkd_engine.training, rkd_engine.cli; "
        "bad = [m for m in ('transformers', 'lightning', 'pytorch_lightning', 'accelerate') if m in sys.modules]; "
        "assert not bad, bad"
    )
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
