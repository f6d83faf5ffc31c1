"""Property-based fuzzing of the op against the reference on every CPU backend."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rkd_engine
from rkd_engine import distill_loss, reference

BACKENDS = rkd_engine.available_backends("cpu", torch.float64, 64)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 9),
    m=st.integers(1, 64),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.01, 1.0, 30.0, 1e3]),
    gamma=st.floats(0.1, 20.0),
    tau=st.floats(0.1, 20.0),
    a=st.sampled_from([0.0, 0.25, 1.0, None]),
    costs=st.booleans(),
    weights=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_op_matches_reference(rows, m, seed, scale, gamma, tau, a, costs, weights, reduction):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(rows, m, dtype=torch.float64, generator=gen) * scale
    g = torch.randn(rows, m, dtype=torch.float64, generator=gen) * scale
    y = torch.randint(0, m, (rows,), generator=gen)
    a_t = (
        torch.rand(rows, dtype=torch.float64, generator=gen)
        if a is None
        else torch.full((rows,), a, dtype=torch.float64)
    )
    c = torch.rand(m, dtype=torch.float64, generator=gen) + 0.1 if costs else None
    w = torch.rand(m, dtype=torch.float64, generator=gen) if weights else None
    f64 = f.clone().requires_grad_()
    want = reference.loss_rows(
        f64, teacher=g, labels=y, a=a_t, gamma=gamma, log_c=None if c is None else c.log(), w=w, tau=tau
    )
    want = {"mean": want.mean(), "sum": want.sum(), "none": want}[reduction]
    want.sum().backward()
    for backend in BACKENDS:
        x = f.clone().requires_grad_()
        out = distill_loss(
            x,
            labels=y,
            teacher_logits=g,
            teacher_weight=a_t if a is None else a,
            temperature=gamma,
            student_temperature=tau,
            class_costs=c,
            class_weights=w,
            reduction=reduction,
            backend=backend,
        )
        out.loss.sum().backward()
        torch.testing.assert_close(out.loss, want.detach(), rtol=1e-8, atol=1e-9, msg=backend)
        torch.testing.assert_close(x.grad, f64.grad, rtol=1e-8, atol=1e-9, msg=backend)
        assert torch.isfinite(out.mass).all() and torch.isfinite(out.risk).all() and torch.isfinite(out.error).all()
