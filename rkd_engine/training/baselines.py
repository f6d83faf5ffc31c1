"""Student baselines of docs/baselines.md that need more than the loss: the teacher margin mappings
of AdaAlpha and AdaMargin, and post-shift.

Teacher margin (Lukasik et al., TMLR 2022) of row ``i`` with label ``y``, from the teacher's
probabilities ``p`` at temperature 1: ``mu_i = p_iy - (1/(m-1)) sum_{y' != y} p_iy'`` in
``[-1/(m-1), 1]``; it is high where the teacher is confidently right and negative where it prefers
other classes. The mappings chosen here (the papers' exact ones are not public):

- AdaAlpha: ``a_i = clip(mu_i, 0, 1)``, the per-row weight of the teacher in
  ``q_i = (1 - a_i) e_y + a_i p_i``. A confidently right teacher is followed (``a -> 1``); a teacher that
  is wrong or unsure on the row (``mu <= 0``) is replaced by the label (``a = 0``).
- AdaMargin: ``delta_i = margin_scale * (1 - clip(mu_i, 0, 1))``, subtracted from the student's score
  of the label before the loss (``f_iy - delta_i``), so the loss asks the student for a margin of
  ``delta_i`` on rows where the teacher is unreliable and none where it is confidently right. The
  target is ``q = (1 - a) e_y + a p`` with a constant ``a`` (``--teacher-weight``, default 1).

Post-shift (Narasimhan & Menon 2021, Algorithm 3): the teacher itself with shifted scores
``f_y(x) = log(shift_y p_y(x))``, where ``shift = lambda / pi`` is found by the exponentiated-gradient
search of docs/dro.md run on the validation set with one-hot labels: ``lambda`` starts uniform
(so the first candidate is the balanced logit adjustment ``1 / pi``), each iteration multiplies
``lambda_y`` by ``exp(eta R_y)`` with ``R_y`` the validation error of class ``y`` under the current
shift, and the iterate with the best worst-class validation accuracy is kept (ties: higher mean
accuracy, then the earlier iterate).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rkd_engine.dro import ClassDRO
from rkd_engine.losses import distill_loss

POST_SHIFT_ITERATIONS = 200


def teacher_margin(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """``mu_i = p_iy - (1/(m-1)) sum_{y' != y} p_iy'`` with ``p = softmax(g)`` (temperature 1), fp32 (B,)."""
    m = teacher_logits.shape[1]
    if m < 2:
        raise ValueError("the teacher margin needs at least 2 classes")
    p_y = torch.softmax(teacher_logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return p_y - (1.0 - p_y) / (m - 1)


def ada_alpha_weight(margin: Tensor) -> Tensor:
    """AdaAlpha's teacher weight ``a_i = clip(mu_i, 0, 1)``."""
    return margin.clamp(0.0, 1.0)


def ada_margin_shift(student_logits: Tensor, labels: Tensor, margin: Tensor, scale: float) -> Tensor:
    """AdaMargin's scores ``f_iy - delta_i`` (other columns unchanged), ``delta_i = scale (1 - clip(mu_i, 0, 1))``."""
    delta = scale * (1.0 - margin.clamp(0.0, 1.0))
    onehot = torch.nn.functional.one_hot(labels, student_logits.shape[1]).to(student_logits.dtype)
    return student_logits - delta.to(student_logits.dtype)[:, None] * onehot


class PostShift(nn.Module):
    """``f_y(x) = log p_y(x) + log shift_y`` with ``p = softmax(base(x))``: post-shift of a trained model."""

    def __init__(self, base: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("log_shift", torch.zeros(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return torch.log_softmax(self.base(x).float(), dim=1) + self.log_shift


@torch.no_grad()
def post_shift_search(
    teacher_logits: Tensor,
    labels: Tensor,
    prior: Tensor,
    *,
    step_size: float,
    iterations: int = POST_SHIFT_ITERATIONS,
) -> tuple[Tensor, list[dict]]:
    """The log shift ``log(lambda / pi)`` with the best worst-class accuracy on ``(teacher_logits, labels)``.

    Returns the log shift (m,) and one record per iteration (``iteration``, ``worst``, ``mean``).
    """
    m = teacher_logits.shape[1]
    log_p = torch.log_softmax(teacher_logits.float(), dim=1)
    dro = ClassDRO(m, alpha=1.0, step_size=step_size, prior=prior.float().cpu()).to(log_p.device)
    best: tuple[float, float] | None = None
    best_shift = torch.zeros(m, device=log_p.device)
    history = []
    for it in range(iterations):
        log_shift = torch.log(dro.costs)
        stats = distill_loss(log_p + log_shift, labels=labels, validate=False)
        present = stats.mass > 0
        recall = 1.0 - stats.error[present] / stats.mass[present]
        worst, mean = float(recall.min()), float(recall.mean())
        history.append({"iteration": it, "worst": worst, "mean": mean})
        if best is None or (worst, mean) > best:
            best, best_shift = (worst, mean), log_shift.clone()
        dro.update(stats.error, stats.mass)
    return best_shift, history
