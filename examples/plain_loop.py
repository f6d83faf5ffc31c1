"""Robust distillation in your own plain PyTorch loop: the loss and ``ClassDRO``, no rkd engine.

Synthetic long-tailed data (a Gaussian mixture, class 0 the head, imbalance 50), then:
  1. a teacher trained on labels with the balanced objective (``RobustDistillationLoss``, c = 1 / pi);
  2. a student distilled with the standard objective (c = 1) as the baseline;
  3. a student distilled with the robust objective, written out by hand with ``distill_loss`` and
     ``ClassDRO``: c = lambda / pi_t, lambda updated every K steps from the student's per-class 0-1
     error on a teacher-labelled validation set (docs/dro.md; no validation labels used).
Prints the average and worst-class test accuracy of each. Runs in a few seconds on a CPU:

    python examples/plain_loop.py
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rkd_engine import ClassDRO, RobustDistillationLoss, distill_loss

M, D = 8, 16  # classes, features
IMBALANCE = 50.0
STEPS, BATCH, K = 600, 64, 8  # training steps, batch size, steps between DRO updates


def make_data(gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Long-tailed training set (n_y = 400 * rho^(-y/(m-1))), balanced validation and test sets."""
    means = torch.randn(M, D, generator=gen) * 0.8

    def sample(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        x = means[y] + torch.randn(len(y), D, generator=gen)
        return x, y

    train_counts = [max(1, math.floor(400 * IMBALANCE ** (-c / (M - 1)))) for c in range(M)]
    return {"train": sample(train_counts), "val": sample([50] * M), "test": sample([200] * M)}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, M))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Average and worst-class accuracy (the test set is balanced)."""
    with torch.no_grad():
        pred = model(x).argmax(1)
    recall = torch.stack([(pred[y == c] == c).float().mean() for c in range(M)])
    return float(recall.mean()), float(recall.min())


def train(model: nn.Module, step_fn, x: torch.Tensor, gen: torch.Generator) -> None:
    """SGD with momentum and a cosine learning rate; ``step_fn(model, rows, step)`` returns the loss."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    for step in range(STEPS):
        rows = torch.randint(0, x.shape[0], (BATCH,), generator=gen)
        loss = step_fn(model, rows, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = make_data(gen)
    x, y = data["train"]
    x_val, _ = data["val"]  # validation labels are never used below
    x_test, y_test = data["test"]
    prior = torch.bincount(y, minlength=M).float() / len(y)

    # 1. Teacher: the balanced objective on labels.
    teacher = mlp()
    teacher_loss = RobustDistillationLoss(M, "balanced", prior=prior)
    train(teacher, lambda model, rows, step: teacher_loss(model(x[rows]), labels=y[rows]).loss, x, gen)
    teacher.eval()
    with torch.no_grad():
        g_train, g_val = teacher(x), teacher(x_val)
    # The student's prior is the teacher marginal pi_t = mass / n (mass with a = 1 on the training set).
    pi_t = distill_loss(g_train, teacher_logits=g_train).mass / len(y)

    # 2. Baseline: standard distillation, q = p, c = 1.
    standard = mlp()
    train(standard, lambda model, rows, step: distill_loss(model(x[rows]), teacher_logits=g_train[rows]).loss, x, gen)

    # 3. Robust distillation by hand: c = lambda / pi_t from ClassDRO, lambda from validation error.
    robust = mlp()
    dro = ClassDRO(M, alpha=1.0, step_size=0.1, prior=pi_t)

    def robust_step(model: nn.Module, rows: torch.Tensor, step: int) -> torch.Tensor:
        out = distill_loss(model(x[rows]), teacher_logits=g_train[rows], class_costs=dro.costs, validate=False)
        if (step + 1) % K == 0:
            with torch.no_grad():  # per-class 0-1 error against the teacher's labels p on validation
                val = distill_loss(model(x_val), teacher_logits=g_val, validate=False)
            dro.update(val.error, val.mass)  # lambda_j <- lambda_j exp(eta R_j), on device, no host sync
        return out.loss

    train(robust, robust_step, x, gen)

    print(f"training counts per class: {torch.bincount(y, minlength=M).tolist()}")
    for name, model in (("teacher (balanced)", teacher), ("standard student", standard), ("robust student", robust)):
        avg, worst = accuracy(model, x_test, y_test)
        print(f"{name:20s} average {100 * avg:5.1f}%  worst-class {100 * worst:5.1f}%")
    print("final lambda:", [round(v, 3) for v in dro.weights.tolist()])


if __name__ == "__main__":
    main()
