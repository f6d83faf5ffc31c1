"""Bad input values that only the kernels' status catches (issue 9): one table for every backend's tests.

Each case is ``(match, inputs)``: the error ``distill_loss`` must raise (the message of the full checks,
``rkd_engine.ops.checks.raise_for_inputs``), and the fused call's inputs, with the bad value in one row
only, so that the status must come from that row. The teacher's own checks cover rows whose teacher term is
unused (``a_i = 0``): the kernels flag them while they read each element, with no separate pass.
"""

from __future__ import annotations

import torch

ROWS, CLASSES, BAD_ROW = 6, 9, 4


def _base(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(ROWS, CLASSES, generator=gen)
    g = torch.randn(ROWS, CLASSES, generator=gen)
    y = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    a = torch.full((ROWS,), 0.5)
    return {"student": f, "teacher": g, "labels": y, "a": a, "probs": False}


def _probs(base: dict) -> dict:
    base["teacher"] = torch.softmax(base["teacher"], -1)
    base["probs"] = True
    return base


def value_cases() -> list[tuple[str, str, dict]]:
    """``(id, match, inputs)``; ``inputs`` holds student, teacher, labels, a (B,) and probs (a bool)."""
    cases = []

    def add(name: str, match: str, inputs: dict) -> None:
        cases.append((name, match, inputs))

    x = _base()
    x["student"][BAD_ROW, 2] = float("nan")
    add("student-nan", rf"student_logits contains NaN \(first in row {BAD_ROW}\)", x)
    x = _probs(_base())
    x["teacher"][BAD_ROW] = 0.0
    x["teacher"][BAD_ROW, :2] = torch.tensor([1.1, -0.1])  # sums to 1, one entry negative
    add("probs-negative", "teacher_probs must be >= 0", x)
    x = _probs(_base())
    x["teacher"][BAD_ROW] *= 0.5
    add("probs-sum", rf"teacher_probs rows must sum to 1 \(row {BAD_ROW} sums to 0\.5", x)
    x = _probs(_base())
    x["teacher"][BAD_ROW, 3] = float("nan")
    add("probs-nan", rf"teacher_probs contains NaN \(first in row {BAD_ROW}\)", x)
    # Rows whose teacher term is unused (a_i = 0): still checked.
    x = _base()
    x["a"][BAD_ROW] = 0.0
    x["teacher"][BAD_ROW, 5] = float("nan")
    add("logits-nan-a0", rf"teacher_logits contains NaN \(first in row {BAD_ROW}\)", x)
    x = _base()
    x["a"][BAD_ROW] = 0.0
    x["teacher"][BAD_ROW, 5] = float("inf")
    add("logits-inf-a0", rf"teacher_logits must be finite or -inf, found an infinite value in row {BAD_ROW}", x)
    x = _base()
    x["a"][BAD_ROW] = 0.0
    x["teacher"][BAD_ROW] = float("-inf")
    add("logits-empty-a0", rf"teacher_logits has a row that is -inf everywhere \(no class left\): row {BAD_ROW}", x)
    x = _probs(_base())
    x["a"][BAD_ROW] = 0.0
    x["teacher"][BAD_ROW] *= 2.0
    add("probs-sum-a0", rf"teacher_probs rows must sum to 1 \(row {BAD_ROW} sums to 2", x)
    return cases


def distill_kwargs(inputs: dict, device: str = "cpu") -> dict:
    """``distill_loss`` keyword arguments for a case (the student is the first positional argument)."""
    name = "teacher_probs" if inputs["probs"] else "teacher_logits"
    return {
        name: inputs["teacher"].to(device),
        "labels": inputs["labels"].to(device),
        "teacher_weight": inputs["a"].to(device),
    }


def edge_prob_rows(rows: int, m: int, *, spread: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, exact)``: ``rows`` float32 rows of teacher probabilities whose exact sums lie within ``spread`` of
    the edge of the tolerance, ``1 + PROB_SUM_TOL`` (as float32, the kernels' comparison), and those exact sums
    (float64). Float32 sums of such rows, in one order or another, fall on either side of the edge."""
    from rkd_engine.ops.checks import PROB_SUM_TOL

    gen = torch.Generator().manual_seed(seed)
    edge = 1.0 + float(torch.tensor(PROB_SUM_TOL[torch.float32], dtype=torch.float32))
    target = edge + (torch.rand(rows, generator=gen, dtype=torch.float64) - 0.5) * 2 * spread
    p = torch.softmax(2 * torch.randn(rows, m, generator=gen, dtype=torch.float64), -1)
    p = (p * target[:, None]).float()
    return p, p.double().sum(-1)
