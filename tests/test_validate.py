"""``validate`` modes: the status read after the kernel raises the same clear errors as full checks."""

from __future__ import annotations

import pytest
import torch
from bad_values import BAD_ROW, ROWS, distill_kwargs, value_cases
from conftest import backend_devices

from rkd_engine import distill_loss
from rkd_engine.ops import checks


def _bad_student(device):
    f = torch.randn(6, 9, generator=torch.Generator().manual_seed(0)).to(device)
    f[4, 2] = float("nan")
    return f, torch.randn(6, 9, generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("mode", [True, "sync", "async"])
def test_modes_that_read_the_status_name_the_argument_and_row(backend, device, mode):
    f, g = _bad_student(device)
    if mode == "async" and device != "cpu":
        pytest.skip("a device-side assertion ends the CUDA context")
    with pytest.raises(ValueError, match=r"student_logits contains NaN \(first in row 4\)"):
        distill_loss(f, teacher_logits=g, backend=backend, validate=mode)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_validate_false_reads_nothing(backend, device):
    f, g = _bad_student(device)
    out = distill_loss(f, teacher_logits=g, backend=backend, validate=False, reduction="none")
    assert torch.isnan(out.loss[4]) and torch.isfinite(out.loss[[0, 1, 2, 3, 5]]).all()


def test_legitimate_infinite_loss_is_not_an_error():
    # A hard label on a class the student masks with -inf: an infinite loss, valid inputs.
    f = torch.zeros(2, 4)
    f[0, 1] = float("-inf")
    out = distill_loss(f, labels=torch.tensor([1, 0]), reduction="none")
    assert torch.isinf(out.loss[0]) and torch.isfinite(out.loss[1])


def test_teacher_weight_tensor_out_of_range_is_caught_by_the_status():
    f, g = _bad_student("cpu")
    f[4, 2] = 0.0
    a = torch.full((6,), 0.5)
    a[3] = 1.5
    with pytest.raises(ValueError, match=r"teacher_weight must lie in \[0, 1\]"):
        distill_loss(f, teacher_logits=g, labels=torch.zeros(6, dtype=torch.long), teacher_weight=a)


def test_bad_mode_is_named():
    f, g = _bad_student("cpu")
    with pytest.raises(ValueError, match="validate must be"):
        distill_loss(f, teacher_logits=g, validate="yes")


CASES = value_cases()


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("match,inputs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_values_are_flagged_by_the_kernels_pass(backend, device, match, inputs):
    """Bad teacher probabilities, and a bad teacher row whose term is unused (a_i = 0), come from the status:
    the kernel gives that row (only) a NaN loss, and validate=True names the argument and the row."""
    f = inputs["student"].to(device)
    kwargs = distill_kwargs(inputs, device)
    with pytest.raises(ValueError, match=match):
        distill_loss(f, **kwargs, backend=backend)
    out = distill_loss(f, **kwargs, backend=backend, validate=False, reduction="none")
    others = torch.arange(ROWS, device=device) != BAD_ROW
    assert torch.isnan(out.loss[BAD_ROW]) and torch.isfinite(out.loss[others]).all()


@pytest.mark.parametrize("backend,device", backend_devices())
def test_teacher_probs_take_no_separate_pass(backend, device, monkeypatch):
    def no_pass(*args, **kwargs):
        raise AssertionError("valid teacher_probs were checked in a separate pass")

    monkeypatch.setattr(checks, "check_probs", no_pass)
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(5, 7, generator=gen).to(device)
    p = torch.softmax(torch.randn(5, 7, generator=gen), -1).to(device)
    out = distill_loss(f, teacher_probs=p, backend=backend, reduction="none")
    assert torch.isfinite(out.loss).all()
