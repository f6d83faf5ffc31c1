"""The typed call description (``rkd_engine.ops.call``) and the per-call caches of the user API."""

from __future__ import annotations

import pytest
import torch

from rkd_engine import RobustDistillationLoss, distill_loss
from rkd_engine.ops.call import FusedCall, constant_rows, describe_call


def _describe(**overrides):
    args = dict(
        labels=None,
        has_teacher=True,
        teacher_names="teacher_logits or teacher_probs",
        teacher_weight=None,
        class_costs=None,
        class_weights=None,
        temperature=2.0,
        student_temperature=1.0,
        reduction="mean",
        backend="auto",
        validate=True,
        ignore_index=-100,
        normalizer=None,
    )
    args.update(overrides)
    return describe_call(6, 5, torch.device("cpu"), torch.float32, "student_logits", **args)


def test_description_is_normalised_once():
    costs = torch.tensor([1.0, 2.0, 0.5, 4.0, 1.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, -100], dtype=torch.int32)
    call = _describe(labels=labels, teacher_weight=0.25, class_costs=costs, validate=False, normalizer=3)
    assert isinstance(call, FusedCall)
    assert call.labels.dtype == torch.int64 and call.labels.tolist() == labels.tolist()
    assert call.a_const == 0.25 and call.a.dtype == torch.float32 and torch.all(call.a == 0.25)
    torch.testing.assert_close(call.log_c, costs.float().log())
    assert (call.gamma, call.tau, call.norm_value, call.norm_t) == (2.0, 1.0, 3.0, None)
    assert (call.validate, call.backend, call.check_values) == ("off", "cpp", False)
    with pytest.raises(AttributeError):
        call.gamma = 1.0  # frozen


def test_description_names_the_argument():
    cases = [
        ("temperature must be a finite number > 0", dict(temperature=0.0)),
        ("needs labels, a teacher", dict(has_teacher=False)),
        ("teacher_weight < 1 needs labels", dict(teacher_weight=0.5)),
        ("class_costs must be > 0", dict(class_costs=torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]))),
        ("class_weights must be >= 0", dict(class_weights=torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0]))),
        ("class_weights contains NaN", dict(class_weights=torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0]))),
        ("class_costs must be finite", dict(class_costs=torch.tensor([1.0, float("inf"), 1.0, 1.0, 1.0]))),
        ("normalizer applies to reduction='mean' only", dict(normalizer=2.0, reduction="sum")),
        ("ignore_index must be an int", dict(ignore_index=1.5)),
        ("validate must be", dict(validate="maybe")),
    ]
    for match, kwargs in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            _describe(**kwargs)


def test_constant_rows_are_made_once_and_match_a_fresh_tensor():
    first = constant_rows(7, 1.0, torch.float32, torch.device("cpu"))
    assert constant_rows(7, 1.0, torch.float32, torch.device("cpu")) is first
    assert torch.equal(first, torch.ones(7))
    with torch.inference_mode():
        inside = constant_rows(9, 0.0, torch.float32, torch.device("cpu"))
    assert not inside.is_inference()  # usable by a later call with autograd


def test_cached_log_costs_follow_dro_updates():
    torch.manual_seed(0)
    m = 6
    loss_fn = RobustDistillationLoss(m, "robust", step_size=2.0)
    f = torch.randn(8, m, requires_grad=True)
    g = torch.randn(8, m)
    for step in range(3):
        got = loss_fn(f, teacher_logits=g)
        want = distill_loss(f, teacher_logits=g, class_costs=loss_fn.costs.detach())
        torch.testing.assert_close(got.loss, want.loss)
        loss_fn.update_weights(got.error + torch.arange(m, dtype=torch.float32) * step, got.mass)
    assert loss_fn.dro.num_updates.item() == 3
    before = loss_fn(f, teacher_logits=g).loss
    loss_fn.dro.reset()  # in place (fill_): the cache must see it
    want = distill_loss(f, teacher_logits=g, class_costs=loss_fn.costs.detach())
    torch.testing.assert_close(loss_fn(f, teacher_logits=g).loss, want.loss)
    assert not torch.allclose(before, want.loss)


def test_status_from_the_reduced_loss():
    # Finite rows whose sum overflows float32: the status looks closer and finds nothing wrong.
    f = torch.zeros(4, 3)
    f[:, 0] = -3e38
    out = distill_loss(f, labels=torch.zeros(4, dtype=torch.long), reduction="sum")
    assert torch.isinf(out.loss)
    # A NaN row among finite ones is found and named, with and without labels.
    f = torch.randn(5, 3)
    f[2, 1] = float("nan")
    for labels in (None, torch.tensor([0, 1, 2, 0, 1])):
        with pytest.raises(ValueError, match=r"student_logits contains NaN \(first in row 2\)"):
            distill_loss(f, labels=labels, teacher_logits=torch.randn(5, 3))
    # A bad label the C++ kernel refuses is named as the status names it.
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*first bad row 1"):
        distill_loss(torch.randn(3, 3), labels=torch.tensor([0, 3, 1]), backend="cpp")


def test_class_costs_of_the_last_call_are_reused_until_written():
    """``log c`` of the previous call's costs is reused while that tensor is unchanged; an in-place write
    (its version counter moves) or another tensor makes it computed, and checked, again."""
    costs = torch.tensor([1.0, 2.0, 0.5, 4.0, 1.0])
    first = _describe(class_costs=costs).log_c
    assert _describe(class_costs=costs).log_c is first  # unchanged: not read again
    costs[1] = 8.0
    again = _describe(class_costs=costs).log_c
    assert again is not first
    torch.testing.assert_close(again, costs.log())
    unchecked = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0])
    _describe(class_costs=unchecked, validate=False)  # not checked: not trusted by a checking call
    with pytest.raises(ValueError, match="class_costs"):
        _describe(class_costs=unchecked)
    costs[2] = 0.0
    with pytest.raises(ValueError, match="class_costs"):
        _describe(class_costs=costs)
    other = costs.clone().fill_(2.0)
    torch.testing.assert_close(_describe(class_costs=other).log_c, other.log())


def test_eager_autograd_path_packs_and_unpacks_the_op_arguments():
    """The eager autograd function takes the op's tensors and one tuple of the rest: the same arguments."""
    from rkd_engine.ops.op import _pack, _unpack

    args = tuple(range(17))
    assert _unpack(_pack(args)) == args
    short = tuple(range(12))
    assert _unpack(_pack(short)) == short + (-100, 0.0, None, "off", False)


@pytest.mark.parametrize("validate", [True, "async"])
def test_class_value_checks_follow_validate(monkeypatch, validate):
    """The (m,) costs and weights are checked as ``validate`` asks: ``"async"`` off the CPU enqueues a device
    assertion and reads nothing on the host (a CUDA training loop, or a CUDA graph capture, must not
    synchronise); meta tensors, which hold no values, are not read at all; on CPU every mode reads (free
    there) and names the argument."""
    enqueued = []
    monkeypatch.setattr(torch, "_assert_async", lambda ok, msg="": enqueued.append((ok.device.type, msg)))
    meta = dict(device="meta")
    f = torch.randn(8, 5, requires_grad=True, **meta)
    out = distill_loss(
        f, teacher_logits=torch.randn(8, 5, **meta), class_costs=torch.rand(5, **meta),
        class_weights=torch.rand(5, **meta), validate=validate, backend="reference",
    )  # fmt: skip
    assert out.loss.device.type == "meta"
    names = [msg.split(" must ")[0] for _, msg in enqueued if msg.startswith("rkd: class_")]
    assert names == (["rkd: class_costs", "rkd: class_weights"] if validate == "async" else [])
    for bad, name in ((dict(class_costs=torch.tensor([1.0, -1, 1, 1, 1])), "class_costs"),
                      (dict(class_weights=torch.tensor([1.0, float("nan"), 1, 1, 1])), "class_weights")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            distill_loss(torch.randn(8, 5), teacher_logits=torch.randn(8, 5), validate=validate, **bad)


def test_no_cached_log_costs_while_a_cuda_graph_is_captured(monkeypatch):
    """While a CUDA stream is captured, ``log c`` is computed in the call (so in the graph) and not kept:
    a replay re-runs only the graph's kernels, so a cached tensor would keep the costs of capture time
    after later DRO updates. The capture is simulated here (the check is ``ops.call.capturing``)."""
    costs = torch.tensor([1.0, 2.0, 0.5, 4.0, 1.0])
    first = _describe(class_costs=costs).log_c
    assert _describe(class_costs=costs).log_c is first  # eager: kept
    loss_fn = RobustDistillationLoss(5, "robust")
    assert loss_fn._log_costs(torch.float32, torch.device("cpu")) is not None  # eager: kept between updates
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    captured = _describe(class_costs=costs).log_c
    assert captured is not first
    torch.testing.assert_close(captured, first)
    assert _describe(class_costs=costs).log_c is not captured  # not remembered either
    assert loss_fn._log_costs(torch.float32, torch.device("cpu")) is None  # distill_loss computes it
    f = torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 5)
    want = distill_loss(f, teacher_logits=g, class_costs=loss_fn.costs.detach(), backend="cpp")
    torch.testing.assert_close(loss_fn(f, teacher_logits=g).loss, want.loss)
