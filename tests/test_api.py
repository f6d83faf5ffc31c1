"""Bad input gets a clear ValueError/TypeError naming the argument; the module API behaves as documented."""

from __future__ import annotations

import pytest
import torch

from rkd_engine import ClassDRO, RobustDistillationLoss, distill_loss

INF = float("inf")


def _inputs(rows=4, m=5):
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(rows, m, generator=gen),
        torch.randn(rows, m, generator=gen),
        torch.randint(0, m, (rows,), generator=gen),
    )


def _bad_cases():
    f, g, y = _inputs()
    p = torch.softmax(g, -1)
    return [
        ("student_logits must be a torch.Tensor", dict(student_logits=[[1.0]], labels=y)),
        ("student_logits must have shape", dict(student_logits=f[0], labels=y)),
        ("student_logits must be float16", dict(student_logits=f.long(), labels=y)),
        ("at least one row", dict(student_logits=f[:0], labels=y[:0])),
        ("teacher_logits must have shape", dict(student_logits=f, teacher_logits=g[:, :3])),
        ("teacher_logits must have the dtype", dict(student_logits=f, teacher_logits=g.double())),
        ("labels must have shape", dict(student_logits=f, labels=y[:2])),
        ("labels must be an integer", dict(student_logits=f, labels=y.float())),
        (r"labels must lie in \[0, 5\)", dict(student_logits=f, labels=y + 5)),
        (r"labels must lie in \[0, 5\)", dict(student_logits=f, labels=y - 7)),
        ("temperature must be a finite number > 0", dict(student_logits=f, teacher_logits=g, temperature=0.0)),
        ("temperature must be a finite number > 0", dict(student_logits=f, teacher_logits=g, temperature=INF)),
        ("temperature must be a finite number > 0", dict(student_logits=f, teacher_logits=g, temperature=float("nan"))),
        (
            "student_temperature must be a finite number > 0",
            dict(student_logits=f, teacher_logits=g, student_temperature=-1.0),
        ),
        (
            "class_costs must be > 0",
            dict(student_logits=f, labels=y, class_costs=torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])),
        ),
        (
            "class_costs must be finite",
            dict(student_logits=f, labels=y, class_costs=torch.tensor([1.0, INF, 1.0, 1.0, 1.0])),
        ),
        ("class_costs must have shape", dict(student_logits=f, labels=y, class_costs=torch.ones(4))),
        ("class_weights must be >= 0", dict(student_logits=f, labels=y, class_weights=-torch.ones(5))),
        (
            r"teacher_weight must lie in \[0, 1\]",
            dict(student_logits=f, labels=y, teacher_logits=g, teacher_weight=1.5),
        ),
        (
            r"teacher_weight must lie in \[0, 1\]",
            dict(student_logits=f, labels=y, teacher_logits=g, teacher_weight=torch.full((4,), -0.1)),
        ),
        (
            "teacher_weight must have shape",
            dict(student_logits=f, labels=y, teacher_logits=g, teacher_weight=torch.ones(3)),
        ),
        ("teacher_probs must be >= 0", dict(student_logits=f, teacher_probs=p - 0.5)),
        ("teacher_probs rows must sum to 1", dict(student_logits=f, teacher_probs=p * 0.5)),
        ("teacher_probs contains NaN", dict(student_logits=f, teacher_probs=torch.full_like(p, float("nan")))),
        ("either teacher_logits or teacher_probs, not both", dict(student_logits=f, teacher_logits=g, teacher_probs=p)),
        ("needs labels, a teacher", dict(student_logits=f)),
        ("teacher_weight > 0 needs teacher_logits", dict(student_logits=f, labels=y, teacher_weight=0.5)),
        ("teacher_weight < 1 needs labels", dict(student_logits=f, teacher_logits=g, teacher_weight=0.5)),
        ("student_logits contains NaN", dict(student_logits=torch.where(f > 1, float("nan"), f), labels=y)),
        ("student_logits must be finite or -inf", dict(student_logits=torch.where(f > 1, INF, f), labels=y)),
        (
            "student_logits has a row that is -inf everywhere",
            dict(student_logits=torch.full_like(f, -INF), teacher_logits=g),
        ),
        ("teacher_logits contains NaN", dict(student_logits=f, teacher_logits=torch.where(g > 1, float("nan"), g))),
        ("teacher_logits must be finite or -inf", dict(student_logits=f, teacher_logits=torch.where(g > 1, INF, g))),
        (
            "teacher_logits has a row that is -inf everywhere",
            dict(student_logits=f, teacher_logits=torch.full_like(g, -INF)),
        ),
        ("teacher_logits requires grad", dict(student_logits=f, teacher_logits=g.clone().requires_grad_())),
        ("reduction must be one of", dict(student_logits=f, labels=y, reduction="avg")),
        ("backend must be one of", dict(student_logits=f, labels=y, backend="tpu")),
    ]


@pytest.mark.parametrize("match,kwargs", _bad_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_is_named(match, kwargs):
    f = kwargs.pop("student_logits")
    with pytest.raises((ValueError, TypeError), match=match):
        distill_loss(f, **kwargs)


def test_unavailable_backend_raises_with_reason():
    f, g, y = _inputs()
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        distill_loss(f, labels=y, backend="cuda")


def test_forced_backend_from_environment(monkeypatch):
    f, g, y = _inputs()
    monkeypatch.setenv("RKD_BACKEND", "reference")
    out = distill_loss(f, labels=y)
    assert torch.isfinite(out.loss)
    monkeypatch.setenv("RKD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        distill_loss(f, labels=y, backend="auto")


def test_validation_can_be_switched_off_and_masked_teacher_is_valid():
    f, g, y = _inputs()
    g[:, 1] = -INF
    out = distill_loss(f, teacher_logits=g, validate=False)
    assert torch.isfinite(out.loss)
    assert out.mass[1] == 0


def test_module_objectives_set_costs():
    prior = torch.tensor([0.5, 0.3, 0.2])
    for objective, expected in (("standard", None), ("balanced", 1 / prior)):
        loss = RobustDistillationLoss(3, objective, prior=prior)
        if expected is None:
            assert loss.costs is None
        else:
            torch.testing.assert_close(loss.costs, expected)
    robust = RobustDistillationLoss(3, "robust", prior=prior)
    torch.testing.assert_close(robust.costs, robust.dro.weights / prior)
    tradeoff = RobustDistillationLoss(3, "tradeoff", alpha=0.0, prior=prior)
    torch.testing.assert_close(tradeoff.costs, (1 / 3) / prior)  # alpha = 0 is the balanced objective
    with pytest.raises(ValueError, match="objective must be one of"):
        RobustDistillationLoss(3, "worst")
    with pytest.raises(ValueError, match="needs alpha"):
        RobustDistillationLoss(3, "tradeoff")
    with pytest.raises(ValueError, match="only used by objective='tradeoff'"):
        RobustDistillationLoss(3, "balanced", alpha=0.3)


def test_module_update_moves_only_robust_objectives():
    error, mass = torch.tensor([3.0, 0.0, 1.0]), torch.tensor([4.0, 5.0, 2.0])
    balanced = RobustDistillationLoss(3, "balanced")
    balanced.update_weights(error, mass)
    torch.testing.assert_close(balanced.dro.weights, torch.full((3,), 1 / 3))
    robust = RobustDistillationLoss(3, "robust")
    robust.update_weights(error, mass)
    assert robust.dro.weights[0] > robust.dro.weights[2] > robust.dro.weights[1]


def test_module_state_round_trip():
    loss = RobustDistillationLoss(4, "tradeoff", alpha=0.25, prior=torch.tensor([0.4, 0.3, 0.2, 0.1]))
    loss.update_weights(torch.tensor([1.0, 2.0, 0.0, 3.0]), torch.tensor([2.0, 2.0, 2.0, 3.0]))
    fresh = RobustDistillationLoss(4, "tradeoff", alpha=0.25)
    fresh.load_state_dict(loss.state_dict())
    torch.testing.assert_close(fresh.costs, loss.costs)
    with pytest.raises(ValueError, match="for 4 classes"):
        ClassDRO(3).load_state_dict(loss.dro.state_dict())
