"""Autograd and compiler edge cases of the fused op (issue 10 items 10, 11, 12, 22, 23)."""

from __future__ import annotations

import pytest
import torch

from rkd_engine import distill_loss


def _case(rows=4, m=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, m, generator=gen, dtype=dtype), torch.randn(rows, m, generator=gen, dtype=dtype)


def _reference_grad(f, g, **kw):
    x = f.clone().requires_grad_(True)
    distill_loss(x, teacher_logits=g, backend="reference", **kw).loss.backward()
    return x.grad


def test_double_backward_raises_a_clear_error():
    f, g = _case()
    x = f.clone().requires_grad_(True)
    loss = distill_loss(x, teacher_logits=g, temperature=2.0).loss
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_gradient_modified_in_place_is_not_reused_silently():
    f, g = _case()
    x = f.clone().requires_grad_(True)
    loss = distill_loss(x, teacher_logits=g).loss
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    want = first.clone()
    (again,) = torch.autograd.grad(loss, x, retain_graph=True)
    torch.testing.assert_close(again, want)
    # What autograd returns is the saved gradient itself (no copy: one write of B x m per step); changing it
    # in place and then differentiating the retained graph again is refused by autograd's version check.
    first.mul_(0.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x)


@pytest.mark.parametrize("transform", ["grad", "vmap-grad", "jacrev"])
def test_torch_func_transforms(transform):
    f, g = _case()
    want = _reference_grad(f, g, temperature=2.0)
    if transform == "grad":
        got = torch.func.grad(lambda x: distill_loss(x, teacher_logits=g, temperature=2.0).loss)(f)
    elif transform == "vmap-grad":
        per_row = torch.func.vmap(
            torch.func.grad(lambda x, t: distill_loss(x[None], teacher_logits=t[None], temperature=2.0).loss)
        )
        got = per_row(f, g) / f.shape[0]  # each row's own mean is its loss: the batch mean's gradient times B
    else:
        jac = torch.func.jacrev(lambda x: distill_loss(x, teacher_logits=g, temperature=2.0, reduction="none").loss)
        got = jac(f).sum(0) / f.shape[0]
    torch.testing.assert_close(got, want)


def test_meta_student_with_validate():
    f = torch.zeros(3, 7, device="meta", requires_grad=True)
    out = distill_loss(f, teacher_logits=torch.zeros(3, 7, device="meta"), labels=torch.zeros(3, dtype=torch.long,
                       device="meta"), teacher_weight=0.5, validate=True)  # fmt: skip
    assert out.loss.device.type == "meta" and out.loss.shape == () and out.mass.shape == (7,)


def test_compile_with_changing_temperature_and_nan_inputs():
    f, g = _case(dtype=torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, t, temperature):
        return distill_loss(x, teacher_logits=t, temperature=temperature).loss

    for temperature in (1.0, 2.0, 3.5):  # annealed between calls
        x = f.clone().requires_grad_(True)
        step(x, g, temperature).backward()
        torch.testing.assert_close(x.grad, _reference_grad(f, g, temperature=temperature), rtol=1e-5, atol=1e-6)
    bad = f.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="student_logits contains NaN"):
        step(bad, g, 2.0)
