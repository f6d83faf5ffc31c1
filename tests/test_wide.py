"""Wide heads (docs/wide_heads.md): the top-k teacher and the fused output layer against the float64 reference.

The oracle is ``rkd_engine.reference``: ``topk_target`` forms the dense target of a top-k teacher and
``fused_rows`` / ``linear_loss_rows`` give loss, gradients and statistics of the materialised scores.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TOLERANCES, backend_devices

from rkd_engine import distill_loss, reference
from rkd_engine.wide import FusedLinearDistillationLoss, fused_linear_distill_loss, topk_distill_loss

CPU_BACKENDS = [p for p in backend_devices() if p.values[1] == "cpu"]


def _topk(rows: int, m: int, k: int, gen: torch.Generator, *, ties: bool = False, spare: float = 0.0):
    """A top-k teacher: the k largest classes of a random softmax, rows scaled to sum to ``1 - spare``."""
    logits = torch.randn(rows, m, generator=gen, dtype=torch.float64) * 2
    if ties:
        logits = logits.round()  # many equal probabilities
    p = torch.softmax(logits, -1)
    vals, idx = p.topk(k, -1)
    if spare:
        vals = vals / vals.sum(-1, keepdim=True) * (1 - spare)
    return idx, vals


def _reference(f, *, target, labels, a, log_c=None, w=None, tau=1.0, reduction="mean"):
    rows = f.shape[0]
    out = reference.fused_rows(
        f.detach().double(),
        teacher=target,
        teacher_is_probs=True,
        labels=labels,
        a=a,
        log_c=log_c,
        w=w,
        tau=tau,
        grad_scale=1.0 / rows if reduction == "mean" else 1.0,
    )
    loss = out.loss.mean() if reduction == "mean" else out.loss.sum() if reduction == "sum" else out.loss
    return loss, out


def _close(got, want, dtype, what, scale=1.0):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        got.double(), want.double(), rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{what}: {m}"
    )


# ------------------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize(("backend", "device"), CPU_BACKENDS)
@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
@pytest.mark.parametrize(("rows", "m", "k"), [(9, 1, 1), (13, 37, 1), (13, 37, 5), (6, 37, 37), (5, 1001, 16)], ids=str)
@pytest.mark.parametrize("case", ["teacher", "mixed", "costs-weights-tau", "sum", "none"])
def test_topk_matches_reference(backend, device, tail, rows, m, k, case):
    gen = torch.Generator().manual_seed(rows * 1000 + m + k)
    idx, vals = _topk(rows, m, k, gen, spare=0.1 if tail == "uniform" else 0.0)
    f = torch.randn(rows, m, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, m, (rows,), generator=gen)
    kwargs, a = {}, torch.ones(rows, dtype=torch.float64)
    log_c = w = None
    tau, reduction = 1.0, "mean"
    if case == "mixed":
        a = torch.rand(rows, generator=gen, dtype=torch.float64)
        kwargs = dict(labels=labels, teacher_weight=a)
    elif case == "costs-weights-tau":
        c = torch.rand(m, generator=gen, dtype=torch.float64) + 0.1
        wt = torch.rand(m, generator=gen, dtype=torch.float64) + 0.5
        a = torch.full((rows,), 0.7, dtype=torch.float64)
        tau = 2.5
        kwargs = dict(labels=labels, teacher_weight=0.7, class_costs=c, class_weights=wt, student_temperature=tau)
        log_c, w = c.log(), wt
    elif case in ("sum", "none"):
        reduction = case
    f.requires_grad_()
    out = distill_loss(f, teacher_topk=(idx, vals), topk_tail=tail, reduction=reduction, backend=backend, **kwargs)
    target = reference.topk_target(idx, vals, m, tail)
    want, ref = _reference(
        f, target=target, labels=kwargs.get("labels"), a=a, log_c=log_c, w=w, tau=tau, reduction=reduction
    )
    dtype = torch.float64
    _close(out.loss, want, dtype, "loss")
    for name in ("mass", "risk", "error"):
        _close(getattr(out, name), getattr(ref, name), dtype, name)
    upstream = torch.ones_like(out.loss)
    (grad,) = torch.autograd.grad(out.loss, f, upstream)
    _close(grad, ref.grad, dtype, "grad")


@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 100])
def test_topk_chunks_and_ties(tail, chunk_rows):
    """Chunk boundaries of the dense target (B not a multiple of the chunk, one chunk) and tied probabilities."""
    gen = torch.Generator().manual_seed(3)
    rows, m, k = 23, 40, 6
    idx, vals = _topk(rows, m, k, gen, ties=True, spare=0.2 if tail == "uniform" else 0.0)
    f = (torch.randn(rows, m, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    out = topk_distill_loss(f, (idx, vals), topk_tail=tail, chunk_rows=chunk_rows, backend="cpp")
    out.loss.backward()
    want, ref = _reference(f, target=reference.topk_target(idx, vals, m, tail), labels=None, a=torch.ones(rows))
    _close(out.loss, want, torch.float64, "loss")
    _close(f.grad, ref.grad, torch.float64, "grad")
    for name in ("mass", "risk", "error"):
        _close(getattr(out, name), getattr(ref, name), torch.float64, name)


@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
def test_topk_with_k_equal_m_is_the_dense_teacher(tail):
    gen = torch.Generator().manual_seed(5)
    rows, m = 11, 29
    p = torch.softmax(torch.randn(rows, m, generator=gen), -1)
    idx = torch.stack([torch.randperm(m, generator=gen) for _ in range(rows)])
    f = torch.randn(rows, m, generator=gen).requires_grad_()
    labels = torch.randint(0, m, (rows,), generator=gen)
    dense = distill_loss(f, teacher_probs=p, labels=labels, teacher_weight=0.4)
    (g_dense,) = torch.autograd.grad(dense.loss, f)
    sparse = distill_loss(f, teacher_topk=(idx, p.gather(1, idx)), topk_tail=tail, labels=labels, teacher_weight=0.4)
    (g_sparse,) = torch.autograd.grad(sparse.loss, f)
    _close(sparse.loss, dense.loss, torch.float32, "loss")
    _close(g_sparse, g_dense, torch.float32, "grad")
    for name in ("mass", "risk", "error"):
        _close(getattr(sparse, name), getattr(dense, name), torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
def test_topk_low_precision(dtype, tail):
    gen = torch.Generator().manual_seed(7)
    rows, m, k = 16, 300, 8
    idx, vals = _topk(rows, m, k, gen, spare=0.1 if tail == "uniform" else 0.0)
    f64 = torch.randn(rows, m, generator=gen, dtype=torch.float64) * 2
    f = f64.to(dtype).requires_grad_()
    out = distill_loss(f, teacher_topk=(idx, vals.to(dtype)), topk_tail=tail)
    out.loss.backward()
    assert f.grad.dtype == dtype
    target = reference.topk_target(idx, vals.to(dtype).double(), m, tail)
    want, ref = _reference(f.detach().double(), target=target, labels=None, a=torch.ones(rows, dtype=torch.float64))
    _close(out.loss, want, dtype, "loss")
    _close(f.grad, ref.grad, dtype, "grad")
    _close(out.risk, ref.risk, dtype, "risk", scale=rows)


def test_topk_bad_inputs_name_the_argument():
    rows, m = 4, 10
    f = torch.randn(rows, m)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    p = torch.full((rows, 2), 0.4)
    cases = [
        (dict(teacher_topk=(idx.clone().index_fill_(1, torch.tensor([1]), 0), p)), "distinct"),
        (dict(teacher_topk=(idx + 5, p)), r"indices must lie in \[0, 10\)"),
        (dict(teacher_topk=(idx - 1, p)), r"indices must lie in \[0, 10\)"),
        (dict(teacher_topk=(idx, p + 0.2)), "sum to at most 1"),
        (dict(teacher_topk=(idx, -p)), "probs must be >= 0"),
        (dict(teacher_topk=(idx, torch.zeros(rows, 2))), "renormalize"),
        (dict(teacher_topk=(idx, p[:, :1])), "probs must have shape"),
        (dict(teacher_topk=(idx[:3], p)), "indices must have shape"),
        (dict(teacher_topk=(idx.float(), p)), "indices must be an integer"),
        (dict(teacher_topk=(torch.zeros(rows, 11, dtype=torch.long), torch.zeros(rows, 11))), "1 <= k <= m"),
        (dict(teacher_topk=(idx, p), topk_tail="bucket"), "topk_tail must be one of"),
        (dict(teacher_topk=idx), "pair"),
        (dict(teacher_topk=(idx, p), teacher_probs=torch.softmax(f, -1)), "one teacher"),
        (dict(teacher_topk=(idx, p.clone().requires_grad_())), "requires grad"),
        (dict(teacher_topk=(idx, p), teacher_weight=0.5), "needs labels"),
    ]
    for kwargs, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            distill_loss(f, **kwargs)
    distill_loss(f, teacher_topk=(idx, torch.zeros(rows, 2)), topk_tail="uniform")  # all mass in the tail: fine


@pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter test is for CPU"
)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
def test_topk_triton_interpreter(tail):
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(11)
    rows, m, k = 5, 24, 3
    idx, vals = _topk(rows, m, k, gen, spare=0.1 if tail == "uniform" else 0.0)
    f = torch.randn(rows, m, generator=gen).requires_grad_()
    labels = torch.randint(0, m, (rows,), generator=gen)
    out = topk_distill_loss(
        f, (idx, vals.float()), topk_tail=tail, labels=labels, teacher_weight=0.5, backend="triton", chunk_rows=2
    )
    out.loss.backward()
    a = torch.full((rows,), 0.5, dtype=torch.float64)
    want, ref = _reference(f, target=reference.topk_target(idx, vals.float().double(), m, tail), labels=labels, a=a)
    _close(out.loss, want, torch.float32, "loss")
    _close(f.grad, ref.grad, torch.float32, "grad")
    _close(out.mass, ref.mass, torch.float32, "mass")
    _close(out.error, ref.error, torch.float32, "error")


def test_topk_op_passes_opcheck():
    from rkd_engine.wide import distill_topk

    gen = torch.Generator().manual_seed(2)
    idx, vals = _topk(6, 12, 3, gen)
    f = torch.randn(6, 12, generator=gen, requires_grad=True)
    args = (f, idx, vals.float(), True, None, torch.ones(6), None, None, 1.0, "mean", True, "cpp", 4)
    torch.library.opcheck(
        distill_topk, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    )


# ------------------------------------------------------------------------------- fused output layer
def _layer(rows, hidden, m, dtype, gen, *, bias=True):
    x = torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
    weight = torch.randn(m, hidden, generator=gen, dtype=torch.float64) / hidden**0.5 * 3
    b = torch.randn(m, generator=gen, dtype=torch.float64) if bias else None
    return x.to(dtype), weight.to(dtype), None if b is None else b.to(dtype)


def _linear_reference(x, weight, bias, *, reduction="mean", divisor=None, ignore_index=-100, **loss_args):
    """Loss, gradients in X, W, b and statistics from the materialised scores, in float64.

    Rows labelled ``ignore_index`` are dropped; the mean divides by ``divisor`` (default: the rows kept).
    """
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    labels = loss_args.get("labels")
    keep = torch.ones(x.shape[0], dtype=torch.bool) if labels is None else labels != ignore_index
    row_args = dict(loss_args)
    if labels is not None:
        row_args["labels"] = torch.where(keep, labels, torch.zeros_like(labels))
    per_row = reference.linear_loss_rows(x64, w64, b64, **row_args) * keep
    if reduction == "mean":
        loss = per_row.sum() / (int(keep.sum()) if divisor is None else divisor)
    else:
        loss = per_row.sum()
    grads = torch.autograd.grad(loss, [t for t in (x64, w64, b64) if t is not None])
    scores = torch.nn.functional.linear(x64, w64, b64).detach()
    stats = reference.fused_rows(scores, **loss_args, need_grad=False, ignore_index=ignore_index)
    return loss.detach(), grads, stats


TEACHERS = ["logits", "head", "topk-renormalize", "topk-uniform", "labels-only"]


@pytest.mark.parametrize(("backend", "device"), CPU_BACKENDS)
@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("chunk_size", [1, 7, 20, 64], ids=lambda c: f"chunk{c}")
def test_fused_linear_matches_reference(backend, device, teacher, chunk_size):
    gen = torch.Generator().manual_seed(chunk_size * 17 + len(teacher))
    rows, hidden, hidden_t, m = 20, 12, 9, 33
    dtype = torch.float64
    x, weight, bias = _layer(rows, hidden, m, dtype, gen)
    labels = torch.randint(0, m, (rows,), generator=gen)
    c = torch.rand(m, generator=gen, dtype=dtype) + 0.2
    a = torch.rand(rows, generator=gen, dtype=dtype)
    kwargs = dict(labels=labels, teacher_weight=a, class_costs=c)
    ref_args = dict(labels=labels, a=a, log_c=c.log())
    if teacher == "logits":
        g = torch.randn(rows, m, generator=gen, dtype=dtype) * 2
        kwargs.update(teacher_logits=g, temperature=2.0)
        ref_args.update(teacher=g, gamma=2.0)
    elif teacher == "head":
        xt = torch.randn(rows, hidden_t, generator=gen, dtype=dtype)
        wt = torch.randn(m, hidden_t, generator=gen, dtype=dtype)
        bt = torch.randn(m, generator=gen, dtype=dtype)
        kwargs.update(teacher_input=xt, teacher_head_weight=wt, teacher_head_bias=bt, temperature=3.0)
        ref_args.update(teacher=xt @ wt.T + bt, gamma=3.0)
    elif teacher.startswith("topk"):
        tail = teacher.split("-")[1]
        idx, vals = _topk(rows, m, 4, gen, spare=0.3 if tail == "uniform" else 0.0)
        kwargs.update(teacher_topk=(idx, vals), topk_tail=tail)
        ref_args.update(teacher=reference.topk_target(idx, vals, m, tail), teacher_is_probs=True)
    else:
        kwargs.update(teacher_weight=0.0)
        ref_args.update(a=torch.zeros(rows, dtype=dtype))
    x.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    out = fused_linear_distill_loss(x, weight, bias, backend=backend, chunk_size=chunk_size, **kwargs)
    grads = torch.autograd.grad(out.loss, (x, weight, bias))
    want, want_grads, stats = _linear_reference(x, weight, bias, **ref_args)
    _close(out.loss, want, dtype, "loss")
    for name, got, ref in zip(("d input", "d weight", "d bias"), grads, want_grads, strict=True):
        _close(got, ref, dtype, name)
    for name in ("mass", "risk", "error"):
        _close(getattr(out, name), getattr(stats, name), dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_precision_and_tau(dtype):
    """fp32 and bf16 inputs against float64 (the weight gradient summed over chunks in fp32), with tau and w."""
    gen = torch.Generator().manual_seed(21)
    rows, hidden, m = 40, 16, 50
    x, weight, bias = _layer(rows, hidden, m, dtype, gen)
    g = torch.randn(rows, m, generator=gen, dtype=torch.float64).to(dtype)
    wt = torch.rand(m, generator=gen, dtype=torch.float64) + 0.5
    x.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    out = fused_linear_distill_loss(
        x, weight, bias, teacher_logits=g, class_weights=wt, student_temperature=2.0, chunk_size=8
    )
    grads = torch.autograd.grad(out.loss, (x, weight, bias))
    assert [t.dtype for t in grads] == [dtype] * 3
    a = torch.ones(rows, dtype=torch.float64)
    want, want_grads, stats = _linear_reference(x, weight, bias, teacher=g, a=a, w=wt, tau=2.0)
    # bf16 scores are rounded before the loss: allow a few roundings per element of the products
    scale = 4.0 if dtype == torch.bfloat16 else 1.0
    _close(out.loss, want, dtype, "loss", scale)
    for name, got, ref in zip(("d input", "d weight", "d bias"), grads, want_grads, strict=True):
        _close(got, ref, dtype, name, scale)
    _close(out.mass, stats.mass, dtype, "mass", rows)


def test_fused_linear_no_bias_sum_and_frozen_parts():
    gen = torch.Generator().manual_seed(4)
    rows, hidden, m = 9, 6, 14
    x, weight, _ = _layer(rows, hidden, m, torch.float64, gen, bias=False)
    labels = torch.randint(0, m, (rows,), generator=gen)
    weight.requires_grad_()  # frozen features: only the head learns
    out = fused_linear_distill_loss(x, weight, labels=labels, reduction="sum", chunk_size=4)
    out.loss.backward()
    want, (_, gw), _ = _linear_reference(x, weight, None, labels=labels, a=torch.zeros(rows), reduction="sum")
    _close(out.loss, want, torch.float64, "loss")
    _close(weight.grad, gw, torch.float64, "d weight")
    with torch.no_grad():  # per-row losses need no gradient
        none = fused_linear_distill_loss(x, weight, labels=labels, reduction="none", chunk_size=4)
    assert none.loss.shape == (rows,)
    torch.testing.assert_close(none.loss.sum(), out.loss.detach())


def test_fused_linear_gradient_accumulation_equals_the_big_batch():
    """Two micro-batches with ``reduction='sum'`` scaled by 1/B accumulate the big batch's mean gradient."""
    gen = torch.Generator().manual_seed(8)
    rows, hidden, m = 18, 8, 21
    x, w0, b0 = _layer(rows, hidden, m, torch.float64, gen)
    g = torch.randn(rows, m, generator=gen, dtype=torch.float64)
    head = torch.nn.Linear(hidden, m, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w0)
        head.bias.copy_(b0)
    big = fused_linear_distill_loss(x, head.weight, head.bias, teacher_logits=g, chunk_size=5)
    big.loss.backward()
    want = head.weight.grad.clone(), head.bias.grad.clone()
    head.zero_grad()
    for part in (slice(0, 11), slice(11, rows)):
        out = fused_linear_distill_loss(x[part], head.weight, head.bias, teacher_logits=g[part], reduction="sum")
        (out.loss / rows).backward()
    _close(head.weight.grad, want[0], torch.float64, "d weight")
    _close(head.bias.grad, want[1], torch.float64, "d bias")


def test_fused_linear_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(9)
    rows, hidden, m = 12, 8, 19
    head = torch.nn.Linear(hidden, m)
    teacher = torch.nn.Linear(5, m)
    x = torch.randn(rows, hidden, generator=gen, requires_grad=True)
    xt = torch.randn(rows, 5, generator=gen)

    def loss_of(x):
        out = fused_linear_distill_loss(
            x, head.weight, head.bias, teacher_input=xt, teacher_head_weight=teacher.weight,
            teacher_head_bias=teacher.bias, temperature=2.0, chunk_size=5, validate=False,
        )  # fmt: skip
        return out.loss * 3, out.mass

    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    loss, mass = compiled(x)
    loss.backward()
    got = x.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    x.grad = None
    head.zero_grad()
    want_loss, want_mass = loss_of(x)
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(mass, want_mass)
    for a, b in zip(got, (x.grad, head.weight.grad, head.bias.grad), strict=True):
        torch.testing.assert_close(a, b)


def test_fused_linear_op_passes_opcheck():
    from rkd_engine.wide import fused_linear_distill

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, generator=gen, requires_grad=True)
    weight = torch.randn(9, 4, generator=gen, requires_grad=True)
    bias = torch.randn(9, generator=gen, requires_grad=True)
    g = torch.randn(6, 9, generator=gen)
    args = (x, weight, bias, None, torch.ones(6), None, None, g, None, None, None, None, None, False, 1.0, 1.0,
            "mean", True, True, "cpp", 4)  # fmt: skip
    torch.library.opcheck(
        fused_linear_distill, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    )


def test_fused_linear_module_matches_the_loss_on_materialised_scores():
    from rkd_engine import RobustDistillationLoss

    gen = torch.Generator().manual_seed(12)
    rows, hidden, m = 16, 10, 7
    prior = torch.softmax(torch.randn(m, generator=gen), 0)
    fused = FusedLinearDistillationLoss(m, "tradeoff", alpha=0.5, temperature=2.0, prior=prior, chunk_size=5)
    plain = RobustDistillationLoss(m, "tradeoff", alpha=0.5, temperature=2.0, prior=prior)
    head = torch.nn.Linear(hidden, m)
    teacher = torch.nn.Linear(4, m)
    x = torch.randn(rows, hidden, generator=gen)
    xt = torch.randn(rows, 4, generator=gen)
    out = fused(x, head, teacher_input=xt, teacher_head=teacher)
    out.loss.backward()
    got = head.weight.grad.clone()
    head.zero_grad()
    with torch.no_grad():
        g = teacher(xt)
    want = plain(head(x), teacher_logits=g)
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss)
    torch.testing.assert_close(got, head.weight.grad)
    torch.testing.assert_close(out.error, want.error)
    with pytest.raises(TypeError, match="head must be an nn.Linear"):
        fused(x, torch.nn.Identity(), teacher_logits=g)


def test_fused_linear_bad_inputs_name_the_argument():
    rows, hidden, m = 4, 6, 8
    x = torch.randn(rows, hidden)
    weight = torch.randn(m, hidden, requires_grad=True)
    g = torch.randn(rows, m)
    cases = [
        (dict(student_head_weight=torch.randn(hidden, m + 1), teacher_logits=g), "student_head_weight must have shape"),
        (dict(student_head_weight=torch.randn(m)), r"student_head_weight must have shape \(m, H\)"),
        (dict(student_head_bias=torch.randn(m + 1), teacher_logits=g), "student_head_bias must have shape"),
        (dict(teacher_logits=g[:, :3]), "teacher_logits must have shape"),
        (dict(teacher_input=torch.randn(rows, 3)), "teacher_input needs teacher_head_weight"),
        (dict(teacher_input=torch.randn(rows, 3), teacher_head_weight=torch.randn(m, 4)), "teacher_head_weight must"),
        (dict(teacher_input=torch.randn(rows, 3), teacher_head_weight=torch.randn(m + 1, 3)), "teacher_head_weight"),
        (dict(teacher_head_weight=torch.randn(m, 3)), "need teacher_input"),
        (
            dict(teacher_logits=g, teacher_topk=(torch.zeros(rows, 1, dtype=torch.long), torch.ones(rows, 1))),
            "one teacher",
        ),
        (dict(teacher_logits=g, reduction="none"), "reduction='none' cannot be differentiated"),
        (dict(teacher_logits=g, chunk_size=0), "chunk_size must be a positive int"),
        (dict(teacher_topk=(torch.tensor([[1, 1]] * rows), torch.full((rows, 2), 0.3))), "distinct"),
        (dict(student_input=torch.randn(rows, hidden, 2), teacher_logits=g), "student_input must have shape"),
    ]
    for kwargs, match in cases:
        call = {"student_input": x, "student_head_weight": weight, **kwargs}
        with pytest.raises((ValueError, TypeError), match=match):
            fused_linear_distill_loss(call.pop("student_input"), call.pop("student_head_weight"), **call)


# ---------------------------------------------------------------------- ignored rows and the normaliser
@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
@pytest.mark.parametrize("mix", [1.0, 0.6])
def test_topk_ignored_rows_and_normalizer(tail, mix):
    gen = torch.Generator().manual_seed(31)
    rows, m, k = 14, 25, 4
    idx, vals = _topk(rows, m, k, gen, spare=0.1 if tail == "uniform" else 0.0)
    f = torch.randn(rows, m, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, m, (rows,), generator=gen)
    labels[[0, 3, 4, 13]] = -100  # at the edges of chunks of 4 rows
    target = reference.topk_target(idx, vals, m, tail)
    a = torch.full((rows,), mix, dtype=torch.float64)
    ref = reference.fused_rows(f.detach(), teacher=target, teacher_is_probs=True, labels=labels, a=a)
    for normalizer, divisor in ((None, rows - 4), (7.0, 7.0), (torch.tensor(5.0), 5.0)):
        out = distill_loss(
            f, teacher_topk=(idx, vals), topk_tail=tail, labels=labels, teacher_weight=mix, normalizer=normalizer
        )
        (grad,) = torch.autograd.grad(out.loss, f)
        _close(out.loss, ref.loss.sum() / divisor, torch.float64, "loss")
        _close(grad, ref.grad / divisor, torch.float64, "grad")
        assert grad[[0, 3, 4, 13]].abs().max() == 0
        for name in ("mass", "risk", "error"):
            _close(getattr(out, name), getattr(ref, name), torch.float64, name)


@pytest.mark.parametrize("teacher", ["head", "topk-uniform", "logits"])
def test_fused_linear_ignored_rows_at_chunk_edges(teacher):
    gen = torch.Generator().manual_seed(41)
    rows, hidden, hidden_t, m = 17, 10, 6, 23
    x, weight, bias = _layer(rows, hidden, m, torch.float64, gen)
    labels = torch.randint(0, m, (rows,), generator=gen)
    labels[[0, 3, 4, 7, 8, 16]] = -1  # first and last rows of chunks of 4, and the last row
    kwargs, ref_args = (
        dict(labels=labels, ignore_index=-1),
        dict(labels=labels, a=torch.ones(rows, dtype=torch.float64)),
    )
    if teacher == "head":
        xt = torch.randn(rows, hidden_t, generator=gen, dtype=torch.float64)
        wt = torch.randn(m, hidden_t, generator=gen, dtype=torch.float64)
        kwargs.update(teacher_input=xt, teacher_head_weight=wt)
        ref_args.update(teacher=xt @ wt.T)
    elif teacher == "logits":
        g = torch.randn(rows, m, generator=gen, dtype=torch.float64)
        kwargs.update(teacher_logits=g, teacher_weight=0.5)
        ref_args.update(teacher=g, a=torch.full((rows,), 0.5, dtype=torch.float64))
    else:
        idx, vals = _topk(rows, m, 3, gen, spare=0.2)
        kwargs.update(teacher_topk=(idx, vals), topk_tail="uniform")
        ref_args.update(teacher=reference.topk_target(idx, vals, m, "uniform"), teacher_is_probs=True)
    x.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    out = fused_linear_distill_loss(x, weight, bias, chunk_size=4, **kwargs)
    grads = torch.autograd.grad(out.loss, (x, weight, bias))
    want, want_grads, stats = _linear_reference(x, weight, bias, ignore_index=-1, **ref_args)
    _close(out.loss, want, torch.float64, "loss")
    for name, got, ref in zip(("d input", "d weight", "d bias"), grads, want_grads, strict=True):
        _close(got, ref, torch.float64, name)
    assert grads[0][[0, 3, 4, 7, 8, 16]].abs().max() == 0
    for name in ("mass", "risk", "error"):
        _close(getattr(out, name), getattr(stats, name), torch.float64, name)


def test_fused_linear_accumulation_with_normalizer_equals_the_big_batch():
    """Micro-batches with ``normalizer`` = the kept rows of the whole batch accumulate the big batch's step."""
    gen = torch.Generator().manual_seed(43)
    rows, hidden, m = 21, 8, 19
    x, w0, b0 = _layer(rows, hidden, m, torch.float64, gen)
    idx, vals = _topk(rows, m, 5, gen)
    labels = torch.randint(0, m, (rows,), generator=gen)
    labels[[2, 9, 10, 20]] = -100
    head = torch.nn.Linear(hidden, m, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w0)
        head.bias.copy_(b0)
    loss_fn = FusedLinearDistillationLoss(m, "balanced", prior=torch.full((m,), 1.0 / m), chunk_size=4)
    big = loss_fn(x, head, labels=labels, teacher_topk=(idx, vals))
    big.loss.backward()
    want = big.loss.detach(), head.weight.grad.clone(), head.bias.grad.clone()
    head.zero_grad()
    kept = (labels != -100).sum()  # a 0-d tensor, as a trainer's num_items_in_batch
    total = 0.0
    for part in (slice(0, 10), slice(10, rows)):
        out = loss_fn(x[part], head, labels=labels[part], teacher_topk=(idx[part], vals[part]), normalizer=kept)
        out.loss.backward()
        total = total + out.loss.detach()
    _close(total, want[0], torch.float64, "loss")
    _close(head.weight.grad, want[1], torch.float64, "d weight")
    _close(head.bias.grad, want[2], torch.float64, "d bias")


def test_fused_linear_all_rows_ignored_gives_zeros():
    gen = torch.Generator().manual_seed(47)
    x, weight, bias = _layer(6, 4, 9, torch.float32, gen)
    weight.requires_grad_()
    labels = torch.full((6,), -100)
    out = fused_linear_distill_loss(x, weight, bias, labels=labels, chunk_size=4)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and weight.grad.abs().max() == 0 and out.mass.abs().max() == 0
