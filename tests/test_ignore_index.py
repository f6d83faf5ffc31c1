"""Ignored rows (``ignore_index``) and the mean's ``normalizer``, on every backend that runs here, against the
float64 reference (the oracle computes the kept rows alone and divides by hand)."""

from __future__ import annotations

import pytest
import torch
from conftest import NONFINITE_WARNINGS, backend_devices, make_inputs

from rkd_engine import distill_loss, reference

IGNORED = [0, 3, 4, 9]

# The Triton interpreter on CPU, on the narrow and the forced two-pass (wide) paths, besides the usual pairs.
BACKENDS = backend_devices(triton_interpreter=True)

pytestmark = NONFINITE_WARNINGS


def _case(device, rows=10, m=13, seed=0):
    f, g, y = make_inputs(rows, m, torch.float32, device, "normal", seed)
    gen = torch.Generator().manual_seed(seed + 1)
    costs = (torch.rand(m, generator=gen) + 0.5).to(device)
    weights = (torch.rand(m, generator=gen) + 0.5).to(device)
    return f, g, y, costs, weights


def _oracle(f, g, y, costs, weights, a, keep, divisor, tau):
    """Loss (mean over ``divisor``), gradient and statistics of the kept rows, in float64."""
    kept = dict(
        teacher=g[keep].double(),
        labels=y[keep],
        a=torch.full((int(keep.sum()),), a, dtype=torch.float64),
        gamma=2.0,
        log_c=costs.double().log(),
        w=weights.double(),
        tau=tau,
    )
    fk = f[keep].double().detach().requires_grad_(True)
    loss = reference.loss_rows(fk, **kept).sum() / divisor
    loss.backward()
    grad = torch.zeros(f.shape, dtype=torch.float64)
    grad[keep] = fk.grad
    return loss, grad, reference.fused_rows(f[keep].double(), **kept)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("a,tau", [(0.6, 1.0), (1.0, 2.0)], ids=["mixed", "teacher-only-tau2"])
def test_ignored_rows_match_reference(backend, device, a, tau):
    f, g, y, costs, weights = _case(device)
    y[IGNORED] = -100
    f.requires_grad_(True)
    out = distill_loss(
        f, labels=y, teacher_logits=g, temperature=2.0, teacher_weight=a, class_costs=costs,
        class_weights=weights, student_temperature=tau, backend=backend,
    )  # fmt: skip
    out.loss.backward()
    keep = (y != -100).cpu()
    want_loss, want_grad, want = _oracle(f.cpu(), g.cpu(), y.cpu(), costs.cpu(), weights.cpu(), a, keep, 6, tau)
    torch.testing.assert_close(out.loss.double().cpu(), want_loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(f.grad.double().cpu(), want_grad, rtol=2e-5, atol=2e-6)
    assert torch.equal(f.grad[IGNORED].cpu().abs(), torch.zeros(len(IGNORED), f.shape[1]))
    for name in ("mass", "risk", "error"):
        torch.testing.assert_close(getattr(out, name).double().cpu(), getattr(want, name), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_rows_ignored_give_zero_not_nan(backend, device):
    f, g, y, costs, _ = _case(device)
    y[:] = 5
    f.requires_grad_(True)
    out = distill_loss(f, labels=y, teacher_logits=g, class_costs=costs, ignore_index=5, backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.equal(f.grad.abs(), torch.zeros_like(f))
    for stat in (out.mass, out.risk, out.error):
        assert torch.equal(stat, torch.zeros_like(stat))
    none = distill_loss(f.detach(), labels=y, teacher_logits=g, ignore_index=5, reduction="none", backend=backend)
    assert torch.equal(none.loss, torch.zeros_like(none.loss))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
def test_gradient_accumulation_equals_big_batch(backend, device, as_tensor):
    """Two micro-batches of 8 rows with ``normalizer=16`` accumulate the gradient of one batch of 16."""
    f, g, y, costs, _ = _case(device, rows=16, m=11, seed=3)
    y[[1, 8, 9]] = -100
    kept = int((y != -100).sum())
    big = f.clone().requires_grad_(True)
    distill_loss(
        big, labels=y, teacher_logits=g, teacher_weight=0.5, class_costs=costs, backend=backend
    ).loss.backward()
    small = f.clone().requires_grad_(True)
    normalizer = torch.tensor(kept, device=device) if as_tensor else kept
    total = 0.0
    for part in (slice(0, 8), slice(8, 16)):
        out = distill_loss(
            small[part], labels=y[part], teacher_logits=g[part], teacher_weight=0.5, class_costs=costs,
            normalizer=normalizer, backend=backend,
        )  # fmt: skip
        out.loss.backward()
        total = total + out.loss.detach()
    torch.testing.assert_close(small.grad, big.grad, rtol=1e-5, atol=1e-7)
    want = distill_loss(f, labels=y, teacher_logits=g, teacher_weight=0.5, class_costs=costs, backend=backend).loss
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-7)


def test_labels_with_teacher_weight_one_only_mark_rows():
    f, g, y, _, _ = _case("cpu")
    marked = torch.where(torch.arange(10) % 3 == 0, torch.full_like(y, -100), y)
    with_marks = distill_loss(f, labels=marked, teacher_logits=g, reduction="none")
    plain = distill_loss(f, teacher_logits=g, reduction="none")
    keep = marked != -100
    torch.testing.assert_close(with_marks.loss[keep], plain.loss[keep])
    assert torch.equal(with_marks.loss[~keep], torch.zeros(int((~keep).sum())))


def test_bad_ignore_index_and_normalizer_are_named():
    f, g, y, _, _ = _case("cpu")
    with pytest.raises(TypeError, match="ignore_index"):
        distill_loss(f, labels=y, teacher_logits=g, ignore_index=1.5)
    with pytest.raises(ValueError, match="normalizer"):
        distill_loss(f, teacher_logits=g, normalizer=0)
    with pytest.raises(ValueError, match="normalizer"):
        distill_loss(f, teacher_logits=g, normalizer=4, reduction="sum")
    with pytest.raises(ValueError, match="normalizer"):
        distill_loss(f, teacher_logits=g, normalizer=torch.ones(2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 13\)"):
        distill_loss(f, labels=torch.full_like(y, -7), teacher_logits=g, teacher_weight=0.5)
