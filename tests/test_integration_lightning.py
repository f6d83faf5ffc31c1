"""The Lightning adapter on the CPU with tiny models: training, DRO, logged metrics, checkpoints."""

from __future__ import annotations

import csv

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from torch.utils.data import DataLoader, TensorDataset

from rkd_engine import RobustDistillationLoss
from rkd_engine.data import load_dataset
from rkd_engine.integrations.lightning import RobustDistillationModule

M = 4


def _data():
    return load_dataset("synthetic:m=4,d=8,n=200,sep=2.5", imbalance=20.0, seed=0)


def _mlp(d: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.ReLU(), torch.nn.Linear(32, M))


def _teacher(data) -> torch.nn.Module:
    teacher = _mlp(data.input_shape[0], 1)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(teacher(data.train.x), data.train.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.eval()


def _fit(tmp_path, data, teacher, objective, epochs=6, **kw):
    with torch.no_grad():
        prior = torch.softmax(teacher(data.train.x), -1).mean(0)
    loss = RobustDistillationLoss(M, objective, prior=prior, step_size=0.5)
    module = RobustDistillationModule(
        _mlp(data.input_shape[0], 0),
        teacher,
        loss,
        dro_data=(data.val.x, data.val.y),
        dro_every=4,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.CSVLogger(str(tmp_path), name=objective),
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        **kw,
    )
    train = DataLoader(TensorDataset(data.train.x, data.train.y), batch_size=32, shuffle=True)
    test = DataLoader(TensorDataset(data.test.x, data.test.y), batch_size=256)
    trainer.fit(module, train, test)
    return module, trainer


def test_lightning_robust_student_logs_metrics_and_checkpoints_dro_state(tmp_path):
    pl.seed_everything(0)
    data = _data()
    teacher = _teacher(data)
    module, trainer = _fit(tmp_path, data, teacher, "robust")
    schedule = module.dro_schedule
    assert schedule.num_updates == trainer.global_step // 4
    weights = module.loss.dro.weights
    assert not torch.allclose(weights, torch.full((M,), 1 / M))  # lambda moved
    # Metrics went through Lightning's logger.
    rows = list(csv.DictReader(open(next((tmp_path / "robust").rglob("metrics.csv")))))
    keys = set().union(*(r.keys() for r in rows))
    assert {"val/accuracy", "val/worst_accuracy", "val/class_3_accuracy", "dro/weight_0", "train/loss_epoch"} <= keys
    # The checkpoint carries the DRO state, not the teacher, and a fresh module restores it.
    ckpt_path = next((tmp_path / "robust").rglob("*.ckpt"))
    ckpt = torch.load(ckpt_path, weights_only=False)
    torch.testing.assert_close(ckpt["rkd_dro"]["dro"]["weights"], weights)
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])
    fresh = RobustDistillationModule(
        _mlp(data.input_shape[0], 5),
        teacher,
        RobustDistillationLoss(M, "robust"),
        dro_data=(data.val.x, data.val.y),
    )
    fresh.load_state_dict(ckpt["state_dict"])
    fresh.on_load_checkpoint(ckpt)
    torch.testing.assert_close(fresh.loss.dro.weights, weights)
    assert fresh._pending_dro_state["num_updates"] == schedule.num_updates


def test_lightning_bad_arguments():
    teacher = _mlp(8, 1)
    with pytest.raises(ValueError, match="dro_data"):
        RobustDistillationModule(_mlp(8, 0), teacher, RobustDistillationLoss(M, "robust"))
    with pytest.raises(ValueError, match="teacher_weight"):
        RobustDistillationModule(_mlp(8, 0), teacher, RobustDistillationLoss(M, "standard"), teacher_weight=-1)
