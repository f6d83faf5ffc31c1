"""The CUDA backend (``rkd_engine.ops.cuda_backend``) against the float64 reference, on a GPU.

Every test needs a CUDA device and the built extension ``rkd_engine._C_cuda``; without them it is skipped
with the reason, or fails when ``RKD_REQUIRE_CUDA_EXT=1`` (set it on a GPU machine so that an extension that
silently failed to build cannot pass as skipped). Nothing here queries the GPU at import time.

Inputs are rounded to the tested dtype first and the reference runs on those rounded values in float64,
so the tolerances measure the kernel alone: fp32 arithmetic for the loss and statistics, plus one rounding
of the gradient to the student dtype.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from conftest import GPU_GRAD_TOL, GPU_STAT_TOL, make_inputs

from rkd_engine import reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def cuda():
    """The backend module, once a CUDA device and the extension are present (else skip, or fail if required)."""
    from rkd_engine.ops import cuda_backend

    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA device"
    else:
        reason = cuda_backend.unavailable_reason(torch.device("cuda"), torch.float32, 16)
    if reason is not None:
        if os.environ.get("RKD_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"RKD_REQUIRE_CUDA_EXT=1 but the CUDA backend cannot run: {reason}")
        pytest.skip(f"CUDA backend unavailable: {reason}")
    return cuda_backend


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol_frac: float, what: str) -> None:
    got = got.double().cpu()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), f"{what}: non-finite entries differ"
    scale = want[finite].abs().max().item() if finite.any() else 0.0
    torch.testing.assert_close(got[finite], want[finite], rtol=rtol, atol=atol_frac * max(scale, 1e-30), msg=what)


def _run(cuda, f, g, y, a, log_c, w, *, gamma=1.0, tau=1.0, probs=False, grad_scale=1.0, need_grad=True):
    """Kernel outputs and the float64 reference on the same (rounded) inputs."""
    out = cuda.fused_forward(
        f, g, y, a, log_c, w, gamma=gamma, tau=tau, teacher_is_probs=probs, grad_scale=grad_scale, need_grad=need_grad
    )
    ref = reference.fused_rows(
        f.double().cpu(),
        teacher=None if g is None else g.double().cpu(),
        teacher_is_probs=probs,
        labels=None if y is None else y.cpu(),
        a=a.double().cpu(),
        gamma=gamma,
        log_c=None if log_c is None else log_c.double().cpu(),
        w=None if w is None else w.double().cpu(),
        tau=tau,
        grad_scale=grad_scale,
        need_grad=need_grad,
    )
    return out, ref


def _check(out, ref, dtype, need_grad=True):
    loss, grad, mass, risk, error = out
    for name, got, want in (
        ("loss", loss, ref.loss),
        ("mass", mass, ref.mass),
        ("risk", risk, ref.risk),
        ("error", error, ref.error),
    ):
        assert got.dtype == torch.float32 and got.is_cuda, name
        _close(got, want, *GPU_STAT_TOL, name)
    if need_grad:
        assert grad.dtype == dtype and grad.is_cuda
        _close(grad, ref.grad, *GPU_GRAD_TOL[dtype], "grad")
    else:
        assert grad.numel() == 0


def _setup(kind: str, rows: int, m: int, seed: int):
    """(use teacher, use labels, a, log c, w) of an objective, as CUDA tensors."""
    gen = torch.Generator().manual_seed(seed)
    prior = torch.rand(m, generator=gen) + 0.05
    prior = prior / prior.sum()
    log_c = None
    w = None
    if kind == "teacher-standard":
        teacher, labels, a = False, True, torch.zeros(rows)
    elif kind == "teacher-balanced":
        teacher, labels, a, log_c = False, True, torch.zeros(rows), (1.0 / prior).log()
    elif kind == "student-robust":
        lam = torch.softmax(torch.randn(m, generator=gen), 0)
        teacher, labels, a, log_c = True, False, torch.ones(rows), (lam / prior).log()
    else:  # hinton-mix: per-row teacher weight, costs and class weights
        teacher, labels = True, True
        a = torch.rand(rows, generator=gen)
        a[0] = 0.0
        a[-1] = 1.0
        log_c = (1.0 / prior).log()
        w = torch.rand(m, generator=gen) + 0.5
    cu = lambda t: None if t is None else t.to("cuda", torch.float32)  # noqa: E731
    return teacher, labels, cu(a), cu(log_c), cu(w)


SHAPES = [(7, 1), (5, 3), (33, 10), (9, 100), (40, 256), (6, 1001), (4, 4096), (3, 4104), (3, 50257), (2, 131072)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,m", SHAPES)
@pytest.mark.parametrize("kind", ["teacher-standard", "teacher-balanced", "student-robust", "hinton-mix"])
def test_matches_reference(cuda, kind, rows, m, dtype):
    seed = 17 * rows + m
    f, g, y = make_inputs(rows, m, dtype, "cuda", "normal", seed)
    teacher, labels, a, log_c, w = _setup(kind, rows, m, seed)
    out, ref = _run(
        cuda,
        f,
        g if teacher else None,
        y if labels else None,
        a,
        log_c,
        w,
        gamma=2.0,
        tau=1.0 if m % 2 else 1.5,
        grad_scale=1.0 / rows,
    )
    _check(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [37, 1000, 5000])
@pytest.mark.parametrize("regime", ["normal", "peaked", "equal", "huge", "masked"])
@pytest.mark.parametrize("gamma,tau", [(0.1, 1.0), (1.0, 1.0), (5.0, 3.0), (20.0, 0.1), (1.0, 20.0)])
def test_regimes_and_temperatures(cuda, regime, gamma, tau, m, dtype):
    rows = 11
    seed = zlib.crc32(repr((regime, gamma, tau, m)).encode()) % 10_000
    f, g, y = make_inputs(rows, m, dtype, "cuda", regime, seed)
    teacher, labels, a, log_c, w = _setup("hinton-mix", rows, m, seed)
    if regime == "masked":
        a = torch.ones_like(a)  # a hard label on a masked class would make the loss infinite
    out, ref = _run(cuda, f, g, y, a, log_c, w, gamma=gamma, tau=tau, grad_scale=0.5)
    _check(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [13, 1000, 4104])
def test_teacher_probabilities_with_zeros(cuda, m, dtype):
    f, g, y = make_inputs(9, m, dtype, "cuda", "masked", seed=m)
    probs = torch.softmax(g.float() / 3.0, -1).to(dtype)
    a = torch.linspace(0, 1, 9, device="cuda")
    a[y == 0] = 1.0
    out, ref = _run(cuda, f, probs, y, a, None, None, probs=True, tau=2.0)
    _check(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [10, 1000, 4104])
def test_no_gradient_and_in_place_gradient(cuda, m, dtype):
    f, g, y = make_inputs(12, m, dtype, "cuda", "normal", seed=3)
    teacher, labels, a, log_c, w = _setup("hinton-mix", 12, m, 3)
    out, ref = _run(cuda, f, g, y, a, log_c, w, gamma=3.0, tau=2.0, need_grad=False)
    _check(out, ref, dtype, need_grad=False)
    separate = cuda.fused_forward(
        f, g, y, a, log_c, w, gamma=3.0, tau=2.0, teacher_is_probs=False, grad_scale=0.25, need_grad=True
    )
    student = f.clone()
    in_place = cuda.fused_forward(
        student,
        g,
        y,
        a,
        log_c,
        w,
        gamma=3.0,
        tau=2.0,
        teacher_is_probs=False,
        grad_scale=0.25,
        need_grad=True,
        grad_out=student,
    )
    assert in_place[1].data_ptr() == student.data_ptr()
    for name, x, z in zip(("loss", "grad", "mass", "risk", "error"), separate, in_place, strict=True):
        assert torch.equal(x, z), f"{name} differs when the gradient overwrites the student"


@pytest.mark.gpu
def test_misaligned_rows_take_the_scalar_path(cuda):
    """A contiguous student that does not start on a 16-byte boundary (a view at an odd offset)."""
    rows, m = 6, 1000
    f, g, y = make_inputs(rows, m, torch.bfloat16, "cuda", "normal", seed=4)
    buffer = torch.empty(rows * m + 1, dtype=torch.bfloat16, device="cuda")
    shifted = buffer[1:].view(rows, m)
    shifted.copy_(f)
    assert "vec=1" in cuda.fused_forward_path(shifted)
    teacher, labels, a, log_c, w = _setup("hinton-mix", rows, m, 4)
    out, ref = _run(cuda, shifted, g, y, a, log_c, w, tau=1.5)
    _check(out, ref, torch.bfloat16)


@pytest.mark.gpu
def test_paths(cuda):
    """The resident and streaming paths are both exercised by the shapes above."""
    for m, path in (
        (256, "a warp per row"),
        (1000, "a block per row"),
        (4096, "resident"),
        (4104, "streaming"),
        (131072, "streaming"),
    ):
        student = torch.zeros(8, m, dtype=torch.bfloat16, device="cuda")
        assert path in cuda.fused_forward_path(student), (m, cuda.fused_forward_path(student))


@pytest.mark.gpu
@pytest.mark.parametrize("rows,m", [(1000, 100), (777, 1000), (300, 4104)])
def test_many_rows_and_determinism(cuda, rows, m):
    """Rows spread over many blocks / row groups; the statistics are summed in a fixed order."""
    f, g, y = make_inputs(rows, m, torch.bfloat16, "cuda", "normal", seed=rows)
    teacher, labels, a, log_c, w = _setup("hinton-mix", rows, m, rows)
    out, ref = _run(cuda, f, g, y, a, log_c, w, tau=2.0, grad_scale=1.0 / rows)
    _check(out, ref, torch.bfloat16)
    again = cuda.fused_forward(
        f, g, y, a, log_c, w, gamma=1.0, tau=2.0, teacher_is_probs=False, grad_scale=1.0 / rows, need_grad=True
    )
    for x, z in zip(out, again, strict=True):
        assert torch.equal(x, z)


@pytest.mark.gpu
def test_statistics_meaning_and_ties(cuda):
    f = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [3.0, 0.0, 3.0], [1.0, 1.0, 1.0]], device="cuda")
    y = torch.tensor([0, 0, 2, 1], device="cuda")
    loss, grad, mass, risk, error = cuda.fused_forward(
        f,
        None,
        y,
        torch.zeros(4, device="cuda"),
        None,
        None,
        gamma=1.0,
        tau=1.0,
        teacher_is_probs=False,
        grad_scale=1.0,
        need_grad=True,
    )
    assert mass.tolist() == [2.0, 1.0, 1.0]
    # argmax of raw f, first index on ties: rows predict 0, 1, 0, 0
    assert error.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.gpu
def test_edge_inputs(cuda):
    empty = torch.empty(0, 5, device="cuda")
    loss, grad, mass, risk, error = cuda.fused_forward(
        empty,
        empty,
        torch.empty(0, dtype=torch.long, device="cuda"),
        torch.empty(0, device="cuda"),
        None,
        None,
        gamma=1.0,
        tau=1.0,
        teacher_is_probs=False,
        grad_scale=1.0,
        need_grad=True,
    )
    assert loss.shape == (0,) and grad.shape == (0, 5)
    assert torch.equal(mass, torch.zeros(5, device="cuda")) and torch.equal(error, torch.zeros(5, device="cuda"))
    f = torch.randn(4, 9, device="cuda")
    bad_labels = torch.tensor([1, 9, -1, 2], device="cuda")
    loss = cuda.fused_forward(
        f,
        None,
        bad_labels,
        torch.zeros(4, device="cuda"),
        None,
        None,
        gamma=1.0,
        tau=1.0,
        teacher_is_probs=False,
        grad_scale=1.0,
        need_grad=False,
    )[0]
    assert torch.isnan(loss[1]) and torch.isnan(loss[2]) and torch.isfinite(loss[[0, 3]]).all()
    too_wide = torch.zeros(1, cuda.MAX_CLASSES + 1, device="cuda")
    assert "limit" in cuda.unavailable_reason(too_wide.device, too_wide.dtype, too_wide.shape[1])
    with pytest.raises(ValueError, match="limit"):
        cuda.fused_forward(
            too_wide,
            None,
            torch.zeros(1, dtype=torch.long, device="cuda"),
            torch.zeros(1, device="cuda"),
            None,
            None,
            gamma=1.0,
            tau=1.0,
            teacher_is_probs=False,
            grad_scale=1.0,
            need_grad=False,
        )
    assert "float64" in cuda.unavailable_reason(torch.device("cuda"), torch.float64, 10)
    with pytest.raises(TypeError, match="^a must be torch.float32"):
        cuda.fused_forward(
            f,
            None,
            bad_labels,
            torch.zeros(4, device="cuda", dtype=torch.float64),
            None,
            None,
            gamma=1.0,
            tau=1.0,
            teacher_is_probs=False,
            grad_scale=1.0,
            need_grad=False,
        )
    with pytest.raises(ValueError, match="^teacher must have shape"):
        cuda.fused_forward(
            f,
            f[:, :5].contiguous(),
            None,
            torch.ones(4, device="cuda"),
            None,
            None,
            gamma=1.0,
            tau=1.0,
            teacher_is_probs=False,
            grad_scale=1.0,
            need_grad=False,
        )
    with pytest.raises(ValueError, match="^labels must be on"):
        cuda.fused_forward(
            f,
            None,
            bad_labels.cpu(),
            torch.zeros(4, device="cuda"),
            None,
            None,
            gamma=1.0,
            tau=1.0,
            teacher_is_probs=False,
            grad_scale=1.0,
            need_grad=False,
        )
    with pytest.raises(ValueError, match="^tau must be"):
        cuda.fused_forward(
            f,
            f,
            None,
            torch.ones(4, device="cuda"),
            None,
            None,
            gamma=1.0,
            tau=0.0,
            teacher_is_probs=False,
            grad_scale=1.0,
            need_grad=False,
        )


def test_unavailable_reasons_without_gpu():
    """Runs everywhere: the reasons name the device and dtype problems."""
    from rkd_engine.ops import cuda_backend

    assert "CUDA tensors" in cuda_backend.unavailable_reason(torch.device("cpu"), torch.float32, 10)
    reason = cuda_backend.unavailable_reason(torch.device("cuda"), torch.float64, 10)
    assert reason is not None and "float64" in reason
    assert "limit" in cuda_backend.unavailable_reason(torch.device("cuda"), torch.float32, cuda_backend.MAX_CLASSES + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 7, 1000, 50257])
def test_scale_rows(cuda, m, dtype):
    gen = torch.Generator().manual_seed(m)
    grad = torch.randn(6, m, generator=gen).to(dtype).cuda()
    grad[3, 0] = float("nan")  # a skipped row keeps even a NaN bit pattern untouched
    go = torch.tensor([1.0, 2.0, -0.5, 1.0, 0.0, 3.25], device="cuda")
    before = grad.clone()
    cuda.scale_rows_(grad, go)
    want = (before.float() * go[:, None]).to(dtype)
    for i in range(6):
        if go[i] == 1.0:
            assert torch.equal(
                grad[i].view(torch.int16 if dtype != torch.float32 else torch.int32),
                before[i].view(torch.int16 if dtype != torch.float32 else torch.int32),
            )
        else:
            assert torch.equal(grad[i], want[i])


@pytest.mark.gpu
def test_no_host_synchronisation(cuda):
    """The fused forward and the row scaling only enqueue work (no device-to-host copy or sync)."""
    f, g, y = make_inputs(64, 1000, torch.bfloat16, "cuda", "normal", seed=9)
    teacher, labels, a, log_c, w = _setup("hinton-mix", 64, 1000, 9)
    wide, gw, yw = make_inputs(4, 8192, torch.bfloat16, "cuda", "normal", seed=10)
    aw = torch.full((4,), 0.5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss, grad, mass, risk, error = cuda.fused_forward(
                f, g, y, a, log_c, w, gamma=2.0, tau=1.0, teacher_is_probs=False, grad_scale=1.0 / 64, need_grad=True
            )
            cuda.scale_rows_(grad, torch.full((64,), 2.0, device="cuda"))
            cuda.fused_forward(
                wide, gw, yw, aw, None, None, gamma=1.0, tau=2.0, teacher_is_probs=False, grad_scale=1.0, need_grad=True
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
