"""Reliability of the Python API (issue 10): each test failed before its fix and passes now.

DRO state that never reaches a zero or infinite cost, stays float32 under ``.half()`` and ignores
NaN statistics; argument checks of ``RobustDistillationLoss`` at construction; run directories that
``overwrite`` only what rkd wrote; failed starts and finished runs; divergence; data fingerprints;
load errors that advise deleting only what is corrupt.
"""

from __future__ import annotations

import datetime
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_run

from rkd_engine.dro import LAMBDA_FLOOR, ClassDRO
from rkd_engine.errors import DataError, TrainingDiverged, UserError
from rkd_engine.losses import RobustDistillationLoss
from rkd_engine.training import StudentConfig, TeacherConfig, train_student, train_teacher
from rkd_engine.training.config import ConfigError, load_config_file
from rkd_engine.training.evaluation import evaluate_run, write_eval
from rkd_engine.training.runs import RUN_MARKER, CheckpointError, RunDir, RunDirError, load_torch_file

TINY = tiny_run(imbalance=3.0, hidden=8, epochs=2, checkpoint_every=4, eval_every=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def npz_data(tmp_path):
    """A small npz data source (4 classes, 6 features) and its spec."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    x = rng.normal(size=(120, 6)).astype(np.float32) + y[:, None]
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y)
    return path, f"npz:{path}"


def _teacher(tmp_path, data: str, name: str = "t", **kw) -> TeacherConfig:
    return TeacherConfig(out=str(tmp_path / name), data=data, **{**TINY, **kw})


# ------------------------------------------------------------------------------------------ DRO (2, 17, 20, 21)
def _unequal_errors(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.linspace(0.0, 1.0, m), torch.ones(m)


@pytest.mark.parametrize("step_size", [1.0, 10.0, 1e6])
def test_robust_costs_never_zero_or_infinite(step_size):
    """Item 2: lambda underflowed to 0 after ~100 updates at step 1: cost 0, log cost -inf, NaN loss."""
    torch.manual_seed(0)
    loss = RobustDistillationLoss(10, "robust", step_size=step_size)
    error, mass = _unequal_errors(10)
    for _ in range(400):
        loss.update_weights(error, mass)
    costs = loss.costs
    assert torch.isfinite(costs).all() and (costs > 0).all()
    assert torch.isfinite(costs.log()).all()
    assert (loss.dro.weights >= LAMBDA_FLOOR / 10 * 0.99).all()
    assert math.isclose(float(loss.dro.weights.sum()), 1.0, rel_tol=1e-5)
    f, y = torch.randn(32, 10), torch.randint(0, 10, (32,))
    assert torch.isfinite(loss(f, labels=y, validate=True).loss)


def test_large_group_dro_risk_does_not_overflow():
    dro = ClassDRO(3, step_size=50.0)
    dro.update(torch.tensor([1e3, 0.0, 1.0]), torch.ones(3))  # exp(5e4) overflows without log space
    assert torch.isfinite(dro.weights).all() and torch.isfinite(dro.costs).all()
    assert dro.weights.argmax() == 0


def test_log_space_update_matches_the_reference_in_range():
    from rkd_engine import reference

    torch.manual_seed(1)
    weights = torch.full((6,), 1 / 6)
    dro = ClassDRO(6, alpha=0.7, step_size=0.3)
    for _ in range(20):
        error, mass = torch.rand(6), torch.tensor([3.0, 0.0, 1.0, 2.0, 5.0, 1.0])
        weights = reference.dro_update(weights, error * mass, mass, alpha=0.7, step_size=0.3)
        dro.update(error * mass, mass)
    torch.testing.assert_close(dro.weights, weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_dro_state_stays_float32_under_dtype_casts(cast):
    """Item 17: .half() saturated the counter at 2048, moved lambda off the simplex, overflowed costs."""
    loss = getattr(RobustDistillationLoss(4, "robust", class_weights=torch.ones(4) / 3), cast)()
    assert loss.dro.weights.dtype == torch.float32 and loss.dro.prior.dtype == torch.float32
    assert loss.dro.num_updates.dtype == torch.int64 and loss.class_weights.dtype == torch.float32
    error, mass = _unequal_errors(4)
    for _ in range(2100):
        loss.update_weights(error * 0.01, mass)
    assert int(loss.dro.num_updates) == 2100
    assert math.isclose(float(loss.dro.weights.sum()), 1.0, rel_tol=1e-6)
    assert torch.isfinite(loss.costs).all()


def test_nan_statistics_do_not_poison_lambda():
    """Item 20: one NaN error made lambda NaN forever."""
    dro = ClassDRO(3)
    dro.update(torch.tensor([1.0, 0.0, 0.0]), torch.ones(3))
    before = dro.weights.clone()
    dro.update(torch.tensor([float("nan"), 0.0, 0.0]), torch.ones(3))
    dro.update(torch.tensor([0.0, float("inf"), 0.0]), torch.ones(3))
    torch.testing.assert_close(dro.weights, before, rtol=0, atol=0)
    assert int(dro.num_updates) == 1
    dro.update(torch.tensor([0.0, 1.0, 0.0]), torch.ones(3))
    assert torch.isfinite(dro.weights).all() and int(dro.num_updates) == 2


def test_extreme_priors():
    """Item 20: a prior of 1e-45 passed (infinite cost); all 1e38 overflowed the normalisation."""
    with pytest.raises(ValueError, match="smallest normalised class prior"):
        ClassDRO(3, prior=torch.tensor([1.0, 1.0, 1e-45]))
    dro = ClassDRO(3, prior=torch.full((3,), 1e38))
    torch.testing.assert_close(dro.prior, torch.full((3,), 1 / 3))
    assert torch.isfinite(dro.costs).all()


def test_robust_state_refused_by_a_tradeoff_module():
    """Item 21: loading a robust state set a trade-off module's alpha to 1 silently."""
    robust = RobustDistillationLoss(4, "robust")
    tradeoff = RobustDistillationLoss(4, "tradeoff", alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        tradeoff.load_state_dict(robust.state_dict())
    assert tradeoff.dro.alpha == 0.5
    same = RobustDistillationLoss(4, "tradeoff", alpha=0.5)
    same.load_state_dict(tradeoff.state_dict())  # the same objective loads


# ----------------------------------------------------------------------------------------- loss arguments (19)
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"class_weights": torch.tensor([1.0, -1.0, 1.0])}, ValueError, "class_weights must be finite and >= 0"),
        ({"class_weights": torch.tensor([1.0, float("nan"), 1.0])}, ValueError, "class_weights must be finite"),
        ({"class_weights": [1.0, 1.0, 1.0]}, TypeError, "class_weights must be a torch.Tensor"),
        ({"teacher_weight": 1.5}, ValueError, r"teacher_weight must be a number in \[0, 1\]"),
        ({"teacher_weight": "half"}, TypeError, "teacher_weight must be a number"),
    ],
)
def test_loss_arguments_checked_at_construction(kwargs, error, match):
    """Item 19: these were accepted (and crashed, or gave nonsense, at the first forward)."""
    with pytest.raises(error, match=match):
        RobustDistillationLoss(3, **kwargs)


def test_loss_refuses_logits_of_another_class_count():
    loss = RobustDistillationLoss(3, "balanced")
    with pytest.raises(ValueError, match="num_classes=3"):
        loss(torch.randn(4, 5), labels=torch.zeros(4, dtype=torch.long))


def test_numpy_scalars_accepted():
    """Item 18: numpy scalars were rejected as temperature or num_classes."""
    loss = RobustDistillationLoss(np.int64(3), "tradeoff", alpha=np.float32(0.5), temperature=np.float64(2.0))
    assert loss.num_classes == 3 and loss.temperature == 2.0
    assert ClassDRO(np.int32(4)).num_classes == 4


# ------------------------------------------------------------------------------------- run directories (1, 4, 15, 16)
def test_overwrite_refuses_a_directory_rkd_did_not_create(tmp_path, npz_data):
    """Item 4: --overwrite deleted plots/, eval*.json and config.json of any directory."""
    _, data = npz_data
    mine = tmp_path / "t"
    (mine / "plots").mkdir(parents=True)
    (mine / "plots" / "figure.png").write_bytes(b"png")
    (mine / "eval-notes.json").write_text("{}")
    (mine / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match="did not create"):
        train_teacher(_teacher(tmp_path, data), overwrite=True, quiet=True)
    assert (mine / "plots" / "figure.png").read_bytes() == b"png"
    assert (mine / "eval-notes.json").exists() and (mine / "config.json").read_text() == "{}"


def test_overwrite_of_a_run_deletes_only_what_rkd_wrote(tmp_path, npz_data):
    _, data = npz_data
    cfg = _teacher(tmp_path, data)
    train_teacher(cfg, quiet=True)
    out = tmp_path / "t"
    assert (out / RUN_MARKER).is_file()
    write_eval(out, evaluate_run(out, write=False))  # registered in the marker
    (out / "eval-mine.json").write_text("{}")  # the user's, same pattern
    (out / "notes.txt").write_text("keep me")
    train_teacher(cfg, overwrite=True, quiet=True)
    assert not (out / "eval.json").exists()
    assert (out / "eval-mine.json").exists() and (out / "notes.txt").read_text() == "keep me"


def test_failed_start_leaves_nothing_that_blocks_the_fix(tmp_path, npz_data):
    """Item 15: a bad backend or model option left a directory: 'already exists', then 'different options'."""
    _, data = npz_data
    out = tmp_path / "t"
    with pytest.raises(ConfigError, match="--model mlp"):
        train_teacher(_teacher(tmp_path, data, model_options={"bogus": 1}), quiet=True)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--backend cuda"):
            train_teacher(_teacher(tmp_path, data, backend="cuda"), quiet=True)
    assert not out.exists()
    # A run that started but saved nothing (killed before its first checkpoint) is replaced, with
    # other options, by a plain start and by --resume.
    RunDir(out).create({"epochs": 99}, overwrite=False)
    train_teacher(_teacher(tmp_path, data), quiet=True)
    assert json.loads((out / "config.json").read_text())["epochs"] == TINY["epochs"]


def test_resume_of_a_finished_run_touches_nothing(tmp_path, npz_data):
    """Item 16: --resume of a finished run without checkpoint retrained it and deleted its eval files."""
    _, data = npz_data
    cfg = _teacher(tmp_path, data)
    first = train_teacher(cfg, quiet=True)
    out = tmp_path / "t"
    write_eval(out, evaluate_run(out, write=False))
    (out / "checkpoint.pt").unlink()
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    again = train_teacher(cfg, resume=True, quiet=True)
    assert again.metrics == first.metrics
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_good_file_on_a_missing_device_is_not_called_corrupt(tmp_path):
    """Item 1: every load error was 'corrupt or truncated ... delete it'."""
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError) as info:
        load_torch_file(path, "cuda", what="model file")
    assert "corrupt" not in str(info.value) and "delete" not in str(info.value) and "CUDA" in str(info.value)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_torch_file(path, "cpu", what="model file")


def test_foreign_pickle_not_called_corrupt(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"x": datetime.date(2020, 1, 1)}, path)  # a global rkd never writes
    with pytest.raises(CheckpointError, match="not an rkd file") as info:
        load_torch_file(path, "cpu", what="checkpoint")
    assert "delete" not in str(info.value)


# --------------------------------------------------------------------------------------------- divergence (14)
def test_divergence_stops_at_the_next_logging_point_and_keeps_the_checkpoint(tmp_path, npz_data):
    """Item 14: a NaN loss trained on until the next evaluation, which failed with an unrelated message."""
    _, data = npz_data
    cfg = _teacher(tmp_path, data, lr=1e30, momentum=0.0, warmup_epochs=0.0, epochs=3)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+.*lower --lr"):
        train_teacher(cfg, quiet=True)
    out = tmp_path / "t"
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
    if (out / "checkpoint.pt").exists():  # any checkpoint that was kept holds finite weights
        state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in state.values())
    assert isinstance(TrainingDiverged("x"), UserError)


# ----------------------------------------------------------------------------------------- fingerprints (24)
def test_replaced_data_file_is_noticed(tmp_path, npz_data):
    """Item 24: a replaced npz was used silently by students, eval and resume."""
    path, data = npz_data
    teacher = train_teacher(_teacher(tmp_path, data, checkpoint_every=0), quiet=True)
    assert json.loads((tmp_path / "t" / "data.json").read_text())["sha256"]
    with np.load(path) as arrays:
        x, y = arrays["x"], arrays["y"]
    np.savez(path, x=x + 1.0, y=y)  # same shapes, other values
    with pytest.raises(ConfigError, match="changed since the teacher"):
        train_student(StudentConfig(teacher=str(teacher.path), out=str(tmp_path / "s"), epochs=1), quiet=True)
    with pytest.raises(DataError, match="changed since"):
        evaluate_run(teacher.path, write=False)
    (tmp_path / "t" / "metrics.json").unlink()
    (tmp_path / "t" / "model.pt").unlink()
    with pytest.raises(RunDirError, match="changed since the run started"):
        train_teacher(_teacher(tmp_path, data, checkpoint_every=0), resume=True, quiet=True)


# ------------------------------------------------------------------------------------------- low items (25)
def test_duplicate_config_keys_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 2\nlr: 0.1\nepochs: 3\n")
    with pytest.raises(ConfigError, match="'epochs' is given twice"):
        load_config_file(path)
    path = tmp_path / "c.json"
    path.write_text('{"epochs": 2, "epochs": 3}')
    with pytest.raises(ConfigError, match="given twice"):
        load_config_file(path)


def test_sweep_workers_must_be_whole():
    from rkd_engine.training.sweep import load_spec

    with pytest.raises(ConfigError, match="workers must be an integer"):
        load_spec(None, {"workers": 2.7})
    with pytest.raises(ConfigError, match="baselines must be"):
        load_spec(None, {"baselines": 5})


def test_checkpoint_position_beyond_the_epoch_refused(tmp_path, npz_data):
    _, data = npz_data
    cfg = _teacher(tmp_path, data, epochs=3)
    train_teacher(cfg, quiet=True)
    out = tmp_path / "t"
    (out / "metrics.json").unlink()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    ck["batch"] = 10_000
    torch.save(ck, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a position of this run"):
        train_teacher(cfg, resume=True, quiet=True)


def test_binary_sweep_json_names_the_file(tmp_path):
    """Item 18: a binary sweep.json was an error that did not name the file."""
    from rkd_engine.training.sweep import _check_stored, load_spec

    (tmp_path / "sweep.json").write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match=r"sweep\.json is not valid JSON"):
        _check_stored(tmp_path, load_spec(None, {}))


def test_teacher_weight_tensor_of_one_kind_needs_only_that_side():
    """A (B,) ``teacher_weight`` of all ones needs no labels, all zeros no teacher (issue: refused before)."""
    from rkd_engine import distill_loss

    gen = torch.Generator().manual_seed(0)
    f = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=gen)
    ones, zeros = torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    want = distill_loss(f, teacher_logits=g, backend="reference").loss
    assert torch.allclose(distill_loss(f, teacher_logits=g, teacher_weight=ones, backend="reference").loss, want)
    want = distill_loss(f, labels=y, backend="reference").loss
    assert torch.allclose(distill_loss(f, labels=y, teacher_weight=zeros, backend="reference").loss, want)
    half = torch.full((6,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="teacher_weight < 1 needs labels"):
        distill_loss(f, teacher_logits=g, teacher_weight=half, backend="reference")
    with pytest.raises(ValueError, match="teacher_weight > 0 needs teacher_logits"):
        distill_loss(f, labels=y, teacher_weight=half, backend="reference")
