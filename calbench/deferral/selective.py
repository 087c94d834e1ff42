"""Selective prediction: rank cases by confidence, automate the most confident, defer the rest.

The risk–coverage curve (Geifman & El-Yaniv, NeurIPS 2017) gives, for every coverage k/N,
the error rate among the k most confident cases; AURC is its mean over k = 1..N and excess
AURC (E-AURC, Geifman et al., ICLR 2019) subtracts the AURC of an oracle that ranks every
correct case before every wrong one, so it measures the ranking alone, not the accuracy.

Ties in confidence have no order, so a tied group is counted as if broken at random, in
expectation: inside a group of g cases with e errors, the cumulative error count grows by
e/g per case. Without ties this is the usual AURC; with ties it does not depend on input order.
"""

from __future__ import annotations

import math

import numpy as np


def _confidence_and_errors(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if p.ndim != 2 or y.shape != (p.shape[0],) or p.shape[0] == 0:
        raise ValueError(f"probs must be (N, C) and labels (N,) with N > 0, got {p.shape} and {y.shape}")
    return p.max(axis=1), (p.argmax(axis=1) != y).astype(np.float64)


def cumulative_errors(confidence: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Expected number of errors among the k most confident cases, k = 1..N (ties broken at random)."""
    order = np.argsort(-confidence, kind="stable")
    conf, err = confidence[order], errors[order]
    # each case gets its tie group's mean error, so the running sum is the expectation over tie-breaks
    starts = np.flatnonzero(np.r_[True, conf[1:] != conf[:-1]])
    sums = np.add.reduceat(err, starts)
    sizes = np.diff(np.r_[starts, len(conf)])
    return np.cumsum(np.repeat(sums / sizes, sizes))


def risk_coverage(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage k/N, error rate among the k most confident cases) for k = 1..N."""
    confidence, errors = _confidence_and_errors(probs, labels)
    k = np.arange(1, len(errors) + 1, dtype=np.float64)
    return k / len(errors), cumulative_errors(confidence, errors) / k


def aurc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Area under the risk–coverage curve: mean selective risk over coverages 1/N..N/N (lower is better)."""
    return float(risk_coverage(probs, labels)[1].mean())


def oracle_aurc(n: int, n_errors: int) -> float:
    """AURC of the ideal ranking with ``n_errors`` wrong among ``n``: the floor any confidence can reach
    (its limit for large N is r + (1 - r) ln(1 - r), r = n_errors / n: Geifman et al., ICLR 2019, section 3)."""
    k = np.arange(1, n + 1, dtype=np.float64)
    return float((np.maximum(0.0, k - (n - n_errors)) / k).mean())


def excess_aurc(probs: np.ndarray, labels: np.ndarray) -> float:
    """E-AURC: AURC minus the oracle's at the same accuracy; 0 for a perfect ranking of errors."""
    _, errors = _confidence_and_errors(probs, labels)
    return aurc(probs, labels) - oracle_aurc(len(errors), int(errors.sum()))


def accuracy_at_coverage(probs: np.ndarray, labels: np.ndarray, coverage: float) -> float:
    """Accuracy on the ceil(coverage * N) most confident cases (ties broken at random, in expectation)."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    confidence, errors = _confidence_and_errors(probs, labels)
    k = max(1, math.ceil(coverage * len(errors) - 1e-9))  # 0.9 * 100 is 90.00000000000001 in floating point
    return float(1.0 - cumulative_errors(confidence, errors)[k - 1] / k)


def threshold_for_risk(probs: np.ndarray, labels: np.ndarray, target: float) -> float:
    """The lowest confidence threshold t whose accepted cases (confidence >= t) have an error rate at most
    ``target``: the largest coverage that meets the target on these cases. ``inf`` (defer everything) when
    no threshold does.

    Fit it on the validation split and apply it to test (:func:`selective_at`): a threshold read off
    test is not one a clinic could deploy. It is a plug-in choice, not a bound: with few validation
    cases the realised test error can exceed the target, which is why both are reported.
    """
    confidence, errors = _confidence_and_errors(probs, labels)
    order = np.argsort(-confidence, kind="stable")
    conf, err = confidence[order], errors[order]
    last = np.flatnonzero(np.r_[conf[1:] != conf[:-1], True])  # a threshold accepts whole tie groups
    risk = np.cumsum(err)[last] / (last + 1)
    meets = np.flatnonzero(risk <= target + 1e-12)
    return float(conf[last[meets[-1]]]) if meets.size else math.inf


def selective_at(probs: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """(coverage, error rate among the accepted) when cases with confidence >= ``threshold`` are automated;
    the error is NaN when nothing is accepted."""
    confidence, errors = _confidence_and_errors(probs, labels)
    accepted = confidence >= threshold
    coverage = float(accepted.mean())
    return coverage, float(errors[accepted].mean()) if accepted.any() else math.nan
