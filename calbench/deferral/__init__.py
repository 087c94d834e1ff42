"""When should a model defer to a clinician? Metrics of a run beyond its ECE, as pure functions.

- :mod:`.selective`: risk–coverage curve, AURC, E-AURC, accuracy at a coverage, and a confidence
  threshold chosen on validation for a target error, applied to test;
- :mod:`.conformal`: split conformal prediction sets (LAC, APS, RAPS) calibrated on validation;
- :mod:`.smooth`: smooth ECE and the smoothed reliability curve (relplot).

:func:`deferral_metrics` turns one run's validation and test probabilities into the columns
:data:`DEFERRAL_COLUMNS` of ``results.csv``. Everything fitted (a threshold, a conformal
quantile) is fitted on the validation split and only applied to test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from calbench.deferral.conformal import SCORES, SplitConformal, set_metrics
from calbench.deferral.selective import (
    accuracy_at_coverage,
    aurc,
    excess_aurc,
    selective_at,
    threshold_for_risk,
)
from calbench.deferral.smooth_ece import smooth_ece
from calbench.errors import CalbenchError, warn

#: coverages at which accuracy is reported, as the issue that added them asked (calbench)
COVERAGES = (0.80, 0.90, 0.95)


@dataclass(frozen=True)
class DeferralSettings:
    """What the deferral columns are computed at."""

    #: conformal miscoverage: sets should hold the true label 90% of the time (Angelopoulos et al.,
    #: ICLR 2021, report alpha 0.1 first; repository aangelopoulos/conformal_classification, example.py line 59)
    alpha: float = 0.1
    #: error rate the automated cases may have (calbench: 5%, a common clinical tolerance and the issue's default)
    target_error: float = 0.05
    #: APS and RAPS randomized as Romano et al. (2020) and Angelopoulos et al. (2021) define them (their
    #: code's default: conformal_classification conformal.py:17, randomized=True); False: deterministic scores
    randomized: bool = True

    def check(self) -> None:
        if not 0.0 < self.alpha < 1.0:  # NaN fails too
            raise CalbenchError(f"--conformal-alpha is a miscoverage in (0, 1), e.g. 0.1; got {self.alpha}")
        if not 0.0 <= self.target_error < 1.0:
            raise CalbenchError(f"--target-error is an error rate in [0, 1), e.g. 0.05; got {self.target_error}")


DEFERRAL_COLUMNS = [
    "smooth_ece",
    "aurc",
    "eaurc",
    *(f"acc_at_{round(100 * c)}" for c in COVERAGES),
    "sel_target",  # the target error rate of the automated cases
    "sel_threshold",  # confidence threshold chosen on validation for the target error
    "sel_coverage",  # share of test cases it automates
    "sel_error",  # their error rate (the target is met on test when this is <= target_error)
    "conformal_alpha",  # the miscoverage the sets are calibrated for
    "conformal_n",  # validation cases the lac and aps sets are calibrated on (raps: 70% of them, after its tuning)
    "conformal_level",  # k / n: the quantile level with the finite-sample correction
    *(f"{score}_{what}" for score in SCORES for what in ("coverage", "size", "singleton", "worst_class")),
]


def test_only_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The columns that need no validation split: smooth ECE, AURC, E-AURC and accuracy at each coverage."""
    row = {"smooth_ece": smooth_ece(probs, labels), "aurc": aurc(probs, labels), "eaurc": excess_aurc(probs, labels)}
    for coverage in COVERAGES:
        row[f"acc_at_{round(100 * coverage)}"] = accuracy_at_coverage(probs, labels, coverage)
    return row


def deferral_metrics(
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    test_probs: np.ndarray,
    test_labels: np.ndarray,
    settings: DeferralSettings = DeferralSettings(),
    seed: int = 0,
) -> dict[str, float]:
    """Every column of :data:`DEFERRAL_COLUMNS` for one run: fitted on validation, measured on test;
    ``seed`` (the run's) names the stream of the randomized sets' draws."""
    row = test_only_metrics(test_probs, test_labels)
    threshold = threshold_for_risk(val_probs, val_labels, settings.target_error)
    row["sel_target"], row["sel_threshold"] = settings.target_error, threshold
    row["sel_coverage"], row["sel_error"] = selective_at(test_probs, test_labels, threshold)
    for score in SCORES:
        model = SplitConformal(score, settings.alpha, settings.randomized, seed).fit(val_probs, val_labels)
        measured = set_metrics(model.predict(test_probs), test_labels)
        row.update({f"{score}_{key}": value for key, value in measured.items()})
        if score == "lac":  # lac and aps calibrate on every validation case; raps on what its tuning leaves
            level = model.level if model.k <= model.n else math.nan  # k > n: no score bounds the coverage
            row["conformal_alpha"], row["conformal_n"], row["conformal_level"] = settings.alpha, float(model.n), level
    if math.isnan(row["conformal_level"]):
        warn(
            f"--conformal-alpha {settings.alpha:g} needs at least {min_calibration_size(settings.alpha)} validation "
            f"cases and this run has {len(val_labels)}: no finite threshold, so every conformal set holds every "
            "class; pass more --val-shots or a larger --conformal-alpha"
        )
    return row


def min_calibration_size(alpha: float) -> int:
    """The fewest calibration cases n whose order statistic k = ceil((n + 1)(1 - alpha)) is at most n,
    i.e. n >= (1 - alpha) / alpha: with fewer, split conformal sets are every label (9 at alpha 0.1). The
    1e-9 is :func:`~calbench.deferral.conformal.quantile_index`'s rounding tolerance (0.9 / 0.1 is 9.000000000000002)."""
    return max(1, math.ceil((1.0 - alpha - 1e-9) / alpha - 1e-9))
