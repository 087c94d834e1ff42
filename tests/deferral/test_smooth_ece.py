"""Smooth ECE and the smoothed reliability curve against relplot itself, and the deferral columns."""

import numpy as np
import pytest
import relplot

from calbench.deferral import DEFERRAL_COLUMNS, deferral_metrics
from calbench.deferral.smooth_ece import smooth_ece, smooth_reliability
from calbench.metrics import ece


def overconfident(n=400, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(4, 0.3), size=n)
    # the top label is right with probability confidence ** 2: confident and too often wrong
    top = probs.argmax(axis=1)
    right = rng.uniform(size=n) < probs.max(axis=1) ** 2
    labels = np.where(right, top, (top + 1 + rng.integers(0, 3, n)) % 4)
    return probs, labels


def test_smooth_ece_is_relplots_on_top_label_confidence():
    probs, labels = overconfident()
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(float)
    assert smooth_ece(probs, labels) == relplot.smECE(confidence, correct)
    assert smooth_ece(probs, labels) == smooth_ece(probs, labels)  # no randomness: a row is reproducible
    assert 0.0 < smooth_ece(probs, labels) < 1.0
    # it measures the same miscalibration as binned ECE without a binning choice
    assert smooth_ece(probs, labels) == pytest.approx(ece(probs, labels), abs=0.05)


def test_smoothed_reliability_curve_is_relplots():
    probs, labels = overconfident(seed=1)
    curve = smooth_reliability(probs, labels)
    theirs = relplot.prepare_rel_diagram(
        probs.max(axis=1),
        (probs.argmax(axis=1) == labels).astype(float),
        plot_confidence_band=False,
        report_CE_std=False,
    )
    for key in ("mesh", "mu", "density"):
        np.testing.assert_array_equal(curve[key], theirs[key])
    assert curve["ce"] == smooth_ece(probs, labels) and curve["sigma"] == theirs["sigma"]


def test_deferral_metrics_fill_every_column():
    probs, labels = overconfident(seed=2)
    row = deferral_metrics(probs[:100], labels[:100], probs[100:], labels[100:])
    assert set(row) == set(DEFERRAL_COLUMNS)
    assert row["conformal_n"] == 100 and row["conformal_level"] == 0.91  # ceil(101 * 0.9) = 91
    assert row["conformal_alpha"] == 0.1 and row["sel_target"] == 0.05
    assert all(np.isfinite(v) or k in ("sel_threshold", "sel_error") for k, v in row.items())
