"""Robust distillation in PyTorch Lightning: ``RobustDistillationModule`` with a user's own student and teacher.

A small MLP teacher is fitted on a long-tailed Gaussian mixture (rkd's ``synthetic`` source, 20x
imbalance); an MLP student is distilled from it with the robust objective: every 4 optimiser steps the
DRO schedule moves the class weights ``lambda`` from the student's errors on a balanced validation set.
Lightning logs accuracy, worst-class and per-class accuracy and ``lambda`` (here to a CSV file), and its
checkpoints carry the DRO state. About 20 seconds of CPU time (standard: worst class 8%, robust: 57% in one run).

    pip install rkd-engine[lightning]
    python examples/distill_lightning.py
"""

from __future__ import annotations

import tempfile

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from rkd_engine import RobustDistillationLoss
from rkd_engine.data import load_dataset
from rkd_engine.integrations.lightning import RobustDistillationModule


def mlp(d, m, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, m))


def main():
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    data = load_dataset("synthetic:m=5,d=10,n=300,sep=2.5", imbalance=20.0, seed=0)
    d, m = data.input_shape[0], data.num_classes
    teacher = mlp(d, m, 1)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(teacher(data.train.x), data.train.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    with torch.no_grad():
        prior = torch.softmax(teacher(data.train.x), -1).mean(0)  # pi_t, the teacher marginal

    train = DataLoader(TensorDataset(data.train.x, data.train.y), batch_size=32, shuffle=True)
    test = DataLoader(TensorDataset(data.test.x, data.test.y), batch_size=512)
    with tempfile.TemporaryDirectory() as out:
        for objective in ("standard", "robust"):
            module = RobustDistillationModule(
                mlp(d, m, 0),
                teacher,
                RobustDistillationLoss(m, objective, temperature=1.0, prior=prior, step_size=0.5),
                teacher_weight=1.0,  # q = p: the teacher only
                optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
                dro_data=(data.val.x, data.val.y),
                dro_every=4,
            )
            trainer = pl.Trainer(
                max_epochs=8,
                accelerator="cpu",
                devices=1,
                logger=pl.loggers.CSVLogger(out, name=objective),
                default_root_dir=out,
                enable_progress_bar=False,
                enable_model_summary=False,
                log_every_n_steps=5,
            )
            trainer.fit(module, train, test)
            metrics = trainer.callback_metrics
            per_class = " ".join(f"{float(metrics[f'val/class_{j}_accuracy']):.2f}" for j in range(m))
            print(
                f"{objective:>8} student  accuracy {100 * float(metrics['val/accuracy']):.1f}%  "
                f"worst-class {100 * float(metrics['val/worst_accuracy']):.1f}%  per class [{per_class}]"
            )
            if objective == "robust":
                print("final lambda:", [round(w, 3) for w in module.loss.dro.weights.tolist()])


if __name__ == "__main__":
    main()
