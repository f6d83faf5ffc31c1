"""Metrics of docs/metrics.md: hand-worked examples, absent classes, calibration."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rkd_engine.metrics import classification_report, expected_calibration_error, per_class_calibration_error

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_report_hand_worked_with_an_absent_class(device):
    preds = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0], device=device)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 1, 1], device=device)
    # recall: class 0 2/2, class 1 (rows 2, 6, 7) 1/3, class 2 (rows 3, 4, 5) 2/3, class 3 absent
    report = classification_report(preds, labels, 4, k=2)
    assert report["accuracy"] == pytest.approx(5 / 8)
    assert report["balanced_accuracy"] == pytest.approx((1 + 1 / 3 + 2 / 3) / 3)
    assert report["worst_accuracy"] == pytest.approx(1 / 3)
    assert report["worst_k_accuracy"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert report["per_class_recall"] == pytest.approx([1.0, 1 / 3, 2 / 3, None])
    assert report["per_class_count"] == [2, 3, 3, 0]
    assert report["absent_classes"] == [3]
    assert report["ece"] is None  # predictions only
    assert report["num_examples"] == 8
    # k beyond the number of present classes: the mean over all present classes
    assert classification_report(preds, labels, 4, k=10)["worst_k_accuracy"] == pytest.approx(2 / 3)
    json.dumps(report, allow_nan=False)  # plain, finite Python values


def test_report_from_logits_uses_the_first_index_on_ties():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    report = classification_report(logits, labels, 3, k=1)
    assert report["per_class_recall"] == [1.0, 1.0, 0.0]
    assert report["worst_accuracy"] == 0.0
    assert report["ece"] == pytest.approx(expected_calibration_error(torch.softmax(logits, 1), labels))
    probs = torch.tensor([[0.9, 0.05, 0.05]] * 3)
    assert classification_report(logits, labels, 3, probs=probs)["ece"] == pytest.approx(
        expected_calibration_error(probs, labels)
    )


def test_every_class_absent_but_one():
    report = classification_report(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]), 5)
    assert report["balanced_accuracy"] == pytest.approx(2 / 3)
    assert report["worst_accuracy"] == pytest.approx(2 / 3)
    assert report["absent_classes"] == [0, 2, 3, 4]


def test_ece_hand_worked():
    # 5 bins (0, .2], ..., (.8, 1]; confidences .95 (right), .55 (wrong), .75 and .65 (both right)
    probs = torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.75, 0.25], [0.35, 0.65]])
    labels = torch.tensor([0, 1, 0, 1])
    expected = 0.25 * abs(1 - 0.95) + 0.25 * abs(0 - 0.55) + 0.5 * abs(1 - (0.75 + 0.65) / 2)
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(expected)
    assert expected_calibration_error(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == 0.0


def _calibrated_sample(n: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities p(x) and labels drawn from them: a perfectly calibrated predictor."""
    gen = torch.Generator().manual_seed(seed)
    bias = torch.linspace(1.5, -1.5, m, dtype=torch.float64)  # an imbalanced marginal
    probs = torch.softmax(2 * torch.randn(n, m, generator=gen, dtype=torch.float64) + bias, dim=1)
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return probs, labels


def test_calibration_errors_vanish_for_a_calibrated_predictor():
    probs, labels = _calibrated_sample(200_000, 5, seed=0)
    assert expected_calibration_error(probs, labels) < 0.01
    result = per_class_calibration_error(probs, labels)
    assert result["max"] < 0.03
    assert result["absent_classes"] == []
    # an overconfident predictor (sharpened probabilities) has a clearly larger error
    sharp = torch.softmax(3 * probs.log(), dim=1)
    assert expected_calibration_error(sharp, labels) > 0.05
    assert per_class_calibration_error(sharp, labels)["max"] > 0.2


def test_per_class_calibration_hand_worked():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.3, 0.7]])
    labels = torch.tensor([0, 0, 0, 1])
    # pi = (3/4, 1/4), pi_t = (.6, .4); with 2 bins:
    # class 0: bin (.5, 1]: |.9/.6 - 1/(3/4)| * 1/2, bin (0, .5]: |.3/.6 - (1/2)(4/3)| * 1/2 -> 1/12 + 1/12
    # class 1: bin (0, .5]: |.1/.4 - 0| * 1/2, bin (.5, 1]: |.7/.4 - (1/2)(4)| * 1/2 -> 1/8 + 1/8
    result = per_class_calibration_error(probs, labels, n_bins=2)
    assert result["per_class"] == pytest.approx([1 / 6, 1 / 4])
    assert result["max"] == pytest.approx(1 / 4)
    assert result["mean"] == pytest.approx(5 / 24)
    # an explicit prior replaces the label frequencies
    explicit = per_class_calibration_error(probs, labels, torch.tensor([0.75, 0.25]), n_bins=2)
    assert explicit["per_class"] == pytest.approx(result["per_class"])


def test_per_class_calibration_absent_class_is_reported_not_averaged():
    probs, labels = _calibrated_sample(2000, 4, seed=1)
    labels[labels == 2] = 0
    result = per_class_calibration_error(probs, labels)
    assert result["per_class"][2] is None
    assert result["absent_classes"] == [2]
    present = [e for e in result["per_class"] if e is not None]
    assert result["max"] == max(present)
    assert result["mean"] == pytest.approx(sum(present) / 3)
    assert all(math.isfinite(e) for e in present)
    # a class the teacher never predicts (pi_t = 0) gives no NaN
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert per_class_calibration_error(probs, torch.tensor([0, 1]))["per_class"] == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: classification_report(torch.tensor([0, 1]), torch.tensor([0, 1]), 2, k=0), ValueError, "k must"),
        (lambda: classification_report(torch.tensor([0, 2]), torch.tensor([0, 1]), 2), ValueError, "predictions"),
        (lambda: classification_report(torch.tensor([0, 1]), torch.tensor([0, 5]), 2), ValueError, "labels"),
        (lambda: classification_report(torch.tensor([0, 1]), torch.tensor([0.0, 1.0]), 2), TypeError, "integer"),
        (lambda: classification_report(torch.tensor([0, 1]), torch.tensor([0]), 2), ValueError, "shape"),
        (lambda: classification_report(torch.zeros(2, 3), torch.tensor([0, 1]), 2), ValueError, "columns"),
        (lambda: classification_report(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 2),
         ValueError, "empty"),
        (lambda: classification_report(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 2), TypeError, "integer"),
        (lambda: expected_calibration_error(torch.randn(4, 3), torch.tensor([0, 1, 2, 0])), ValueError, "softmax"),
        (lambda: expected_calibration_error(torch.full((2, 2), 0.5), torch.tensor([0, 1]), n_bins=0),
         ValueError, "n_bins"),
        (lambda: per_class_calibration_error(torch.full((2, 2), 0.5), torch.tensor([0, 1]), torch.tensor([1.0, 0.0])),
         ValueError, "prior"),
    ],
)  # fmt: skip
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
