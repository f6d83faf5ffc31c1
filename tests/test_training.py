"""The training engine: tiny teacher and student runs for every objective and method, and its parts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_run

from rkd_engine.data import load_dataset
from rkd_engine.training import (
    CheckpointError,
    ConfigError,
    StudentConfig,
    TeacherConfig,
    engine,
    load_model_file,
    train_student,
    train_teacher,
)
from rkd_engine.training.config import convert, merge, semantic_diff, validate
from rkd_engine.training.demo import pareto_front
from rkd_engine.training.methods import (
    ada_alpha_weight,
    ada_margin_shift,
    post_shift_search,
    teacher_margin,
)
from rkd_engine.training.runs import RunDir, atomic_write, derive_seed
from rkd_engine.training.schedule import WarmupStepDecay, epoch_order, shard, steps_per_epoch

DATA = "synthetic:m=4,d=6,n=40"
TINY = tiny_run(DATA, imbalance=5.0, epochs=3, dro_every=2, checkpoint_every=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return tiny_dataset(DATA, imbalance=5.0, seed=0)


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher, dataset):
    return tiny_teacher(dataset, objective="balanced", **TINY)


def _check_run(path, dataset):
    metrics = json.loads((path / "metrics.json").read_text())
    config = json.loads((path / "config.json").read_text())
    log = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
    assert config["out"] == str(path)
    for split in ("val", "test"):
        rep = metrics[split]
        assert 0.0 <= rep["worst_accuracy"] <= rep["balanced_accuracy"] <= 1.0
        assert len(rep["per_class_recall"]) == dataset.num_classes
    assert any(r["event"] == "train" for r in log) or metrics["steps"] == 0
    model, spec = load_model_file(path)
    assert spec["num_classes"] == dataset.num_classes
    logits = model(dataset.test.x)
    assert logits.shape == (len(dataset.test), dataset.num_classes)
    return metrics, log


@pytest.mark.parametrize("objective", ["standard", "balanced", "robust", "tradeoff"])
def test_teacher_objectives(tmp_path, dataset, objective):
    alpha = 0.5 if objective == "tradeoff" else None
    result = train_teacher(
        TeacherConfig(out=str(tmp_path / "t"), objective=objective, alpha=alpha, **TINY), dataset=dataset, quiet=True
    )
    metrics, log = _check_run(tmp_path / "t", dataset)
    assert result.metrics == metrics
    assert metrics["steps"] == 3 * steps_per_epoch(len(dataset.train), 16)
    prior = torch.tensor(metrics["prior"])
    torch.testing.assert_close(prior, dataset.train_prior, rtol=1e-6, atol=1e-7)
    if objective in ("robust", "tradeoff"):
        weights = torch.tensor(metrics["dro_weights"])
        assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-5)
        assert float((weights - 0.25).abs().max()) > 1e-4, "the DRO weights never moved"
        assert any("dro_weights" in r for r in log if r["event"] == "eval")
    else:
        assert metrics["dro_weights"] is None


@pytest.mark.parametrize(
    ("method", "objective", "extra"),
    [
        ("distill", "standard", {}),
        ("distill", "balanced", {}),
        ("distill", "robust", {}),
        ("distill", "robust", {"val_labels": "onehot"}),
        ("distill", "tradeoff", {"alpha": 0.25, "gamma": 3.0}),
        ("hinton", "standard", {"teacher_weight": 0.3, "tau": 4.0}),
        ("post-shift", "standard", {}),
        ("group-dro", "standard", {}),
        ("ada-alpha", "balanced", {}),
        ("ada-margin", "standard", {"margin_scale": 2.0}),
    ],
)
def test_student_methods(tmp_path, dataset, teacher_dir, method, objective, extra):
    out = tmp_path / "s"
    cfg = StudentConfig(out=str(out), teacher=str(teacher_dir), method=method, objective=objective, **{**TINY, **extra})
    train_student(cfg, dataset=dataset, quiet=True)
    metrics, _ = _check_run(out, dataset)
    assert metrics["method"] == method
    if method == "group-dro":
        assert "teacher_calibration" not in metrics
        weights = torch.tensor(metrics["dro_weights"])
        assert float((weights - 0.25).abs().max()) > 1e-5
    else:
        cal = metrics["teacher_calibration"]
        assert cal["test"]["max"] >= cal["test"]["mean"] >= 0
    if method == "post-shift":
        assert metrics["steps"] == 0 and len(metrics["post_shift"]["log_shift"]) == dataset.num_classes


def test_student_prior_is_teacher_marginal(tmp_path, dataset, teacher_dir):
    """pi_t = mass / n with a = 1: the mean teacher probability at temperature gamma on the training set."""
    cfg = StudentConfig(out=str(tmp_path / "s"), teacher=str(teacher_dir), gamma=2.0, **TINY)
    metrics = train_student(cfg, dataset=dataset, quiet=True).metrics
    teacher, _ = load_model_file(teacher_dir)
    with torch.no_grad():
        expected = torch.softmax(teacher(dataset.train.x) / 2.0, dim=1).mean(0)
    torch.testing.assert_close(torch.tensor(metrics["prior"]), expected, rtol=1e-5, atol=1e-6)


def test_hinton_prior_mixes_labels_and_teacher(tmp_path, dataset, teacher_dir):
    cfg = StudentConfig(out=str(tmp_path / "s"), teacher=str(teacher_dir), method="hinton", teacher_weight=0.25, **TINY)
    metrics = train_student(cfg, dataset=dataset, quiet=True).metrics
    teacher, _ = load_model_file(teacher_dir)
    with torch.no_grad():
        pi_t = torch.softmax(teacher(dataset.train.x), dim=1).mean(0)
    expected = 0.75 * dataset.train_prior + 0.25 * pi_t
    torch.testing.assert_close(torch.tensor(metrics["prior"]), expected, rtol=1e-5, atol=1e-6)


def test_student_inherits_teacher_data(tmp_path, teacher_dir):
    cfg = engine.resolve_config(StudentConfig(out=str(tmp_path / "s"), teacher=str(teacher_dir)))
    assert (cfg.data, cfg.imbalance, cfg.data_seed, cfg.model) == (DATA, 5.0, 0, "mlp")
    assert cfg.model_options == {"hidden_sizes": [16]}
    with pytest.raises(ConfigError, match="--imbalance .* differs from the teacher"):
        engine.resolve_config(StudentConfig(out=str(tmp_path / "s"), teacher=str(teacher_dir), imbalance=20.0))


def test_teacher_cached_only_without_augmentation(tmp_path, digits, digits_teacher, monkeypatch):
    """Teacher outputs are cached when the inputs never change, computed per batch under augmentation."""
    tdir = digits_teacher
    base = dict(TINY, data="digits", imbalance=10.0, epochs=1)
    seen = {}
    original = engine._Run._train

    def spy(self):
        seen[self.cfg.augment] = (self.augment, self.method.g_train is not None)
        original(self)

    monkeypatch.setattr(engine._Run, "_train", spy)
    for mode in ("auto", "on"):
        cfg = StudentConfig(out=str(tmp_path / mode), teacher=str(tdir), augment=mode, **{**base, "data": None})
        train_student(cfg, dataset=digits, quiet=True)
    assert seen["auto"] == (None, True)  # digits: no augmentation, teacher outputs cached
    assert seen["on"][0] is not None and seen["on"][1] is False


def test_config_conversion_and_validation():
    cfg = merge(TeacherConfig, {"epochs": "5", "lr-decay-at": "0.3,0.6", "model_options": ["hidden_sizes=[8, 8]"]})
    assert cfg.epochs == 5 and cfg.lr_decay_at == (0.3, 0.6) and cfg.model_options == {"hidden_sizes": [8, 8]}
    assert convert("alpha", "optfloat", "none") is None
    for bad, message in [
        ({"epochs": 0}, "--epochs must be an integer >= 1"),
        ({"objective": "tradeoff"}, "--alpha must be a number in"),
        ({"objective": "robust", "alpha": 0.5}, "--alpha is only used"),
        ({"lr_decay_at": (0.8, 0.2)}, "--lr-decay-at must be increasing"),
        ({"momentum": 1.0}, "--momentum"),
        ({"augment": "maybe"}, "--augment must be one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(TeacherConfig(**bad))
    with pytest.raises(ConfigError, match="--epochs must be an integer"):
        merge(TeacherConfig, {"epochs": "many"})
    with pytest.raises(ConfigError, match="unknown option 'epoch'"):
        merge(TeacherConfig, {"epoch": 3})
    with pytest.raises(ConfigError, match="--teacher-weight is used by --method hinton"):
        validate(StudentConfig(teacher="t", teacher_weight=0.5))
    with pytest.raises(ConfigError, match="its own worst-class objective"):
        validate(StudentConfig(method="group-dro", objective="robust"))
    assert semantic_diff({"epochs": 3, "device": "cpu"}, {"epochs": 3, "device": "cuda"}) == []
    assert semantic_diff({"epochs": 3}, {"epochs": 4}) == ["epochs"]


def test_batch_order_is_pure_and_complete():
    a = epoch_order(7, 3, 50, 16)
    assert torch.equal(a, epoch_order(7, 3, 50, 16))
    assert not torch.equal(a, epoch_order(7, 4, 50, 16))
    assert a.shape == (4, 16)
    assert set(a.flatten().tolist()) == set(range(50))  # every row visited; the last batch filled up
    rows = torch.arange(8)
    assert torch.equal(torch.cat([shard(rows, r, 2) for r in range(2)]).sort().values, rows)
    assert derive_seed(1, "x") == derive_seed(1, "x") != derive_seed(1, "y")


def test_warmup_step_decay():
    f = WarmupStepDecay(4, [10, 15], 0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == 1.0 and math.isclose(f(10), 0.1) and math.isclose(f(15), 0.01)


def test_teacher_margin_and_ada_mappings():
    g = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    y = torch.tensor([0, 0])
    mu = teacher_margin(g, y)
    torch.testing.assert_close(mu, torch.tensor([0.7 - 0.15, 0.1 - 0.45]))
    torch.testing.assert_close(ada_alpha_weight(mu), torch.tensor([0.55, 0.0]))
    f = torch.zeros(2, 3)
    shifted = ada_margin_shift(f, y, mu, 2.0)
    torch.testing.assert_close(shifted, torch.tensor([[-0.9, 0.0, 0.0], [-2.0, 0.0, 0.0]]))


def test_post_shift_improves_worst_class():
    """A teacher biased towards class 0: the searched shift raises worst-class validation accuracy."""
    gen = torch.Generator().manual_seed(0)
    m, n = 3, 300
    y = torch.arange(m).repeat_interleave(n)
    g = torch.randn(m * n, m, generator=gen) + 2.0 * torch.nn.functional.one_hot(y, m)
    g[:, 0] += 2.5
    prior = torch.tensor([0.8, 0.1, 0.1])
    log_shift, history = post_shift_search(g, y, prior, step_size=0.5, iterations=60)
    pred_plain = g.argmax(1)
    pred_shift = (torch.log_softmax(g, 1) + log_shift).argmax(1)

    def worst(pred):
        return min(float((pred[y == c] == c).float().mean()) for c in range(m))

    assert worst(pred_shift) > worst(pred_plain) + 0.2
    assert math.isclose(worst(pred_shift), max(h["worst"] for h in history), rel_tol=1e-6)


def test_pareto_front():
    points = [(90.0, 50.0), (85.0, 70.0), (80.0, 60.0), (95.0, 10.0)]
    assert pareto_front(points) == [1, 0, 3]


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda fh: fh.write(b"old"))

    def boom(fh):
        fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, boom)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_corrupt_and_foreign_checkpoints(tmp_path, dataset):
    out = tmp_path / "t"
    cfg = TeacherConfig(out=str(out), **TINY)
    train_teacher(cfg, dataset=dataset, quiet=True)
    config = json.loads((out / "config.json").read_text())
    run = RunDir(out)
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        run.load_checkpoint(config)
    (out / "metrics.json").unlink()  # unfinished: a finished run is not resumed at all
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train_teacher(cfg, dataset=dataset, resume=True, quiet=True)
    torch.save({"something": "else"}, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not an rkd checkpoint"):
        run.load_checkpoint(config)
    with pytest.raises(ConfigError, match=r"cannot resume .*\(--epochs 3 -> 4\)"):
        train_teacher(TeacherConfig(out=str(out), **{**TINY, "epochs": 4}), dataset=dataset, resume=True, quiet=True)


def test_existing_run_dir_needs_resume_or_overwrite(tmp_path, dataset):
    from rkd_engine.training import RunDirError

    cfg = TeacherConfig(out=str(tmp_path / "t"), **{**TINY, "epochs": 1})
    first = train_teacher(cfg, dataset=dataset, quiet=True)
    with pytest.raises(RunDirError, match="--resume"):
        train_teacher(cfg, dataset=dataset, quiet=True)
    again = train_teacher(cfg, dataset=dataset, overwrite=True, quiet=True)
    assert again.metrics == first.metrics  # same seed, same result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_teacher_and_every_student_method(tmp_path):
    """Every method on the GPU, with augmentation (teacher outputs on the fly) and DRO updates on device."""
    digits = load_dataset("digits", imbalance=10.0, seed=0)
    base = {**TINY, "data": "digits", "imbalance": 10.0, "device": "cuda", "augment": "on", "checkpoint_every": 5}
    tdir = tmp_path / "t"
    teacher = train_teacher(TeacherConfig(out=str(tdir), objective="robust", **base), dataset=digits, quiet=True)
    assert teacher.metrics["test"]["accuracy"] > 0.3
    for method, objective in [
        ("distill", "robust"),
        ("hinton", "balanced"),
        ("post-shift", "standard"),
        ("group-dro", "standard"),
        ("ada-alpha", "tradeoff"),
        ("ada-margin", "standard"),
    ]:
        cfg = StudentConfig(
            out=str(tmp_path / method),
            teacher=str(tdir),
            method=method,
            objective=objective,
            alpha=0.5 if objective == "tradeoff" else None,
            **{**base, "data": None},
        )
        metrics = train_student(cfg, dataset=digits, quiet=True).metrics
        assert 0 <= metrics["test"]["worst_accuracy"] <= metrics["test"]["accuracy"] <= 1, method


def test_every_method_is_one_registered_class_and_the_loop_never_names_one():
    """``--method`` names and ``rkd teacher`` map onto ``METHODS``; ``_Run`` has no branch on a method's name."""
    import inspect

    from rkd_engine.training.config import STUDENT_METHODS
    from rkd_engine.training.methods import METHODS, Method

    assert set(METHODS) == {"teacher", *STUDENT_METHODS}
    assert all(issubclass(cls, Method) and cls.name == name for name, cls in METHODS.items())
    source = inspect.getsource(engine._Run)
    assert len(source.splitlines()) < 250
    for name in METHODS:
        assert f'"{name}"' not in source, name
    assert "self.student" not in source and "isinstance(self.cfg, StudentConfig)" not in source
