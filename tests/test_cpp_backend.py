"""The C++ CPU backend (``rkd_engine._C`` through ``rkd_engine.ops.cpp_backend``) against the float64 reference.

Every check runs on each instruction-set path the CPU has (``avx512``, ``avx2`` and the portable
``generic`` one); the others are reported as skipped. The reference is evaluated in float64 on the
inputs as the backend sees them (already rounded to the test dtype), so loss and statistics, accumulated
in float32 for every reduced dtype, are held to float32 tolerances, and the gradient additionally to one
rounding to the storage dtype.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_TOL, make_inputs

from rkd_engine import reference
from rkd_engine.ops import cpp_backend

_REASON = cpp_backend.unavailable_reason(torch.device("cpu"), torch.float32, 16)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ backend unavailable: {_REASON}")

if _REASON is None:
    from rkd_engine import _C

    def _usable(name: str) -> bool:
        before = _C.cpu_isa()
        try:
            _C.set_cpu_isa(name)
        except RuntimeError:
            return False
        finally:
            _C.set_cpu_isa(before)
        return True

    # Every vector path is tested where the CPU has it; a missing one is reported as skipped (see `isa`).
    ALL_ISAS = ["generic", "avx2", "avx512"]
    ISAS = [name for name in ALL_ISAS if _usable(name)]
    DEFAULT_TILING = _C.get_tiling()
    WIDE = DEFAULT_TILING[0] + 2 * DEFAULT_TILING[1] + 5  # wider than a whole row: several tiles, one partial
else:
    ALL_ISAS, ISAS, DEFAULT_TILING, WIDE = ["generic"], ["generic"], (0, 0), 0


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    if request.param not in ISAS:
        pytest.skip(f"this CPU or build has no {request.param} kernels")
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa("auto")


@pytest.fixture(params=["whole", "tiled"])
def tiling(request):
    """``whole``: the default (rows held whole in scratch); ``tiled``: tiles of 64 classes on every row, so
    small rows run the online max/sum pass and the second pass of wide rows."""
    if request.param == "tiled":
        _C.set_tiling(0, 64)
    yield request.param
    _C.set_tiling(*DEFAULT_TILING)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _case(
    rows,
    m,
    dtype,
    *,
    regime="normal",
    teacher="logits",
    labels=True,
    a="mix",
    costs=False,
    weights=False,
    gamma=2.0,
    seed=0,
):
    """Inputs in the backend's dtypes: (student, teacher, labels, a, log_c, w)."""
    f, g, y = make_inputs(rows, m, dtype, "cpu", regime, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    acc = _acc(dtype)
    if teacher is None:
        a_vals = torch.zeros(rows)
    elif not labels:
        a_vals = torch.ones(rows)
    elif a == "rows":  # per-row weights with exact 0 and 1 among them (label-only and teacher-only rows)
        a_vals = torch.rand(rows, generator=gen)
        a_vals[::3] = 0.0
        a_vals[1::3] = 1.0
    else:
        a_vals = torch.full((rows,), {"mix": 0.3, "teacher": 1.0, "labels": 0.0}[a])
    t = None
    if teacher == "logits":
        t = g
    elif teacher == "probs":
        t = torch.softmax(g.double() / gamma, dim=-1).to(dtype)
    log_c = (torch.randn(m, generator=gen) * 2).to(acc) if costs else None
    w = (torch.rand(m, generator=gen) * 1.5 + 0.25).to(acc) if weights else None
    return f, t, (y if labels else None), a_vals.to(acc), log_c, w


def _reference(f, t, y, a, log_c, w, *, gamma, tau, probs, grad_scale):
    as64 = lambda x: None if x is None else x.double()  # noqa: E731 - a one-line helper
    return reference.fused_rows(
        f.double(),
        teacher=as64(t),
        teacher_is_probs=probs,
        labels=y,
        a=a.double(),
        gamma=gamma,
        log_c=as64(log_c),
        w=as64(w),
        tau=tau,
        grad_scale=grad_scale,
    )


def _run(f, t, y, a, log_c, w, *, gamma, tau, probs, grad_scale=0.25, need_grad=True, grad_out=None):
    return cpp_backend.fused_forward(
        f,
        t,
        y,
        a,
        log_c,
        w,
        gamma=gamma,
        tau=tau,
        teacher_is_probs=probs,
        grad_scale=grad_scale,
        need_grad=need_grad,
        grad_out=grad_out,
    )


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * scale, msg=lambda s: f"{what}: {s}")


def _check(inputs, dtype, *, gamma=2.0, tau=1.0, probs=False, grad_scale=0.25):
    f, t, y, a, log_c, w = inputs
    out = _run(f, t, y, a, log_c, w, gamma=gamma, tau=tau, probs=probs, grad_scale=grad_scale)
    ref = _reference(f, t, y, a, log_c, w, gamma=gamma, tau=tau, probs=probs, grad_scale=grad_scale)
    acc_tol, grad_tol = CPU_TOL[dtype]
    acc = _acc(dtype)
    loss, grad, mass, risk, error = out
    assert loss.dtype == mass.dtype == risk.dtype == error.dtype == acc
    assert grad.dtype == dtype and grad.shape == f.shape
    _close(loss, ref.loss, acc_tol, "loss")
    grad_scale_ref = max(ref.grad.abs().max().item(), 1e-30)
    torch.testing.assert_close(
        grad.double(), ref.grad, rtol=grad_tol, atol=grad_tol * grad_scale_ref, msg=lambda s: f"grad: {s}"
    )
    for name, got in (("mass", mass), ("risk", risk), ("error", error)):
        _close(got, getattr(ref, name), acc_tol * 4, name)
    assert torch.isfinite(loss).all()
    return out


# Option sets covering every input of the contract: teacher kind, labels, a, costs, weights.
OPTIONS = {
    "labels-only": dict(teacher=None),
    "labels-costs-weights": dict(teacher=None, costs=True, weights=True),
    "teacher-only": dict(labels=False),
    "teacher-only-costs": dict(labels=False, costs=True),
    "mix": dict(a="mix", costs=True),
    "rows-weights": dict(a="rows", costs=True, weights=True),
    "probs-only": dict(teacher="probs", labels=False, weights=True),
    "probs-rows": dict(teacher="probs", a="rows", costs=True),
}


@pytest.mark.parametrize("m", [1, 2, 3, 10, 1001])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_float64_all_options(isa, tiling, m, option, tau):
    opts = OPTIONS[option]
    inputs = _case(9, m, torch.float64, seed=m, **opts)
    _check(inputs, torch.float64, tau=tau, probs=opts.get("teacher") == "probs")


@pytest.mark.parametrize("option", ["rows-weights", "probs-rows", "labels-only"])
def test_float64_wide_rows(isa, tiling, option):
    opts = OPTIONS[option]
    inputs = _case(3, 50257, torch.float64, seed=3, **opts)
    _check(inputs, torch.float64, tau=1.7, probs=opts.get("teacher") == "probs")


@pytest.mark.parametrize("gamma", [0.1, 1.0, 20.0])
@pytest.mark.parametrize("tau", [0.1, 1.0, 20.0])
@pytest.mark.parametrize("regime", ["normal", "peaked", "equal", "huge", "masked"])
def test_regimes_temperatures(isa, tiling, regime, gamma, tau):
    for dtype in (torch.float64, torch.float32):
        inputs = _case(16, 137, dtype, regime=regime, a="rows", costs=True, weights=True, gamma=gamma, seed=11)
        _check(inputs, dtype, gamma=gamma, tau=tau)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [3, 1001])
@pytest.mark.parametrize("regime", ["normal", "peaked", "huge", "masked"])
def test_reduced_precision(isa, tiling, dtype, m, regime):
    rows = 24
    inputs = _case(rows, m, dtype, regime=regime, a="rows", costs=True, seed=5)
    _check(inputs, dtype, gamma=1.5)
    probs = _case(rows, m, dtype, regime=regime, teacher="probs", a="rows", weights=True, seed=6)
    _check(probs, dtype, tau=2.0, probs=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("regime", ["huge", "masked"])
@pytest.mark.parametrize("m", [WIDE, 262144])
def test_default_tiles_of_wide_rows(isa, dtype, regime, m):
    inputs = _case(1 if m > WIDE else 2, m, dtype, regime=regime, a="rows", costs=True, weights=True, seed=8)
    _check(inputs, dtype, gamma=0.5, tau=1.0)


@pytest.mark.parametrize(
    "dtype, rows, m", [(torch.float32, 2048, 1024), (torch.float32, 2100, 1001), (torch.bfloat16, 4096, 1024)]
)
def test_large_gradient_is_streamed_identically(isa, dtype, rows, m):
    """Gradients of 8 MiB or more written into memory given as ``grad_out`` (the kept memory of the previous
    gradient, in a training loop) use non-temporal stores (on rows that are aligned for them): the values
    must be bit for bit those of a small call, which stores normally."""
    inputs = _case(rows, m, dtype, a="rows", costs=True, seed=12)
    big = _run(*inputs, gamma=1.0, tau=1.0, probs=False, grad_out=torch.zeros_like(inputs[0]))
    head = [None if x is None else x[:6] for x in inputs[:4]] + list(inputs[4:])
    small = _run(*head, gamma=1.0, tau=1.0, probs=False)
    assert torch.equal(big[0][:6], small[0])
    assert torch.equal(big[1][:6], small[1])


@pytest.mark.parametrize("m", [7, 1001])
def test_masked_classes_have_exactly_zero_statistics(isa, tiling, m):
    f, g, _ = make_inputs(5, m, torch.float32, "cpu", "normal", 2)
    g[:, 1::2] = float("-inf")
    out = _run(f, g, None, torch.ones(5), None, None, gamma=0.5, tau=1.0, probs=False)
    for stat in out[2:]:
        assert torch.all(stat[1::2] == 0)
        assert torch.all(stat[0::2] > 0) or stat is out[4]
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()


def test_label_statistics_are_exact(isa):
    rows, m = 64, 10
    f, _, y = make_inputs(rows, m, torch.float32, "cpu", "normal", 4)
    f[torch.arange(rows), y] += 100.0  # every prediction is right
    out = _run(f, None, y, torch.zeros(rows), None, None, gamma=1.0, tau=1.0, probs=False)
    counts = torch.bincount(y, minlength=m).float()
    assert torch.equal(out[2], counts)
    assert torch.equal(out[4], torch.zeros(m))


def test_argmax_first_index_on_ties(isa):
    f = torch.zeros(2, 5)
    f[:, 1] = 3.0
    f[:, 3] = 3.0
    y = torch.tensor([1, 3])
    out = _run(f, None, y, torch.zeros(2), None, None, gamma=1.0, tau=1.0, probs=False)
    assert out[4].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]  # h = 1 for both rows: row 2 (label 3) is wrong


@pytest.mark.parametrize("m", [33, 1001])
def test_need_grad_false_writes_nothing(isa, tiling, m):
    f, t, y, a, log_c, w = _case(4, m, torch.float32, a="rows", costs=True)
    sentinel = torch.full_like(f, 7.0)
    student = f.clone()
    out = _run(student, t, y, a, log_c, w, gamma=2.0, tau=1.0, probs=False, need_grad=False, grad_out=sentinel)
    assert out[1].numel() == 0
    assert torch.equal(sentinel, torch.full_like(f, 7.0))
    assert torch.equal(student, f)
    full = _run(f, t, y, a, log_c, w, gamma=2.0, tau=1.0, probs=False)
    for got, want in zip(out[:1] + out[2:], full[:1] + full[2:], strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1001, 4099])
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_grad_out_may_alias_the_student(isa, tiling, dtype, m, tau):
    f, t, y, a, log_c, w = _case(4, m, dtype, a="rows", costs=True, weights=True)
    expected = _run(f, t, y, a, log_c, w, gamma=2.0, tau=tau, probs=False)
    inplace = f.clone()
    out = _run(inplace, t, y, a, log_c, w, gamma=2.0, tau=tau, probs=False, grad_out=inplace)
    assert out[1].data_ptr() == inplace.data_ptr()
    for got, want in zip(out, expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 13, 1001])
def test_scale_rows_skips_rows_with_unit_scale(isa, dtype, m):
    rows = 12
    gen = torch.Generator().manual_seed(m)
    grad = torch.randn(rows, m, generator=gen).to(dtype)
    go = torch.rand(rows, generator=gen, dtype=torch.float64).to(_acc(dtype)) * 3
    go[::2] = 1.0
    # Rows with go == 1 hold signalling NaNs: multiplying one (even by 1) would quieten it.
    bits = {torch.float64: 0x7FF0000000000001, torch.float32: 0x7F800001}.get(
        dtype, 0x7C01 if dtype == torch.float16 else 0x7F81
    )
    int_dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16}[grad.element_size()]
    grad.view(int_dtype)[::2] = bits
    expected = (grad.to(_acc(dtype)) * go.unsqueeze(1)).to(dtype)
    before = grad.view(int_dtype)[::2].clone()
    cpp_backend.scale_rows_(grad, go)
    assert torch.equal(grad.view(int_dtype)[::2], before)
    assert torch.equal(grad[1::2], expected[1::2])


@pytest.mark.parametrize("name", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_isas_agree(name, dtype):
    if name not in ISAS:
        pytest.skip(f"this CPU or build has no {name} path to compare")
    inputs = _case(32, 1001, dtype, a="rows", costs=True, weights=True, seed=9)
    outs = {}
    for isa_name in ("generic", name):
        _C.set_cpu_isa(isa_name)
        outs[isa_name] = _run(*inputs, gamma=0.7, tau=1.0, probs=False)
    _C.set_cpu_isa("auto")
    grad_tol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-2, 1e-5)  # one storage rounding apart at most
    for k, (got, want) in enumerate(zip(outs[name], outs["generic"], strict=True)):
        rtol, atol = grad_tol if k == 1 else (1e-5, 1e-6)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_auto_picks_the_widest_isa():
    _C.set_cpu_isa("auto")
    assert _C.cpu_isa() == ISAS[-1]
    with pytest.raises(RuntimeError, match="cpu isa must be"):
        _C.set_cpu_isa("sse9")
    assert _C.cpu_isa() == ISAS[-1]


def test_repeatable_and_empty_batch(isa):
    inputs = _case(40, 257, torch.float32, a="rows", costs=True)
    first = _run(*inputs, gamma=1.0, tau=1.0, probs=False)
    again = _run(*inputs, gamma=1.0, tau=1.0, probs=False)
    assert all(torch.equal(x, z) for x, z in zip(first, again, strict=True))
    f = torch.empty(0, 6)
    loss, grad, mass, risk, error = _run(
        f, None, torch.empty(0, dtype=torch.long), torch.empty(0), None, None, gamma=1.0, tau=1.0, probs=False
    )
    assert loss.shape == (0,) and grad.shape == (0, 6)
    assert torch.equal(mass, torch.zeros(6)) and torch.equal(error, torch.zeros(6)) and torch.equal(risk, mass)


def _bad(**changes):
    f, t, y, a, log_c, w = _case(4, 5, torch.float32, costs=True)
    kwargs = dict(student=f, teacher=t, labels=y, a=a, log_c=log_c, w=w, gamma=1.0, tau=1.0, probs=False)
    kwargs.update(changes)
    student, teacher, labels = kwargs.pop("student"), kwargs.pop("teacher"), kwargs.pop("labels")
    return lambda: _run(student, teacher, labels, kwargs.pop("a"), kwargs.pop("log_c"), kwargs.pop("w"), **kwargs)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(labels=torch.tensor([0, 1, 5, 2])), "labels must be in"),
        (dict(labels=torch.tensor([0, -1, 2, 2])), "labels must be in"),
        (dict(labels=torch.tensor([0, 1, 2], dtype=torch.long)), "labels must have shape"),
        (dict(labels=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), "labels must be Long"),
        (dict(a=torch.ones(4, dtype=torch.float64)), "a must be Float"),
        (dict(log_c=torch.zeros(4)), "log_c must have shape"),
        (dict(w=torch.ones(5, dtype=torch.float16)), "w must be Float"),
        (dict(teacher=torch.zeros(4, 6)), "teacher must have shape"),
        (dict(teacher=torch.zeros(4, 5, dtype=torch.float64)), "teacher must be Float"),
        (dict(student=torch.zeros(5, 4).t()), "must be contiguous"),
        (dict(student=torch.zeros(4, 5, dtype=torch.int32)), "student scores must be float32"),
        (dict(student=torch.zeros(4, 0)), "at least one class"),
        (dict(teacher=None, labels=None), "need labels, a teacher, or both"),
        (dict(tau=0.0), "tau must be finite and > 0"),
        (dict(tau=float("nan")), "tau must be finite and > 0"),
        (dict(gamma=-1.0), "gamma must be finite and > 0"),
    ],
)
def test_bad_inputs_raise_clear_errors(changes, message):
    with pytest.raises(RuntimeError, match=message):
        _bad(**changes)()


def _narrow_case(dtype, option, seed):
    """67 rows of 13 classes (whole groups of W rows plus a tail) with -inf entries, one row ignored."""
    opts = OPTIONS[option]
    f, t, y, a, log_c, w = _case(67, 13, dtype, regime="masked", seed=seed, **opts)
    if y is not None:
        y = y.clone()
        y[21] = -100
    return f, t, y, a, log_c, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_narrow_path_matches_row_kernel(isa, dtype, option, tau):
    """Calls of at most ``get_narrow_max()`` classes take W rows per vector (csrc/cpu/distill_narrow.h) where a
    group of rows is regular, and the row kernel elsewhere (an ignored row, a = 0 rows, the tail): the same
    losses, gradients and statistics as the row kernel alone, up to float rounding, and as the reference."""
    assert 13 <= _C.get_narrow_max()
    f, t, y, a, log_c, w = _narrow_case(dtype, option, seed=4)
    probs = OPTIONS[option].get("teacher") == "probs"
    kw = dict(gamma=1.5, tau=tau, teacher_is_probs=probs, grad_scale=0.25, need_grad=True, ignore_index=-100)
    narrow = cpp_backend.fused_forward(f, t, y, a, log_c, w, **kw)
    before = _C.get_narrow_max()
    _C.set_narrow_max(0)
    try:
        rows = cpp_backend.fused_forward(f, t, y, a, log_c, w, **kw)
    finally:
        _C.set_narrow_max(before)
    acc_tol, grad_tol = CPU_TOL[dtype]
    for name, got, want in zip(("loss", "grad", "mass", "risk", "error"), narrow, rows, strict=True):
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), name
        ok = torch.isfinite(want)
        tol = grad_tol if name == "grad" else 4 * acc_tol
        _close(got[ok], want[ok].double(), tol, f"narrow vs row kernel: {name}")
    if y is not None:
        assert narrow[0][21] == 0 and not narrow[1][21].any()  # the ignored row
    keep = torch.ones(67, dtype=torch.bool) if y is None else y != -100
    ref = _reference(f[keep], t if t is None else t[keep], y if y is None else y[keep], a[keep], log_c, w,
                     gamma=1.5, tau=tau, probs=probs, grad_scale=0.25)  # fmt: skip
    ok = torch.isfinite(ref.loss)
    _close(narrow[0][keep][ok], ref.loss[ok], acc_tol, "narrow vs reference: loss")


def test_narrow_path_flags_bad_teacher_rows(isa):
    """A teacher-probability row off 1 inside a regular group gets a NaN loss (the call's status), and only it."""
    f, t, y, a, log_c, w = _case(16, 10, torch.float32, teacher="probs", labels=False, seed=2)
    t = t.clone()
    t[3, 0] += 0.5
    loss = cpp_backend.fused_forward(f, t, y, a, log_c, w, gamma=1.0, tau=1.0, teacher_is_probs=True,
                                     grad_scale=1.0, need_grad=False)[0]  # fmt: skip
    assert torch.isnan(loss[3]) and torch.isfinite(loss[torch.arange(16) != 3]).all()


@pytest.mark.parametrize("option", ["labels-only", "mix"])
@pytest.mark.parametrize("m", [10, 100, 1001])
def test_subnormal_results_are_flushed(isa, tiling, option, m):
    """The kernels flush subnormal results to zero (distill_kernel.h, FlushToZero): on many x86 cores each
    one costs a microcode assist. Very peaked rows (exp(u) at its floor of 2^-125 for most classes) and
    the padding lanes of a row's last partial vector would otherwise make them in every row; the gradient
    still matches the reference (the flushed values lie below float32's smallest normal number)."""
    f, t, y, a, log_c, w = _case(64, m, torch.float32, **OPTIONS[option])
    f = f * 300  # a logit spread of some 1000: exp(u) and the teacher's p underflow for most classes
    t = None if t is None else t * 300
    out = _check((f, t, y, a, log_c, w), torch.float32, grad_scale=1.0 / 64)
    grad = out[1]
    assert int(((grad != 0) & (grad.abs() < torch.finfo(torch.float32).tiny)).sum()) == 0
    if m > 10:
        assert int((grad == 0).sum()) > 0  # the flushed classes are there


def test_caller_float_mode_is_restored():
    """The flush-to-zero mode is the kernels' own: after a call (one thread, or the caller's thread inside
    a parallel region) the caller's arithmetic makes subnormal numbers again."""
    threads = torch.get_num_threads()
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            f, t, y, a, log_c, w = _case(4096 if n > 1 else 8, 100, torch.float32)
            _run(f, t, y, a, log_c, w, gamma=2.0, tau=1.0, probs=False)
            tiny = torch.tensor(1e-30) * torch.tensor(1e-10)
            assert 0 < tiny.item() < torch.finfo(torch.float32).tiny
    finally:
        torch.set_num_threads(threads)


def test_set_narrow_max_rejects_bad_values():
    before = _C.get_narrow_max()
    with pytest.raises(RuntimeError, match="narrow_max must be in"):
        _C.set_narrow_max(-1)
    assert _C.get_narrow_max() == before


def test_set_tiling_rejects_bad_values():
    with pytest.raises(RuntimeError, match="tile must be a positive multiple"):
        _C.set_tiling(100, 24)
    assert _C.get_tiling() == DEFAULT_TILING


def test_unavailable_reason():
    assert cpp_backend.unavailable_reason(torch.device("cpu"), torch.bfloat16, 50257) is None
    assert "CPU tensors only" in cpp_backend.unavailable_reason(torch.device("cuda"), torch.float32, 10)
    assert "supports float32" in cpp_backend.unavailable_reason(torch.device("cpu"), torch.int64, 10)


@pytest.mark.parametrize("m", [7, 1001])
@pytest.mark.parametrize("weights", [False, True])
def test_masked_student_and_teacher_columns(isa, tiling, m, weights):
    """Columns where both the student and the teacher score are -inf have q = 0: they add exactly 0 to the
    loss (summed in pass B at tau = 1 without w, from pass A's sums otherwise) and to the statistics, never
    0 * inf = NaN."""
    f, g, y = make_inputs(6, m, torch.float32, "cpu", "normal", 5)
    f[:, 1::2] = float("-inf")
    g[:, 1::2] = float("-inf")
    y = y - y % 2  # labels on unmasked columns
    a = torch.tensor([1.0, 1.0, 0.5, 0.5, 1.0, 0.25])
    w = torch.rand(m, generator=torch.Generator().manual_seed(1)) + 0.5 if weights else None
    out = _check((f, g, y, a, None, w), torch.float32, gamma=0.7)
    for stat in out[2:]:
        assert torch.all(stat[1::2] == 0)
    assert torch.all(out[1][:, 1::2].abs() < 1e-30)  # s there is the clamped exp, about 2e-38


@pytest.fixture
def reuse_small(monkeypatch):
    """Gradient memory kept and reused at any size (the default starts at 8 MiB), this thread's cache empty."""
    monkeypatch.setattr(cpp_backend, "REUSE_GRAD_BYTES", 0)
    cpp_backend.release_buffers()
    yield
    cpp_backend.release_buffers()


def _step_grad(f, g, costs):
    from rkd_engine import distill_loss

    f.grad = None
    distill_loss(f, teacher_logits=g, class_costs=costs, backend="cpp").loss.backward()
    return f.grad


def test_gradient_memory_is_reused_once_dropped(reuse_small):
    """A training loop drops each step's gradient before the next step: the next call writes the same memory
    (no fresh allocation to fault in), and every step's gradient is the reference's."""
    torch.manual_seed(0)
    f = torch.randn(16, 30, requires_grad=True)
    costs = torch.rand(30) + 0.5
    pointers = []
    for _ in range(4):
        g = torch.randn(16, 30)
        got = _step_grad(f, g, costs).clone()
        pointers.append(f.grad.data_ptr())
        want = torch.autograd.grad(
            reference.loss_rows(f, teacher=g, a=torch.ones(16), gamma=1.0, log_c=costs.log()).mean(), f
        )[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert len(set(pointers[1:])) == 1  # from the second step on, one buffer


def test_gradient_memory_in_use_is_never_written(reuse_small):
    """Memory some tensor still uses is not reused: a kept gradient, a view of it, an alias (detach), or a
    graph not yet backpropagated (its saved gradient)."""
    torch.manual_seed(1)
    f = torch.randn(8, 12, requires_grad=True)
    costs = torch.rand(12) + 0.5
    for keep in (lambda t: t, lambda t: t.view(-1), lambda t: t.detach()):
        held = keep(_step_grad(f, torch.randn(8, 12), costs))
        before = held.clone()
        _step_grad(f, torch.randn(8, 12), costs)  # drops f.grad; `held` still uses its memory
        assert torch.equal(held, before)
        del held
    from rkd_engine import distill_loss

    g1, g2 = torch.randn(8, 12), torch.randn(8, 12)
    f.grad = None
    pending = distill_loss(f, teacher_logits=g1, class_costs=costs, backend="cpp").loss  # graph saves its gradient
    distill_loss(f, teacher_logits=g2, class_costs=costs, backend="cpp")  # must not write that gradient
    pending.backward()
    want = torch.autograd.grad(
        reference.loss_rows(f, teacher=g1, a=torch.ones(8), gamma=1.0, log_c=costs.log()).mean(), f
    )[0]
    torch.testing.assert_close(f.grad, want, rtol=1e-5, atol=1e-7)


def test_release_buffers_drops_the_kept_memory(reuse_small):
    """``release_buffers`` forgets the kept memory; a storage the caller still holds is never reused."""
    f = torch.randn(8, 12, requires_grad=True)
    costs = torch.rand(12) + 0.5
    _step_grad(f, torch.randn(8, 12), costs)
    held = f.grad.untyped_storage()  # the caller keeps the gradient's memory, not the tensor
    before = torch.frombuffer(bytearray(bytes(held)), dtype=torch.float32).clone()
    _step_grad(f, torch.randn(8, 12), costs)
    assert torch.equal(torch.frombuffer(bytearray(bytes(held)), dtype=torch.float32), before)
    assert cpp_backend._buffers.grad is not None
    cpp_backend.release_buffers()
    assert cpp_backend._buffers.grad is None


def test_topk_gradient_memory_is_reused_once_dropped(monkeypatch):
    """The sparse top-k kernel keeps its dense gradient's memory as the dense kernel does: from the second
    step on one buffer, and every step's gradient equal to one computed into fresh memory."""
    from rkd_engine import distill_loss

    gen = torch.Generator().manual_seed(3)
    f = torch.randn(12, 40, generator=gen, requires_grad=True)
    steps = []
    for _ in range(3):
        p = torch.softmax(torch.randn(12, 40, generator=gen) * 2, -1)
        vals, idx = p.topk(5, -1)
        steps.append((idx, vals.float()))

    def grads(reuse_bytes):
        monkeypatch.setattr(cpp_backend, "REUSE_GRAD_BYTES", reuse_bytes)
        cpp_backend.release_buffers()
        out = []
        for idx, vals in steps:
            f.grad = None
            distill_loss(f, teacher_topk=(idx, vals), backend="cpp").loss.backward()
            out.append((f.grad.clone(), f.grad.data_ptr()))
        cpp_backend.release_buffers()
        return out

    reused, fresh = grads(0), grads(1 << 62)
    assert len({ptr for _, ptr in reused[1:]}) == 1
    for (got, _), (want, _) in zip(reused, fresh, strict=True):
        assert torch.equal(got, want)
