"""Teacher probability rows whose sum lies at the edge of the tolerance (issue 9).

The kernels flag a row of ``teacher_probs`` whose float32 sum is off 1 by more than ``PROB_SUM_TOL`` with a
NaN ``loss_i``; ``validate=True`` then re-checks the inputs on the host to name the row. The host adds the
row in another order than the kernel, so at the edge the two float32 sums can fall on either side of the
tolerance. Whatever the order, ``validate=True`` must raise exactly when the kernel flags a row, naming
the first flagged row, and never return a NaN loss. The rows are searched for: float32 rows whose exact
(float64) sums straddle the edge, some of which the kernel judges otherwise than float64 does.
"""

from __future__ import annotations

import pytest
import torch
from bad_values import edge_prob_rows
from conftest import backend_devices

from rkd_engine import distill_loss
from rkd_engine.ops import checks
from rkd_engine.ops.checks import PROB_SUM_TOL

TOL = PROB_SUM_TOL[torch.float32]


def _inputs(rows: int, m: int, a: float, seed: int = 0):
    p, exact = edge_prob_rows(rows, m, spread=1e-6, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    f = torch.randn(rows, m, generator=gen)
    y = torch.randint(0, m, (rows,), generator=gen)
    return f, p, exact, y, torch.full((rows,), a)


def _assert_raises_iff_flagged(call, flagged: torch.Tensor) -> None:
    """``call()`` raises the teacher_probs error naming the first flagged row, or, with none flagged, passes."""
    if flagged.any():
        row = int(flagged.nonzero()[0])
        with pytest.raises(ValueError, match=rf"teacher_probs rows must sum to 1 \(row {row} sums to"):
            call()
    else:
        call()


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("a", [0.5, 0.0], ids=["teacher-term", "unused-teacher-term"])
def test_validate_raises_exactly_when_the_kernel_flags_an_edge_row(backend, device, a):
    f, p, exact, y, w = (t.to(device) for t in _inputs(512, 2000, a))
    kwargs = dict(teacher_probs=p, labels=y, teacher_weight=w, backend=backend)
    loss = distill_loss(f, **kwargs, validate=False, reduction="none").loss
    flagged = torch.isnan(loss)
    off_fp64 = (exact - 1).abs() > TOL
    off_host = ~((p.sum(-1) - 1).abs() <= TOL)
    # The search found rows at the edge: the kernel's float32 verdict differs from the exact one for some.
    assert (flagged != off_fp64).any() and flagged.any() and not flagged.all()
    if backend == "cpp" and a == 0.0:
        # The C++ kernel reads a row whose teacher term is unused in a plain loop: another order than torch's
        # sum, so rows it flags that the host's float32 sum passes exist (the case this test is about).
        assert (flagged & ~off_host).any()
        only = (flagged & ~off_host).nonzero().squeeze(1)
        sub = dict(kwargs, teacher_probs=p[only], labels=y[only], teacher_weight=w[only])
        with pytest.raises(ValueError, match=r"\(row 0 sums to [0-9.]+, within rounding of the tolerance 0\.0001"):
            distill_loss(f[only], **sub)
    total = distill_loss(f, **kwargs, validate=False)
    assert torch.isnan(total.loss)
    _assert_raises_iff_flagged(lambda: distill_loss(f, **kwargs), flagged)
    # The rows where the host's float32 sum and the kernel disagree, on their own.
    disagree = (flagged != off_host).nonzero().squeeze(1)
    if len(disagree):
        sub = dict(kwargs, teacher_probs=p[disagree], labels=y[disagree], teacher_weight=w[disagree])
        _assert_raises_iff_flagged(lambda: distill_loss(f[disagree], **sub), flagged[disagree])
        out = distill_loss(f[disagree], **sub, validate=False, reduction="none").loss
        assert torch.equal(torch.isnan(out), flagged[disagree])  # a row's verdict does not depend on its batch


def test_a_nan_loss_that_no_check_explains_still_raises():
    """If the kernel's loss is NaN and the inputs pass every check, the status names the row and what was
    checked instead of returning the NaN."""
    gen = torch.Generator().manual_seed(0)
    f, g = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    y, a = torch.randint(0, 7, (5,), generator=gen), torch.full((5,), 0.5)
    loss_rows = torch.ones(5)
    loss_rows[3] = float("nan")
    with pytest.raises(ValueError, match=r"the loss of row 3 is NaN, yet the inputs pass every check \(labels"):
        checks.enforce("sync", loss_rows.sum(), f, g, False, y, a, -100, loss_rows=loss_rows)
    with pytest.raises(ValueError, match=r"the loss of row 3 is NaN, .*teacher_probs >= 0"):
        checks.enforce("sync", loss_rows, f, torch.softmax(g, -1), True, y, a, -100)
    with pytest.raises(ValueError, match=r"^the loss is NaN, yet"):
        checks.enforce("sync", loss_rows.sum(), f, g, False, y, a, -100)
    loss_rows[3] = float("inf")  # a legitimate +inf (a label on a class the student masks) passes
    checks.enforce("sync", loss_rows.sum(), f, g, False, y, a, -100, loss_rows=loss_rows)
    with pytest.raises(ValueError, match=r"the reduced loss is NaN although no row's loss is"):
        checks.enforce("sync", loss_rows.sum() * 0.0, f, g, False, y, a, -100, loss_rows=loss_rows)


def test_rows_are_named_as_in_the_inputs_when_rows_are_ignored():
    """Rows labelled ignore_index are skipped by the checks but still counted in the row number named."""
    f = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    f[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"student_logits contains NaN \(first in row 2\)"):
        distill_loss(f, labels=torch.tensor([-100, 1, 2, 3]), backend="cpp")
    p = torch.softmax(torch.randn(4, 5, generator=torch.Generator().manual_seed(1)), -1)
    p[3] *= 0.5
    with pytest.raises(ValueError, match=r"teacher_probs rows must sum to 1 \(row 3 sums to 0\.5"):
        distill_loss(f.nan_to_num(), teacher_probs=p, labels=torch.tensor([-100, 1, 2, 3]), teacher_weight=0.5)
