"""The sparse top-k kernels (C++ ``rkd_engine._C.topk_forward``, Triton ``rkd_engine.kernels.topk``).

They must be the ones called for ``teacher_topk`` on their backends (no dense target is formed), and give
the loss, gradient and statistics of the dense top-k target (``rkd_engine.reference.topk_target``) in
float64, with every loss option: labels and a per-row mix, class costs and weights, a student temperature,
ignored rows, a normaliser, extreme logits, every dtype. tests/test_wide.py covers the public paths too.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from conftest import TOLERANCES

from rkd_engine import reference, wide
from rkd_engine.ops import cpp_backend
from rkd_engine.ops.topk import SPARSE_TOPK_BACKENDS, has_sparse_topk, sparse_topk_forward, topk_module
from rkd_engine.wide import fused_linear_distill_loss, topk_distill_loss

needs_cpp = pytest.mark.skipif(not has_sparse_topk("cpp"), reason="rkd_engine._C built without topk_forward")
interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter test is for CPU"
)


def _teacher(rows, m, k, gen, spare=0.0, dtype=torch.float64):
    p = torch.softmax(torch.randn(rows, m, generator=gen, dtype=torch.float64) * 2, -1)
    vals, idx = p.topk(k, -1)
    idx = idx[:, torch.randperm(k, generator=gen)]  # any order within a row
    vals = p.gather(1, idx)
    if spare:
        vals = vals / vals.sum(-1, keepdim=True) * (1 - spare)
    return idx, vals.to(dtype)


def _options(kind, rows, m, gen):
    """Loss options of one case: labels (some ignored), a per-row mix, costs, weights, tau."""
    opts = {}
    if kind in ("labels", "all"):
        labels = torch.randint(0, m, (rows,), generator=gen)
        labels[1] = -100
        opts.update(labels=labels, teacher_weight=torch.rand(rows, generator=gen) * 0.9 + 0.05)
    if kind in ("costs", "all"):
        opts.update(class_costs=torch.rand(m, generator=gen) + 0.5, class_weights=torch.rand(m, generator=gen) + 0.2)
        opts["class_weights"][0] = 0.0
    if kind in ("tau", "all"):
        opts.update(student_temperature=2.5)
    return opts


def _want(f, idx, vals, tail, opts, reduction="mean"):
    """The float64 reference: loss, gradient and statistics of the dense top-k target."""
    rows, m = f.shape
    labels = opts.get("labels")
    a = opts.get("teacher_weight", torch.ones(rows))
    costs, weights = opts.get("class_costs"), opts.get("class_weights")
    kept = rows if labels is None else int((labels != -100).sum())
    out = reference.fused_rows(
        f.detach().double(),
        teacher=reference.topk_target(idx, vals.double(), m, tail),
        teacher_is_probs=True,
        labels=labels,
        a=a.double(),
        log_c=None if costs is None else costs.double().log(),
        w=None if weights is None else weights.double(),
        tau=opts.get("student_temperature", 1.0),
        grad_scale=1.0 / kept if reduction == "mean" else 1.0,
    )
    loss = out.loss.sum() / kept if reduction == "mean" else out.loss.sum() if reduction == "sum" else out.loss
    return loss, out


def _check(out, grad, want, ref, dtype, scale=1.0):
    tol = TOLERANCES[dtype]
    for name, got, exp in (
        ("loss", out.loss, want),
        ("grad", grad, ref.grad),
        ("mass", out.mass, ref.mass),
        ("risk", out.risk, ref.risk),
        ("error", out.error, ref.error),
    ):
        torch.testing.assert_close(
            got.double(), exp.double(), rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda s, n=name: f"{n}: {s}"
        )


def _no_dense(monkeypatch, backend):
    """Make the dense path fail: the top-k expansion and the backend's dense kernel."""

    def boom(*args, **kwargs):
        raise AssertionError("the dense top-k expansion or the dense kernel was called")

    monkeypatch.setattr(wide, "_expand_topk_", boom)
    monkeypatch.setattr(wide, "_expanded_topk", boom)
    monkeypatch.setattr(wide.backend_module(backend), "fused_forward", boom)


# ------------------------------------------------------------------------------------------------ C++
@needs_cpp
@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
@pytest.mark.parametrize("kind", ["plain", "labels", "costs", "tau", "all"])
@pytest.mark.parametrize(("rows", "m", "k"), [(7, 1, 1), (11, 37, 1), (11, 37, 6), (6, 37, 37), (9, 333, 17)], ids=str)
def test_cpp_kernel_matches_reference(monkeypatch, tail, kind, rows, m, k):
    gen = torch.Generator().manual_seed(rows * 1000 + m + k)
    idx, vals = _teacher(rows, m, k, gen, spare=0.15 if tail == "uniform" else 0.0)
    opts = _options(kind, rows, m, gen)
    f = (torch.randn(rows, m, generator=gen) * 3).requires_grad_()
    _no_dense(monkeypatch, "cpp")
    out = topk_distill_loss(f, (idx, vals.float()), topk_tail=tail, backend="cpp", **opts)
    out.loss.backward()
    want, ref = _want(f, idx, vals.float(), tail, opts)
    _check(out, f.grad, want, ref, torch.float32)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
def test_cpp_kernel_dtypes(monkeypatch, dtype, tail):
    gen = torch.Generator().manual_seed(5)
    rows, m, k = 10, 300, 12
    idx, vals = _teacher(rows, m, k, gen, spare=0.2 if tail == "uniform" else 0.0)
    opts = _options("all", rows, m, gen)
    f = (torch.randn(rows, m, generator=gen) * 2).to(dtype).requires_grad_()
    _no_dense(monkeypatch, "cpp")
    out = topk_distill_loss(f, (idx, vals.to(dtype)), topk_tail=tail, backend="cpp", reduction="sum", **opts)
    out.loss.backward()
    want, ref = _want(f, idx, vals.to(dtype), tail, opts, reduction="sum")
    assert f.grad.dtype == dtype
    _check(out, f.grad, want, ref, dtype, scale=10.0 if dtype in (torch.bfloat16, torch.float16) else 1.0)


@needs_cpp
def test_cpp_kernel_extreme_logits_and_temperature(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    rows, m, k = 6, 200, 9
    idx, vals = _teacher(rows, m, k, gen, spare=0.3)
    f = (torch.randn(rows, m, generator=gen, dtype=torch.float64) * 1e4).requires_grad_()
    opts = dict(student_temperature=30.0)
    _no_dense(monkeypatch, "cpp")
    out = topk_distill_loss(f, (idx, vals), topk_tail="uniform", backend="cpp", **opts)
    out.loss.backward()
    want, ref = _want(f, idx, vals, "uniform", opts)
    assert torch.isfinite(out.loss)
    _check(out, f.grad, want, ref, torch.float64, scale=1e4)


@needs_cpp
@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
def test_cpp_kernel_gradcheck(tail):
    gen = torch.Generator().manual_seed(3)
    rows, m, k = 4, 9, 3
    idx, vals = _teacher(rows, m, k, gen, spare=0.25 if tail == "uniform" else 0.0)
    labels = torch.randint(0, m, (rows,), generator=gen)
    costs = torch.rand(m, generator=gen, dtype=torch.float64) + 0.5
    f = torch.randn(rows, m, generator=gen, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "sum", "none"):

        def loss(x, reduction=reduction):
            return topk_distill_loss(
                x, (idx, vals), topk_tail=tail, labels=labels, teacher_weight=0.7, class_costs=costs,
                student_temperature=1.5, reduction=reduction, backend="cpp",
            ).loss  # fmt: skip

        assert torch.autograd.gradcheck(loss, (f,), eps=1e-6, atol=1e-7)


@needs_cpp
def test_cpp_kernel_raises_on_bad_rows_without_validation():
    f = torch.randn(4, 10)
    idx = torch.tensor([[1, 2]] * 4)
    p = torch.full((4, 2), 0.4)
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 10\)"):
        topk_distill_loss(f, (idx + 9, p), validate=False, backend="cpp")
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 10\)"):
        topk_distill_loss(f, (idx, p), labels=torch.tensor([1, 2, 30, 4]), teacher_weight=0.5, validate=False)


def test_entry_points_are_found_by_backend_name(monkeypatch):
    assert set(SPARSE_TOPK_BACKENDS) == {"cpp", "triton"}
    assert topk_module("triton").__name__ == "rkd_engine.ops.triton_topk" and has_sparse_topk("triton")
    assert topk_module("reference") is None and not has_sparse_topk("reference") and not has_sparse_topk("auto")
    with pytest.raises(ValueError, match="backend 'reference' has no sparse top-k kernel"):
        sparse_topk_forward("reference", torch.zeros(1, 3), None, torch.zeros(1, 1), True, None, None, None, None,
                            tau=1.0, grad_scale=1.0, need_grad=False)  # fmt: skip
    # A backend adds its kernel with a module rkd_engine.ops.<name>_topk, and nothing edited in ops/topk.py:
    calls = []
    entry = types.ModuleType("rkd_engine.ops.reference_topk")
    entry.available = lambda: True
    entry.topk_forward = lambda *args, **kwargs: calls.append((args, kwargs)) or "result"
    monkeypatch.setitem(sys.modules, entry.__name__, entry)
    topk_module.cache_clear()
    try:
        assert has_sparse_topk("reference")
        probs = torch.tensor([[0.5, 0.25]], dtype=torch.float16)
        got = sparse_topk_forward("reference", torch.zeros(1, 4, dtype=torch.bfloat16), "idx", probs, False, None,
                                  "a", None, None, tau=2.0, grad_scale=3.0, need_grad=True)  # fmt: skip
    finally:
        topk_module.cache_clear()
    assert got == "result" and len(calls) == 1
    args, kwargs = calls[0]
    assert args[1] == "idx" and args[3:] == (False, None, "a", None, None)
    assert args[2].dtype == torch.float32 and args[2].tolist() == [[0.5, 0.25]]  # fp32 whatever the input dtype
    assert kwargs == dict(tau=2.0, grad_scale=3.0, need_grad=True, grad_out=None, ignore_index=-100, scale=None)


@needs_cpp
def test_cpp_kernel_writes_into_the_student(monkeypatch):
    # The fused layer passes its scores as grad_out: the gradient overwrites them, row by row.
    gen = torch.Generator().manual_seed(4)
    rows, m, k = 12, 50, 5
    idx, vals = _teacher(rows, m, k, gen, spare=0.1)
    f = torch.randn(rows, m, generator=gen)
    a = torch.ones(rows)
    want = sparse_topk_forward("cpp", f, idx, vals, True, None, a, None, None, tau=1.0, grad_scale=1.0, need_grad=True)
    scores = f.clone()
    got = sparse_topk_forward(
        "cpp", scores, idx, vals, True, None, a, None, None, tau=1.0, grad_scale=1.0, need_grad=True, grad_out=scores
    )
    assert got[1].data_ptr() == scores.data_ptr()
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y)


@needs_cpp
@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
def test_fused_layer_uses_the_sparse_kernel(monkeypatch, tail):
    gen = torch.Generator().manual_seed(6)
    rows, hidden, m, k = 21, 8, 40, 4
    idx, vals = _teacher(rows, m, k, gen, spare=0.2 if tail == "uniform" else 0.0)
    x = torch.randn(rows, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(m, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, m, (rows,), generator=gen)
    labels[0] = labels[8] = -100  # at a chunk edge
    _no_dense(monkeypatch, "cpp")
    out = fused_linear_distill_loss(
        x, weight, labels=labels, teacher_topk=(idx, vals), topk_tail=tail, teacher_weight=0.6, chunk_size=8,
        backend="cpp",
    )  # fmt: skip
    out.loss.backward()
    monkeypatch.undo()
    x2, w2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    dense = wide.topk_distill_loss(
        x2 @ w2.t(), (idx, vals), topk_tail=tail, labels=labels, teacher_weight=0.6, backend="reference"
    )
    dense.loss.backward()
    for got, want in ((out.loss, dense.loss), (x.grad, x2.grad), (weight.grad, w2.grad), (out.risk, dense.risk)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@needs_cpp
def test_cpp_kernel_compiles_fullgraph():
    gen = torch.Generator().manual_seed(9)
    rows, m, k = 8, 30, 4
    idx, vals = _teacher(rows, m, k, gen, dtype=torch.float32)

    def step(f):
        return topk_distill_loss(f, (idx, vals), topk_tail="uniform", backend="cpp").loss

    f = torch.randn(rows, m, generator=gen, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(f)
    loss.backward()
    want = step(f.detach().clone().requires_grad_())
    torch.testing.assert_close(loss, want)
    assert cpp_backend._load() is not None


# --------------------------------------------------------------------------------------------- Triton
@interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
@pytest.mark.parametrize("kind", ["plain", "all"])
def test_triton_kernel_matches_reference(monkeypatch, tail, kind):
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(12)
    rows, m, k = 5, 70, 4  # more than one column tile in the interpreter
    idx, vals = _teacher(rows, m, k, gen, spare=0.15 if tail == "uniform" else 0.0)
    opts = _options(kind, rows, m, gen)
    f = (torch.randn(rows, m, generator=gen) * 3).requires_grad_()
    _no_dense(monkeypatch, "triton")
    out = topk_distill_loss(f, (idx, vals.float()), topk_tail=tail, backend="triton", **opts)
    out.loss.backward()
    want, ref = _want(f, idx, vals.float(), tail, opts)
    _check(out, f.grad, want, ref, torch.float32)
