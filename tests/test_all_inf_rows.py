"""A student row that is ``-inf`` everywhere (issue 10, item 26): with ``validate=False`` its loss and its
gradient row are NaN on every backend (the C++ one used to give ``+inf`` and spread the gradient over its
padding lanes); the other rows are untouched, and a row labelled ``ignore_index`` stays at loss 0 and a zero
gradient row even when it is ``-inf`` everywhere. The CUDA kernels are checked through the g++ emulation in
tests/test_cuda_emulated.py."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import NONFINITE_WARNINGS, backend_devices

from rkd_engine import distill_loss, reference
from rkd_engine.ops import cpp_backend, triton_backend

BAD, IGNORED = 2, 4  # rows that are -inf everywhere; IGNORED is also labelled ignore_index

BACKENDS = backend_devices(triton_interpreter=True)

pytestmark = NONFINITE_WARNINGS


def _case(m: int, device: str, rows: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(rows, m, generator=gen)
    g = torch.randn(rows, m, generator=gen)
    y = torch.randint(0, m, (rows,), generator=gen)
    f[[BAD, IGNORED]] = float("-inf")
    y[IGNORED] = -100
    costs = torch.rand(m, generator=gen) + 0.5
    return f.to(device), g.to(device), y.to(device), costs.to(device)


def _expect(loss: torch.Tensor, grad: torch.Tensor, want_loss: torch.Tensor, want_grad: torch.Tensor) -> None:
    loss, grad = loss.detach().double().cpu(), grad.double().cpu()
    assert torch.isnan(loss[BAD]), f"loss of the -inf row: {loss[BAD]}"
    assert torch.isnan(grad[BAD]).all(), f"gradient of the -inf row: {grad[BAD]}"
    assert loss[IGNORED] == 0 and torch.equal(grad[IGNORED].abs(), torch.zeros_like(grad[IGNORED]))
    ok = [i for i in range(loss.shape[0]) if i not in (BAD, IGNORED)]
    torch.testing.assert_close(loss[ok], want_loss[ok], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad[ok], want_grad[ok], rtol=2e-4, atol=2e-5)


def _run(backend, device, f, g, y, costs, *, teacher, tau):
    student = f.clone().requires_grad_(True)
    kwargs = {"labels": y, "student_temperature": tau, "class_costs": costs}
    if teacher:
        kwargs.update(teacher_logits=g, teacher_weight=0.5, temperature=2.0)
    out = distill_loss(student, backend=backend, validate=False, reduction="none", **kwargs)
    out.loss.sum().backward()
    return out.loss, student.grad


@pytest.mark.parametrize("teacher", [False, True], ids=["labels", "teacher"])
@pytest.mark.parametrize("tau", [1.0, 1.5])
@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_all_inf_student_row_is_nan(backend, device, teacher, tau):
    """Loss and gradient row NaN, on the whole-row paths; the other rows as on the reference backend."""
    f, g, y, costs = _case(10, device)
    want_loss, want_grad = _run("reference", "cpu", f.cpu().double(), g.cpu().double(), y.cpu(), costs.cpu().double(),
                                teacher=teacher, tau=tau)  # fmt: skip
    loss, grad = _run(backend, device, f, g, y, costs, teacher=teacher, tau=tau)
    _expect(loss, grad, want_loss, want_grad)


@pytest.mark.skipif(cpp_backend.unavailable_reason(torch.device("cpu"), torch.float32, 16) is not None,
                    reason="C++ backend unavailable")  # fmt: skip
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("teacher", [False, True], ids=["labels", "teacher"])
def test_cpp_tiled_and_every_isa(isa, teacher):
    """The C++ kernels on each instruction set the CPU has, rows held whole and in tiles of 64 classes."""
    from rkd_engine import _C

    before_isa, before_tiling = _C.cpu_isa(), _C.get_tiling()
    try:
        try:
            _C.set_cpu_isa(isa)
        except (RuntimeError, ValueError) as error:
            pytest.skip(f"no {isa} kernels here: {error}")
        f, g, y, costs = _case(150, "cpu")
        want = _run("reference", "cpu", f.double(), g.double(), y, costs.double(), teacher=teacher, tau=1.5)
        for tiling in (before_tiling, (0, 64)):
            _C.set_tiling(*tiling)
            _expect(*_run("cpp", "cpu", f, g, y, costs, teacher=teacher, tau=1.5), *want)
    finally:
        _C.set_tiling(*before_tiling)
        _C.set_cpu_isa(before_isa)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1"
                    or triton_backend.unavailable_reason("cpu", torch.float32, 8) is not None,
                    reason="no Triton interpreter here")  # fmt: skip
@pytest.mark.parametrize("teacher", [False, True], ids=["labels", "teacher"])
def test_triton_wide_path(teacher):
    """The Triton two-pass (wide) path, forced on a small row under the interpreter."""
    from rkd_engine.kernels import distill

    f, g, y, costs = _case(70, "cpu", rows=5)
    a = torch.full((5,), 0.5 if teacher else 0.0)
    log_c = costs.log()
    config = distill.fused_config(5, 70, sm_count=4, narrow_max_classes=32, wide_block_n=32, min_group_rows=2)
    assert config.wide
    loss, grad, *_ = triton_backend.fused_forward(
        f, g if teacher else None, y, a, log_c, None, gamma=2.0, tau=1.5, teacher_is_probs=False,
        grad_scale=1.0, need_grad=True, config=config,
    )  # fmt: skip
    want = reference.fused_rows(f.double(), teacher=g.double() if teacher else None, labels=y, a=a.double(),
                                gamma=2.0, log_c=log_c.double(), tau=1.5)  # fmt: skip
    _expect(loss, grad, want.loss, want.grad)
