"""Every backend against the float64 reference, through the public API and the custom op."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, backend_devices, make_inputs

import rkd_engine
from rkd_engine import distill_loss, reference
from rkd_engine.ops import distill

PAIRS = backend_devices()


def _precise_dtype(backend: str, device: str) -> torch.dtype:
    """float64 where the backend takes it (an exact comparison), else float32."""
    return torch.float64 if backend in rkd_engine.available_backends(device, torch.float64, 16) else torch.float32


OBJECTIVE_SETUPS = ("teacher-standard", "teacher-balanced", "student-robust", "hinton-mix")


def _reference_outputs(f, g, y, *, a, gamma, tau, costs, weights, reduction, teacher_is_probs=False):
    f64 = f.detach().double().cpu().requires_grad_()
    t64 = None if g is None else g.double().cpu()
    y64 = None if y is None else y.cpu()
    a64 = torch.full((f.shape[0],), float(a), dtype=torch.float64) if not torch.is_tensor(a) else a.double().cpu()
    log_c = None if costs is None else costs.double().cpu().log()
    w = None if weights is None else weights.double().cpu()
    rows = reference.loss_rows(
        f64, teacher=t64, teacher_is_probs=teacher_is_probs, labels=y64, a=a64, gamma=gamma, log_c=log_c, w=w, tau=tau
    )
    loss = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    (grad,) = torch.autograd.grad(loss.sum(), f64)
    stats = reference.fused_rows(
        f64.detach(),
        teacher=t64,
        teacher_is_probs=teacher_is_probs,
        labels=y64,
        a=a64,
        gamma=gamma,
        log_c=log_c,
        w=w,
        tau=tau,
        need_grad=False,
    )
    return loss.detach(), grad, stats


def _setup(kind: str, m: int, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    prior = torch.rand(m, generator=gen) + 0.05
    prior = (prior / prior.sum()).to(device)
    if kind == "teacher-standard":
        return dict(use_teacher=False, a=0.0, costs=None, weights=None)
    if kind == "teacher-balanced":
        return dict(use_teacher=False, a=0.0, costs=1.0 / prior, weights=None)
    if kind == "student-robust":
        lam = torch.softmax(torch.randn(m, generator=gen), 0).to(device)
        return dict(use_teacher=True, a=1.0, costs=lam / prior, weights=None)
    return dict(use_teacher=True, a=0.4, costs=1.0 / prior, weights=(torch.rand(m, generator=gen) + 0.5).to(device))


def _compare(backend, device, f, g, y, *, setup, gamma, tau, reduction, dtype):
    f = f.clone().requires_grad_()
    out = distill_loss(
        f,
        labels=y if setup["a"] < 1 else None,
        teacher_logits=g if setup["use_teacher"] else None,
        temperature=gamma,
        teacher_weight=setup["a"] if setup["use_teacher"] else None,
        class_costs=setup["costs"],
        class_weights=setup["weights"],
        student_temperature=tau,
        reduction=reduction,
        backend=backend,
    )
    out.loss.sum().backward()
    ref_loss, ref_grad, ref_stats = _reference_outputs(
        f,
        g if setup["use_teacher"] else None,
        y if setup["a"] < 1 else None,
        a=setup["a"],
        gamma=gamma,
        tau=tau,
        costs=setup["costs"],
        weights=setup["weights"],
        reduction=reduction,
    )
    tol = TOLERANCES[dtype]
    rows = f.shape[0]
    scale = 1.0 if reduction != "mean" else 1.0 / rows
    torch.testing.assert_close(
        out.loss.double().cpu(), ref_loss, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, ref_loss.abs().max().item())
    )
    torch.testing.assert_close(f.grad.double().cpu(), ref_grad, rtol=tol["rtol"], atol=tol["atol"] * scale * 4)
    for name in ("mass", "risk", "error"):
        got, want = getattr(out, name).double().cpu(), getattr(ref_stats, name)
        torch.testing.assert_close(
            got, want, rtol=tol["rtol"] * 4, atol=tol["atol"] * max(1.0, want.abs().max().item()), msg=name
        )


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("kind", OBJECTIVE_SETUPS)
@pytest.mark.parametrize("rows,m", [(7, 1), (9, 2), (5, 3), (33, 10), (6, 1001)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matches_reference(backend, device, kind, rows, m, dtype):
    if backend not in rkd_engine.available_backends(device, dtype, m):
        pytest.skip(f"{backend} does not take {dtype} on {device}")
    seed = 1000 * rows + m
    f, g, y = make_inputs(rows, m, dtype, device, "normal", seed)
    _compare(
        backend, device, f, g, y, setup=_setup(kind, m, device, seed), gamma=2.0, tau=1.0, reduction="mean", dtype=dtype
    )


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("regime", ["normal", "peaked", "equal", "huge", "masked"])
@pytest.mark.parametrize("gamma,tau", [(0.1, 1.0), (1.0, 1.0), (5.0, 3.0), (20.0, 0.1), (1.0, 20.0)])
def test_regimes_and_temperatures(backend, device, regime, gamma, tau):
    dtype = torch.float32
    f, g, y = make_inputs(17, 37, dtype, device, regime, seed=hash((regime, gamma, tau)) % 10_000)
    setup = _setup("hinton-mix", 37, device, 3)
    if regime == "masked":
        setup = dict(setup, a=1.0)  # a hard label on a masked class would make the loss infinite
    _compare(backend, device, f, g, y, setup=setup, gamma=gamma, tau=tau, reduction="mean", dtype=dtype)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions_and_upstream_gradient(backend, device, reduction):
    dtype = _precise_dtype(backend, device)
    f, g, y = make_inputs(12, 9, dtype, device, "normal", seed=7)
    setup = _setup("hinton-mix", 9, device, 7)
    _compare(backend, device, f, g, y, setup=setup, gamma=3.0, tau=2.0, reduction=reduction, dtype=dtype)
    # A non-unit upstream gradient, per row: the backward must scale the saved gradient.
    f = f.clone().requires_grad_()
    out = distill_loss(f, labels=y, teacher_logits=g, teacher_weight=0.5, reduction="none", backend=backend)
    upstream = torch.linspace(-2, 3, 12, dtype=dtype, device=device)
    (out.loss * upstream).sum().backward()
    f64 = f.detach().cpu().double().requires_grad_()
    rows = reference.loss_rows(
        f64, teacher=g.cpu().double(), labels=y.cpu(), a=torch.full((12,), 0.5, dtype=torch.float64)
    )
    (rows * upstream.cpu().double()).sum().backward()
    torch.testing.assert_close(f.grad.cpu().double(), f64.grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend,device", PAIRS)
def test_teacher_probabilities_and_per_row_weight(backend, device):
    dtype = _precise_dtype(backend, device)
    f, g, y = make_inputs(11, 13, dtype, device, "masked", seed=11)
    probs = torch.softmax(g.double() / 3.0, -1).to(dtype)
    a = torch.linspace(0, 1, 11, dtype=dtype, device=device)
    a[y == 0] = 1.0
    f = f.clone().requires_grad_()
    out = distill_loss(f, labels=y, teacher_probs=probs, teacher_weight=a, backend=backend)
    out.loss.backward()
    ref_loss, ref_grad, ref_stats = _reference_outputs(
        f, probs, y, a=a, gamma=1.0, tau=1.0, costs=None, weights=None, reduction="mean", teacher_is_probs=True
    )
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.loss.cpu().double(), ref_loss, **tol)
    torch.testing.assert_close(f.grad.cpu().double(), ref_grad, **tol)
    torch.testing.assert_close(out.mass.cpu().double(), ref_stats.mass, **tol)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_wide_rows(backend, device):
    f, g, y = make_inputs(3, 50257, torch.float32, device, "normal", seed=5)
    _compare(
        backend,
        device,
        f,
        g,
        y,
        setup=_setup("student-robust", 50257, device, 5),
        gamma=1.0,
        tau=1.0,
        reduction="mean",
        dtype=torch.float32,
    )


@pytest.mark.parametrize("backend,device", PAIRS)
def test_statistics_meaning(backend, device):
    """mass counts labels when a = 0; error counts misclassified labelled rows; pi_t = mass / n when a = 1."""
    f = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 3.0]], device=device)
    y = torch.tensor([0, 0, 1, 2], device=device)
    out = distill_loss(f, labels=y, backend=backend)
    assert out.mass.tolist() == [2.0, 1.0, 1.0]
    assert out.error.tolist() == [1.0, 1.0, 0.0]
    probs = torch.softmax(torch.randn(4, 3, device=device), -1)
    out = distill_loss(f, teacher_probs=probs, backend=backend)
    torch.testing.assert_close(out.mass / 4, probs.mean(0))


@pytest.mark.parametrize("backend,device", PAIRS)
def test_no_gradient_requested(backend, device):
    f, g, y = make_inputs(8, 6, torch.float32, device, "normal", seed=3)
    with torch.no_grad():
        out = distill_loss(f.requires_grad_(), teacher_logits=g, backend=backend)
    assert out.loss.grad_fn is None
    ref = reference.fused_rows(
        f.detach().cpu().double(), teacher=g.cpu().double(), a=torch.ones(8, dtype=torch.float64)
    )
    torch.testing.assert_close(out.mass.double().cpu(), ref.mass, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_backward_through_retained_graph(backend, device):
    dtype = _precise_dtype(backend, device)
    f, g, y = make_inputs(4, 5, dtype, device, "normal", seed=1)
    f.requires_grad_()
    out = distill_loss(f, teacher_logits=g, reduction="sum", backend=backend)
    scalar = torch.tensor(-2.5, dtype=dtype, device=device)
    (g1,) = torch.autograd.grad(out.loss, f, scalar, retain_graph=True)
    (g2,) = torch.autograd.grad(out.loss, f, torch.ones((), dtype=dtype, device=device), retain_graph=True)
    torch.testing.assert_close(g1, g2 * scalar)
    (g3,) = torch.autograd.grad(out.loss, f, torch.zeros((), dtype=dtype, device=device), retain_graph=True)
    assert torch.count_nonzero(g3) == 0
    out = distill_loss(f, teacher_logits=g, reduction="mean", backend=backend)
    torch.autograd.grad(out.loss, f, torch.zeros((), dtype=dtype, device=device), retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(out.loss, f, scalar)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_opcheck(backend, device):
    f, g, y = make_inputs(6, 5, torch.float32, device, "normal", seed=2)
    a = torch.full((6,), 0.3, device=device)
    costs = torch.rand(5, device=device) + 0.5
    for reduction in ("mean", "none"):
        args = (f.clone().requires_grad_(), g, y, a, costs.log(), None, 2.0, 1.5, False, reduction, True, backend)
        torch.library.opcheck(distill, args)
    args = (f.clone(), g, None, torch.ones(6, device=device), None, costs, 1.0, 1.0, False, "sum", False, backend)
    torch.library.opcheck(distill, args)


def test_gradcheck_reference_and_op():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 5, (4,), generator=gen)
    a = torch.tensor([0.0, 0.3, 1.0, 0.7], dtype=torch.float64)
    c = torch.rand(5, dtype=torch.float64, generator=gen) + 0.5
    assert torch.autograd.gradcheck(
        lambda x: reference.loss_rows(x, teacher=g, labels=y, a=a, gamma=2.0, log_c=c.log(), tau=3.0), (f,)
    )
    for backend in rkd_engine.available_backends("cpu", torch.float64, 5):

        def fn(x, b=backend):
            out = distill_loss(
                x,
                labels=y,
                teacher_logits=g,
                teacher_weight=a,
                temperature=2.0,
                class_costs=c,
                student_temperature=3.0,
                reduction="none",
                backend=b,
            )
            return out.loss

        assert torch.autograd.gradcheck(fn, (f,)), backend


@pytest.mark.parametrize("backend,device", PAIRS)
def test_compiled_training_step(backend, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6)).to(device)
    teacher = torch.nn.Linear(8, 6).to(device)
    loss_fn = rkd_engine.RobustDistillationLoss(6, "tradeoff", alpha=0.5, temperature=2.0, backend=backend).to(device)
    x = torch.randn(32, 8, device=device)
    y = torch.randint(0, 6, (32,), device=device)

    def forward(x, y):
        with torch.no_grad():
            t = teacher(x)
        return loss_fn(model(x), labels=y, teacher_logits=t, teacher_weight=0.7)

    compiled = torch.compile(forward, fullgraph=True)
    out = compiled(x, y)
    out.loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = forward(x, y)
    eager.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    loss_fn.update_weights(out.error, out.mass)
    assert not torch.equal(loss_fn.dro.weights, torch.full((6,), 1 / 6, device=device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given where no GPU is visible")
def test_explain_backends_without_a_gpu():
    # Asking about CUDA tensors on a machine without a GPU gives reasons, never an exception.
    reasons = rkd_engine.ops.explain_backends("cuda", torch.bfloat16, 1000)
    assert "no CUDA GPU" in reasons["cuda"] and "no CUDA GPU" in reasons["triton"]
    assert "CPU tensors only" in reasons["cpp"]
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        rkd_engine.ops.dispatch.select_backend("triton", torch.device("cuda"), torch.float32, 10)
