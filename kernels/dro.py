"""The exponentiated-gradient DRO step on device (docs/dro.md), in place, without host sync.

Math, over the ``m`` classes, with ``P = {j : mass_j > 0}`` the classes present:

    R_j      = risk_j / mass_j                      (j in P)
    lambda'_j = lambda_j exp(eta alpha R_j)          (j in P)
    lambda_j <- lambda'_j (sum_{k in P} lambda_k) / (sum_{k in P} lambda'_k)   for j in P (0 if that sum is 0)
    lambda_j unchanged                              for j not in P (a class with zero mass keeps its weight)

exactly ``rkd_engine.reference.dro_update``. One program of one CTA walks the classes twice (the two sums,
then the write), so the result needs no second launch and no atomics; ``m`` is at most a few hundred
thousand floats, a few microseconds.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dro_update_kernel(
    weights_ptr,  # lambda: (m,) fp32 contiguous, updated in place
    risk_ptr,  # risk numerator: (m,) fp32 contiguous
    mass_ptr,  # mass: (m,) fp32 contiguous
    m,
    coef,  # eta * alpha as a runtime fp32 scalar (unused with COEF_PTR)
    step_ptr,  # eta: (1,) fp32 tensor (only with COEF_PTR)
    alpha_ptr,  # alpha: (1,) fp32 tensor (only with COEF_PTR)
    COEF_PTR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``lambda <- dro_update(lambda, risk, mass)`` in one program."""
    if COEF_PTR:
        coef = tl.load(step_ptr).to(tl.float32) * tl.load(alpha_ptr).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    old_sum = tl.zeros([BLOCK], tl.float32)
    new_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, m, BLOCK):
        idx = start + offs
        ok = idx < m
        lam = tl.load(weights_ptr + idx, mask=ok, other=0.0)
        mass = tl.load(mass_ptr + idx, mask=ok, other=0.0)
        risk = tl.load(risk_ptr + idx, mask=ok, other=0.0)
        present = mass > 0.0
        ratio = tl.where(present, risk / tl.where(present, mass, 1.0), 0.0)
        old_sum += tl.where(present, lam, 0.0)
        new_sum += tl.where(present, lam * tl.exp(coef * ratio), 0.0)
    old_total = tl.sum(old_sum, axis=0)
    new_total = tl.sum(new_sum, axis=0)
    scale = tl.where(new_total > 0.0, old_total / tl.where(new_total > 0.0, new_total, 1.0), 0.0)
    for start in range(0, m, BLOCK):
        idx = start + offs
        ok = idx < m
        lam = tl.load(weights_ptr + idx, mask=ok, other=0.0)
        mass = tl.load(mass_ptr + idx, mask=ok, other=0.0)
        risk = tl.load(risk_ptr + idx, mask=ok, other=0.0)
        present = mass > 0.0
        ratio = tl.where(present, risk / tl.where(present, mass, 1.0), 0.0)
        grown = lam * tl.exp(coef * ratio) * scale
        tl.store(weights_ptr + idx, tl.where(present, grown, lam), mask=ok)
