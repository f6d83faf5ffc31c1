"""The DRO weight update of docs/dro.md."""

from __future__ import annotations

import math

import pytest
import torch

from rkd_engine import ClassDRO, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_hand_worked_step(device):
    # lambda = (1/3, 1/3, 1/3), R = (0.5, 0, 1), eta = 0.1, alpha = 1:
    # lambda_j ∝ exp(0.1 R_j) = (e^0.05, 1, e^0.1) / (e^0.05 + 1 + e^0.1)
    dro = ClassDRO(3, alpha=1.0, step_size=0.1).to(device)
    dro.update(torch.tensor([1.0, 0.0, 2.0], device=device), torch.tensor([2.0, 3.0, 2.0], device=device))
    z = math.exp(0.05) + 1 + math.exp(0.1)
    expected = torch.tensor([math.exp(0.05) / z, 1 / z, math.exp(0.1) / z])
    torch.testing.assert_close(dro.weights.cpu(), expected)
    torch.testing.assert_close(dro.costs.cpu(), expected * 3)  # uniform prior: c = beta / (1/3)


@pytest.mark.parametrize("device", DEVICES)
def test_stays_on_simplex_and_absent_classes_keep_weight(device):
    gen = torch.Generator().manual_seed(0)
    dro = ClassDRO(6, alpha=0.7, step_size=0.5).to(device)
    for _ in range(50):
        mass = (torch.rand(6, generator=gen) * 10).to(device)
        mass[2] = 0.0
        error = mass * torch.rand(6, generator=gen).to(device)
        before = dro.weights[2].clone()
        dro.update(error, mass)
        assert dro.weights[2] == before
        assert torch.all(dro.weights > 0)
        torch.testing.assert_close(dro.weights.sum().cpu(), torch.tensor(1.0))
        assert torch.isfinite(dro.weights).all()
    torch.testing.assert_close(dro.beta.sum().cpu(), torch.tensor(1.0))


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_zero_gives_uniform_beta(device):
    dro = ClassDRO(4, alpha=0.0).to(device)
    dro.update(torch.tensor([5.0, 0.0, 1.0, 2.0], device=device), torch.ones(4, device=device))
    torch.testing.assert_close(dro.beta.cpu(), torch.full((4,), 0.25))


@pytest.mark.parametrize("device", DEVICES)
def test_all_classes_absent_is_a_no_op(device):
    dro = ClassDRO(3).to(device)
    dro.update(torch.zeros(3, device=device), torch.zeros(3, device=device))
    torch.testing.assert_close(dro.weights.cpu(), torch.full((3,), 1 / 3))


def test_matches_reference_and_tracks_average():
    gen = torch.Generator().manual_seed(1)
    dro = ClassDRO(5, alpha=0.5, step_size=0.2)
    lam, history = dro.weights.clone(), []
    for _ in range(7):
        mass = torch.rand(5, generator=gen) * 3
        error = mass * torch.rand(5, generator=gen)
        dro.update(error, mass)
        lam = reference.dro_update(lam, error, mass, alpha=0.5, step_size=0.2)
        history.append(lam)
        torch.testing.assert_close(dro.weights, lam)
    torch.testing.assert_close(dro.average_weights, torch.stack(history).mean(0))
    assert dro.num_updates.item() == 7
    dro.reset()
    torch.testing.assert_close(dro.weights, torch.full((5,), 0.2))


def test_prior_and_state_dict():
    dro = ClassDRO(3, alpha=0.5, prior=torch.tensor([2.0, 1.0, 1.0]))
    torch.testing.assert_close(dro.prior, torch.tensor([0.5, 0.25, 0.25]))
    dro.update(torch.tensor([1.0, 0.0, 0.0]), torch.ones(3))
    other = ClassDRO(3, alpha=0.1)
    other.load_state_dict(dro.state_dict())
    assert other.alpha == 0.5
    torch.testing.assert_close(other.costs, dro.costs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_classes=0), "num_classes must be an integer >= 1"),
        (dict(num_classes=3, alpha=1.5), r"alpha must lie in \[0, 1\]"),
        (dict(num_classes=3, step_size=0.0), "step_size must be a finite number > 0"),
        (dict(num_classes=3, prior=torch.tensor([1.0, 0.0, 1.0])), "prior must be finite and > 0"),
        (dict(num_classes=3, prior=torch.ones(4)), r"prior must have shape \(3,\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassDRO(**kwargs)


def test_bad_update_arguments():
    dro = ClassDRO(3)
    with pytest.raises(ValueError, match=r"mass must have shape \(3,\)"):
        dro.update(torch.zeros(3), torch.zeros(2))
    with pytest.raises(TypeError, match="risk_numerator must be a torch.Tensor"):
        dro.update([0.0, 0.0, 0.0], torch.zeros(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_steps_with_updates_make_no_host_sync():
    from rkd_engine import RobustDistillationLoss

    device = "cuda"
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = RobustDistillationLoss(10, "tradeoff", alpha=0.5, prior=torch.full((10,), 0.1)).to(device)
    x, t = torch.randn(256, 16, device=device), torch.randn(256, 10, device=device)
    xv, tv = torch.randn(512, 16, device=device), torch.randn(512, 10, device=device)
    for _ in range(2):  # warm-up: lazy initialisation may synchronise once
        loss_fn(model(x), teacher_logits=t).loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(8):
            opt.zero_grad(set_to_none=False)
            out = loss_fn(model(x), teacher_logits=t)
            out.loss.backward()
            opt.step()
            if step % 4 == 3:
                with torch.no_grad():
                    val = loss_fn(model(xv), teacher_logits=tv)
                loss_fn.update_weights(val.error, val.mass)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(loss_fn.dro.weights).all()
    assert not torch.allclose(loss_fn.dro.weights, torch.full((10,), 0.1, device=device))
