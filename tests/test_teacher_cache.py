"""Offline teachers: ``rkd cache-teacher``, students from a cache, its refusals, atomic and resumable writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run

from rkd_engine import distill_loss
from rkd_engine.cli import main
from rkd_engine.data import load_dataset
from rkd_engine.reference import fused_rows
from rkd_engine.training import ConfigError, StudentConfig, TeacherConfig, train_student, train_teacher
from rkd_engine.training import teacher_cache as tc
from rkd_engine.training.evaluation import load_model_file, predict
from rkd_engine.training.teacher_cache import (
    CacheError,
    TeacherCache,
    TeacherCacheDataset,
    cache_teacher,
)

DATA = "synthetic:m=5,d=6,n=40"
TINY = tiny_run(DATA, imbalance=5.0, epochs=2, dro_every=2, checkpoint_every=0)
STUDENT = {k: v for k, v in TINY.items() if k not in ("data", "imbalance", "model", "model_options")}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return tiny_dataset(DATA, imbalance=5.0, seed=0)


@pytest.fixture(scope="module")
def teacher(tiny_teacher, dataset):
    return tiny_teacher(dataset, **TINY)


@pytest.fixture(scope="module")
def dense(tmp_path_factory, teacher, dataset):
    return cache_teacher(teacher, tmp_path_factory.mktemp("cache") / "dense", dataset=dataset, quiet=True)


@pytest.fixture(scope="module")
def topk2(tmp_path_factory, teacher, dataset):
    return cache_teacher(teacher, tmp_path_factory.mktemp("cache") / "k2", top_k=2, dataset=dataset, quiet=True)


def _weights(path):
    return load_model_file(path)[0].state_dict()


def _student(tmp_path, name, dataset, **options):
    cfg = StudentConfig(**{**STUDENT, **options}, out=str(tmp_path / name))
    return train_student(cfg, dataset=dataset, quiet=True)


# ------------------------------------------------------------------------------ the stored outputs
def test_cache_files_are_plain_numpy_and_manifest(dense, teacher, dataset):
    manifest = json.loads((dense.path / "manifest.json").read_text())
    assert manifest["layout"] == "dense" and manifest["k"] == manifest["num_classes"] == 5
    assert manifest["temperatures"] == [1.0, 3.0, 5.0] and manifest["dtype"] == "float32"
    assert manifest["teacher"]["model_digest"] == tc.file_digest(teacher / "model.pt")
    assert manifest["data"]["data"] == DATA and manifest["data"]["imbalance"] == 5.0
    assert manifest["data"]["data_seed"] == 0
    model = load_model_file(teacher)[0]
    for split in ("train", "val", "test"):
        g = np.load(dense.path / f"{split}.logits.npy")  # numpy alone reads the cache
        assert list(g.shape) == manifest["files"][f"{split}.logits"]["shape"]
        assert torch.equal(torch.from_numpy(g), predict(model, getattr(dataset, split).x))


def test_topk_cache_holds_exact_tempered_probabilities(topk2, teacher, dataset):
    g = predict(load_model_file(teacher)[0], dataset.train.x)
    idx = np.load(topk2.path / "train.topk_indices.npy")
    assert idx.shape == (len(dataset.train), 2) and idx.dtype == np.int32
    assert torch.equal(torch.from_numpy(idx).long(), torch.topk(g, 2, dim=1).indices)
    for gamma in (1.0, 3.0, 5.0):
        top = topk2.topk("train", gamma)
        rows = torch.arange(len(dataset.train))
        i, p = top.rows(rows)
        expected = torch.softmax(g / gamma, dim=1).gather(1, i)
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-7)


def test_topk_at_k_equal_m_is_the_dense_teacher(tmp_path, teacher, dataset):
    cache = cache_teacher(teacher, tmp_path / "k5", top_k=5, temperatures=[3], dataset=dataset, quiet=True)
    g = predict(load_model_file(teacher)[0], dataset.train.x)
    i, p = cache.topk("train", 3.0).rows(torch.arange(len(dataset.train)))
    for tail in tc.TOPK_TAILS:
        torch.testing.assert_close(tc.dense_target(i, p, 5, tail), torch.softmax(g / 3, dim=1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tail", tc.TOPK_TAILS)
def test_topk_cache_gives_the_sparse_loss(topk2, teacher, dataset, tail):
    """The loss from a k = 2 cache is docs/wide_heads.md's: p~ built here from the dense teacher, independently."""
    g = predict(load_model_file(teacher)[0], dataset.train.x[:16]).double()
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    gamma = 3.0
    p = torch.softmax(g / gamma, dim=1)
    keep = torch.zeros_like(p, dtype=torch.bool).scatter_(1, torch.topk(g, 2, dim=1).indices, True)
    if tail == "renormalize":
        target = torch.where(keep, p, 0.0) / torch.where(keep, p, 0.0).sum(1, keepdim=True)
    else:
        rest = (1 - torch.where(keep, p, 0.0).sum(1, keepdim=True)) / 3
        target = torch.where(keep, p, rest)
    costs = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    want = fused_rows(f, teacher=target, teacher_is_probs=True, a=torch.ones(16), log_c=costs.log(), need_grad=False)
    i, pk = topk2.topk("train", gamma).rows(torch.arange(16))
    got = distill_loss(f.float(), teacher_topk=(i, pk), topk_tail=tail, class_costs=costs.float())
    torch.testing.assert_close(got.loss.double(), want.loss.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.mass.double(), want.mass, rtol=1e-5, atol=1e-5)
    got64 = distill_loss(f, teacher_topk=(i, pk.double()), topk_tail=tail, class_costs=costs)
    torch.testing.assert_close(got64.loss, want.loss.mean(), rtol=1e-6, atol=1e-7)  # float32 cached p


# ------------------------------------------------------------------------ students from a cache
@pytest.mark.parametrize(
    "options",
    [
        {"objective": "robust"},
        {"objective": "tradeoff", "alpha": 0.5, "gamma": 3.0, "val_gamma": 0.1},
        {"method": "hinton", "tau": 2.0},
        {"method": "ada-alpha", "objective": "balanced"},
    ],
    ids=["robust", "tradeoff-gamma3", "hinton", "ada-alpha"],
)
def test_dense_cache_student_equals_online_teacher(tmp_path, teacher, dense, dataset, options):
    online = _student(tmp_path, "online", dataset, teacher=str(teacher), **options)
    cached = _student(tmp_path, "cached", dataset, teacher_cache=str(dense.path), **options)
    a, b = _weights(online.path), _weights(cached.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert online.metrics == cached.metrics
    assert "teacher_calibration" in cached.metrics


def test_cache_with_its_teacher_given_is_used(tmp_path, teacher, dense, dataset, monkeypatch):
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr("rkd_engine.training.methods.load_teacher", no_teacher)
    result = _student(tmp_path, "both", dataset, teacher=str(teacher), teacher_cache=str(dense.path))
    assert result.metrics["steps"] > 0


@pytest.mark.parametrize("tail", tc.TOPK_TAILS)
def test_topk_cache_student_trains(tmp_path, topk2, dataset, tail):
    result = _student(tmp_path, "k2", dataset, teacher_cache=str(topk2.path), objective="robust", topk_tail=tail)
    assert result.metrics["steps"] > 0 and 0 <= result.metrics["test"]["worst_accuracy"] <= 1
    prior = torch.tensor(result.metrics["prior"])
    assert torch.isclose(prior.sum(), torch.tensor(1.0)) and bool((prior > 0).all())


def test_dataset_wrapper_yields_x_y_teacher(dense, topk2, dataset, teacher):
    loader = torch.utils.data.DataLoader(TeacherCacheDataset(dense, dataset.train), batch_size=7)
    x, y, g = next(iter(loader))
    assert torch.equal(x, dataset.train.x[:7]) and torch.equal(y, dataset.train.y[:7])
    assert torch.equal(g, predict(load_model_file(teacher)[0], dataset.train.x[:7]))
    loader = torch.utils.data.DataLoader(TeacherCacheDataset(topk2.path, dataset.train, gamma=3.0), batch_size=7)
    x, y, (i, p) = next(iter(loader))
    assert i.shape == p.shape == (7, 2) and i.dtype == torch.int64
    torch.testing.assert_close(p, topk2.topk("train", 3.0).rows(torch.arange(7))[1])
    with pytest.raises(ValueError, match="needs gamma"):
        TeacherCacheDataset(topk2, dataset.train)
    with pytest.raises(CacheError, match="not the one the cache was made from"):
        TeacherCacheDataset(dense, dataset.val)


# ------------------------------------------------------------------------------------- refusals
def test_mismatched_data_options_are_refused(tmp_path, dense):
    for options, named in (
        ({"data_seed": 1}, "--data-seed 1 (cache: 0)"),
        ({"imbalance": 10.0}, "--imbalance 10.0 (cache: 5.0)"),
        ({"data": "digits"}, "--data 'digits' (cache: 'synthetic:m=5,d=6,n=40')"),
    ):
        with pytest.raises(ConfigError, match="was made for other data") as err:
            _student(tmp_path, "x", None, teacher_cache=str(dense.path), **options)
        assert named in str(err.value)


def test_cache_for_another_split_is_refused(tmp_path, dense):
    other = load_dataset(DATA, imbalance=5.0, seed=7)  # what a different split would give
    with pytest.raises(CacheError, match="differ from those the cache was made from"):
        _student(tmp_path, "x", other, teacher_cache=str(dense.path))


def test_cache_of_another_teacher_is_refused(tmp_path, dense, dataset):
    other = tmp_path / "t2"
    train_teacher(TeacherConfig(**{**TINY, "epochs": 1}, out=str(other)), dataset=dataset, quiet=True)
    with pytest.raises(ConfigError, match="not from --teacher"):
        _student(tmp_path, "x", dataset, teacher=str(other), teacher_cache=str(dense.path))


def test_augmentation_needs_the_opt_in(tmp_path, digits, digits_teacher):
    cache = cache_teacher(digits_teacher, tmp_path / "c", dataset=digits, quiet=True)
    student = {**STUDENT, "epochs": 1, "batch_size": 64, "augment": "on", "teacher_cache": str(cache.path)}
    with pytest.raises(ConfigError, match="augmentation is on") as err:
        train_student(StudentConfig(**student, out=str(tmp_path / "s")), dataset=digits, quiet=True)
    assert "--cache-augmented" in str(err.value) and "changes the method" in str(err.value)
    result = train_student(
        StudentConfig(**student, cache_augmented=True, out=str(tmp_path / "s2")), dataset=digits, quiet=True
    )
    assert result.metrics["steps"] > 0


@pytest.mark.parametrize(
    "options,message",
    [
        ({"gamma": 2.0}, "--gamma 2 is not among the temperatures"),
        ({"method": "ada-alpha"}, "needs the teacher's probability of the label"),
        ({"method": "ada-margin"}, "needs the teacher's probability of the label"),
    ],
)
def test_topk_refusals(tmp_path, topk2, dataset, options, message):
    with pytest.raises((ConfigError, CacheError), match=message):
        _student(tmp_path, "x", dataset, teacher_cache=str(topk2.path), **options)


@pytest.mark.parametrize("method,message", [("post-shift", "teacher itself"), ("group-dro", "has no teacher")])
def test_methods_without_a_teacher_to_cache(dense, method, message):
    with pytest.raises(ConfigError, match=f"--teacher-cache cannot serve --method {method}: .*{message}"):
        train_student(StudentConfig(**STUDENT, method=method, teacher_cache=str(dense.path)))


def test_cache_teacher_refusals(tmp_path, teacher, dataset):
    with pytest.raises(CacheError, match="--top-k 6 exceeds the number of classes m = 5"):
        cache_teacher(teacher, tmp_path / "c", top_k=6, dataset=dataset, quiet=True)
    with pytest.raises(CacheError, match="--temperatures must be numbers > 0"):
        cache_teacher(teacher, tmp_path / "c", temperatures=[1, 0], dataset=dataset, quiet=True)
    with pytest.raises(CacheError, match="--dtype must be one of"):
        cache_teacher(teacher, tmp_path / "c", dtype="int8", dataset=dataset, quiet=True)
    student = _student(tmp_path, "s", dataset, teacher=str(teacher), epochs=1)
    with pytest.raises(CacheError, match="is a student run"):
        cache_teacher(student.path, tmp_path / "c", dataset=dataset, quiet=True)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(CacheError, match="is not a teacher cache"):
        cache_teacher(teacher, tmp_path / "junk", dataset=dataset, quiet=True)


def test_existing_cache_is_reused_or_replaced_only_with_overwrite(tmp_path, teacher, dataset):
    first = cache_teacher(teacher, tmp_path / "c", dataset=dataset, quiet=True)
    again = cache_teacher(teacher, tmp_path / "c", dataset=dataset, quiet=True)
    assert again.manifest == first.manifest
    with pytest.raises(CacheError, match=r"made with other options: layout 'dense' \(asked 'topk'\)"):
        cache_teacher(teacher, tmp_path / "c", top_k=2, dataset=dataset, quiet=True)
    replaced = cache_teacher(teacher, tmp_path / "c", top_k=2, overwrite=True, dataset=dataset, quiet=True)
    assert replaced.layout == "topk" and not (tmp_path / "c" / "train.logits.npy").exists()


# --------------------------------------------------------------------- corrupt and killed caches
def test_truncated_and_corrupted_files_are_detected(tmp_path, teacher, dataset):
    cache = cache_teacher(teacher, tmp_path / "c", dataset=dataset, quiet=True)
    path = cache.path / "train.logits.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(CacheError, match=r"train.logits.npy has \d+ bytes, the manifest says \d+ \(truncated"):
        TeacherCache.open(cache.path)
    path.write_bytes(data[:-4] + bytes(4))
    assert TeacherCache.open(cache.path, verify="size").layout == "dense"
    with pytest.raises(CacheError, match="does not match its SHA-256 in the manifest"):
        TeacherCache.open(cache.path)
    with pytest.raises(CacheError, match="corrupted"):
        _student(tmp_path, "s", dataset, teacher_cache=str(cache.path))
    path.unlink()
    with pytest.raises(CacheError, match="train.logits.npy is missing"):
        TeacherCache.open(cache.path)


def test_killed_cache_teacher_leaves_no_cache_and_resumes(tmp_path, teacher, dataset, monkeypatch):
    monkeypatch.setattr(tc, "EVAL_BATCH", 16)
    real_load = tc.load_model_file
    calls = {"rows": 0, "limit": 40}

    class Killed(Exception):
        pass

    def counting_load(*args, **kwargs):
        model, spec = real_load(*args, **kwargs)
        forward = model.forward

        def counted(x):
            if calls["rows"] >= calls["limit"]:
                raise Killed
            calls["rows"] += x.shape[0]
            return forward(x)

        model.forward = counted
        return model, spec

    monkeypatch.setattr(tc, "load_model_file", counting_load)
    out = tmp_path / "c"
    with pytest.raises(Killed):
        cache_teacher(teacher, out, top_k=3, dataset=dataset, quiet=True)
    assert not out.exists() and (tmp_path / "c.partial").is_dir()
    with pytest.raises(CacheError, match="holds an interrupted `rkd cache-teacher`: run it again"):
        TeacherCache.open(out)
    calls.update(rows=0, limit=10**9)
    resumed = cache_teacher(teacher, out, top_k=3, dataset=dataset, quiet=True)
    total = len(dataset.train) + len(dataset.val) + len(dataset.test)
    assert calls["rows"] == total - 48  # three chunks of 16 rows were kept, not recomputed
    assert not (tmp_path / "c.partial").exists()
    fresh = cache_teacher(teacher, tmp_path / "fresh", top_k=3, dataset=dataset, quiet=True)
    for key, entry in fresh.manifest["files"].items():
        assert resumed.manifest["files"][key]["sha256"] == entry["sha256"], key


# ------------------------------------------------------------------------------------------- CLI
def test_cli_cache_teacher_and_student(tmp_path, teacher, capsys):
    out = tmp_path / "c"
    assert main(["cache-teacher", str(teacher), "--out", str(out), "--top-k", "2", "--temperatures", "1,3"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert TeacherCache.open(out).temperatures == (1.0, 3.0)
    args = ["student", "--teacher-cache", str(out), "--epochs", "1", "--quiet", "--out", str(tmp_path / "s")]
    assert main([*args, "--gamma", "5"]) == 2
    err = capsys.readouterr().err
    assert "rkd student: error: --gamma 5 is not among the temperatures" in err
    assert main([*args, "--gamma", "3", "--topk-tail", "uniform", "--model-option", "hidden_sizes=[8]"]) == 0
    assert main(["cache-teacher", str(teacher), "--out", str(tmp_path / "d"), "--top-k", "0"]) == 2
    assert "--top-k must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["student", "--help"])
    student_help = " ".join(capsys.readouterr().out.split())  # the opt-in's help says what it changes
    assert "--cache-augmented accept a teacher cache with augmentation on" in student_help
    assert "UN-augmented image" in student_help and "changes the method" in student_help


# ----------------------------------------------------------------------------------------- sweep
def test_sweep_with_cached_teachers_matches_online(tmp_path):
    import csv

    fast = ["--set", "epochs=2", "--set", "model=mlp", "--set", "model_options={hidden_sizes: [16]}"]
    grid = ["--alpha-t", "1", "--alpha-s", "1", "--seeds", "1", "--baselines", "hinton,post-shift", "--workers", "1"]
    rows = {}
    for name, extra in (("online", []), ("cached", ["--cache-teachers"])):
        assert main(["sweep", "--out", str(tmp_path / name), *grid, *fast, "--quiet", *extra]) == 0
        with open(tmp_path / name / "runs.csv", newline="") as fh:
            rows[name] = {r["run"]: r for r in csv.DictReader(fh)}
    assert rows["online"].keys() == rows["cached"].keys() and len(rows["online"]) == 2 + 4 + 2
    for run, row in rows["online"].items():
        for column in ("test_average", "test_worst", "test_recall", "val_worst"):
            assert row[column] == rows["cached"][run][column], (run, column)
    caches = tmp_path / "cached" / "caches" / "seed0"
    assert sorted(p.name for p in caches.iterdir() if p.is_dir()) == ["teacher-a1", "teacher-standard"]
    student = json.loads((tmp_path / "cached" / "runs" / "seed0" / "g1" / "a1__a1" / "config.json").read_text())
    # run paths are stored relative to the sweep directory (a sweep can move)
    assert student["teacher_cache"] == str(Path("caches") / "seed0" / "teacher-a1")
    post = json.loads((tmp_path / "cached" / "runs" / "seed0" / "baseline-post-shift" / "config.json").read_text())
    assert post["teacher_cache"] is None  # post-shift's model is the teacher itself


def test_float16_cache(tmp_path, teacher, dataset):
    cache = cache_teacher(teacher, tmp_path / "h", dtype="float16", top_k=2, dataset=dataset, quiet=True)
    assert cache.dtype == "float16" and np.load(cache.path / "train.topk_logits.npy").dtype == np.float16
    assert np.load(cache.path / "val.logits.npy").dtype == np.float16
    g = predict(load_model_file(teacher)[0], dataset.val.x)
    torch.testing.assert_close(cache.logits("val"), g, rtol=1e-3, atol=1e-3)  # read back as float32
    assert cache.logits("val").dtype == torch.float32
