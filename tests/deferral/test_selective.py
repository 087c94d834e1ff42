"""Selective prediction: hand-computed AURC and E-AURC (with ties), accuracy at coverage, and a
confidence threshold chosen on validation that never looks at test."""

import math

import numpy as np
import pytest

from calbench.deferral import DeferralSettings, deferral_metrics
from calbench.deferral.selective import (
    accuracy_at_coverage,
    aurc,
    excess_aurc,
    oracle_aurc,
    risk_coverage,
    selective_at,
    threshold_for_risk,
)


def two_class(confidence, wrong):
    """Probabilities [c, 1 - c] (c >= 0.5, so class 0 is predicted) and labels: 1 where the case is wrong."""
    c = np.asarray(confidence, dtype=float)
    return np.stack([c, 1 - c], axis=1), np.asarray(wrong, dtype=int)


def test_aurc_by_hand_without_ties():
    # most confident first: right, wrong, right, wrong -> risks 0, 1/2, 1/3, 2/4
    probs, labels = two_class([0.9, 0.8, 0.7, 0.6], [0, 1, 0, 1])
    coverage, risk = risk_coverage(probs, labels)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0, 1 / 2, 1 / 3, 1 / 2])
    assert aurc(probs, labels) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4, abs=1e-15)
    # the oracle puts both right answers first: risks 0, 0, 1/3, 2/4
    assert oracle_aurc(4, 2) == pytest.approx((1 / 3 + 1 / 2) / 4, abs=1e-15)
    assert excess_aurc(probs, labels) == pytest.approx(0.125, abs=1e-15)


def test_ties_count_as_broken_at_random_in_expectation():
    # 0.8 is a tie of one wrong and one right case: expected errors 0, 0.5, 1, 2 among the top 1..4
    probs, labels = two_class([0.9, 0.8, 0.8, 0.6], [0, 1, 0, 1])
    np.testing.assert_allclose(risk_coverage(probs, labels)[1], [0, 0.25, 1 / 3, 0.5])
    assert aurc(probs, labels) == pytest.approx((0 + 0.25 + 1 / 3 + 0.5) / 4, abs=1e-15)
    swapped = [0, 2, 1, 3]  # the tied cases in the other order: the same curve
    assert aurc(probs[swapped], labels[swapped]) == aurc(probs, labels)
    # accuracy on the top half: 1 - 0.5 / 2
    assert accuracy_at_coverage(probs, labels, 0.5) == pytest.approx(0.75, abs=1e-15)


def test_perfect_ranking_has_no_excess_and_all_ties_are_the_error_rate():
    probs, labels = two_class([0.9, 0.8, 0.7, 0.6, 0.55], [0, 0, 0, 1, 1])
    assert excess_aurc(probs, labels) == pytest.approx(0.0, abs=1e-15)
    flat, wrong = two_class([0.7] * 4, [0, 1, 0, 0])
    np.testing.assert_allclose(risk_coverage(flat, wrong)[1], [0.25] * 4)


def test_accuracy_at_coverage_rounds_up_to_whole_cases():
    probs, labels = two_class(np.linspace(0.99, 0.51, 10), [0] * 8 + [1, 1])
    assert accuracy_at_coverage(probs, labels, 0.9) == 8 / 9  # 9 cases, not 9.000000000000002 -> 10
    assert accuracy_at_coverage(probs, labels, 0.8) == 1.0
    with pytest.raises(ValueError):
        accuracy_at_coverage(probs, labels, 0.0)


def test_threshold_is_the_largest_coverage_meeting_the_target():
    # cumulative error rates by threshold: 0.95 -> 0, 0.9 -> 0, 0.8 -> 1/3, 0.7 (tie of two) -> 2/5
    probs, labels = two_class([0.95, 0.9, 0.8, 0.7, 0.7], [0, 0, 1, 0, 1])
    assert threshold_for_risk(probs, labels, 0.0) == 0.9
    assert threshold_for_risk(probs, labels, 0.34) == 0.8
    assert threshold_for_risk(probs, labels, 0.4) == 0.7  # the tie is accepted whole
    first_wrong, labels = two_class([0.95, 0.6], [1, 0])
    assert threshold_for_risk(first_wrong, labels, 0.05) == math.inf  # nothing qualifies: defer everything
    assert selective_at(first_wrong, labels, math.inf)[0] == 0.0
    assert math.isnan(selective_at(first_wrong, labels, math.inf)[1])


def test_selective_at_applies_a_threshold():
    probs, labels = two_class([0.95, 0.9, 0.8, 0.7], [0, 1, 0, 0])
    assert selective_at(probs, labels, 0.85) == (0.5, 0.5)
    assert selective_at(probs, labels, 0.5) == (1.0, 0.25)


def test_the_threshold_comes_from_validation_and_never_from_test():
    rng = np.random.default_rng(0)
    val_probs, val_labels = two_class(rng.uniform(0.5, 1, 40), rng.integers(0, 2, 40))
    test_probs, test_labels = two_class(rng.uniform(0.5, 1, 60), rng.integers(0, 2, 60))
    settings = DeferralSettings(alpha=0.2, target_error=0.2)
    row = deferral_metrics(val_probs, val_labels, test_probs, test_labels, settings)
    assert row["sel_threshold"] == threshold_for_risk(val_probs, val_labels, 0.2)
    assert (row["sel_coverage"], row["sel_error"]) == selective_at(test_probs, test_labels, row["sel_threshold"])
    # other test data (even labels that make every test case wrong) leave the threshold where it was
    flipped = deferral_metrics(val_probs, val_labels, test_probs, 1 - test_labels, settings)
    assert flipped["sel_threshold"] == row["sel_threshold"] and flipped["sel_error"] != row["sel_error"]
    assert flipped["lac_coverage"] != row["lac_coverage"]
    assert (
        deferral_metrics(val_probs, 1 - val_labels, test_probs, test_labels, settings)["sel_threshold"]
        != (row["sel_threshold"])
    )
