"""Split conformal prediction sets from cached probabilities: calibrated on validation, applied to test.

A nonconformity score s(x, y) says how unusual label y is for x. The (1 - alpha) quantile of
the true-label scores of n exchangeable calibration cases, taken with the finite-sample
correction (the ceil((n + 1)(1 - alpha))-th smallest score; Vovk et al. 2005, Angelopoulos &
Bates, "A gentle introduction to conformal prediction", 2021), gives sets C(x) = {y : s(x, y) <= q} that contain the true label with
probability at least 1 - alpha. That level is an average over calibration draws: with one draw
of n cases the coverage is Beta(k, n + 1 - k) distributed, k the order statistic used
(Vovk, "Conditional validity of inductive conformal predictors", ACML 2012), which is wide for
few-shot validation sets.

Scores (deterministic versions, so a run's sets are a function of its probabilities):

- ``lac``: 1 - p_y (Sadinle et al., JASA 2019), the smallest sets on average;
- ``aps``: the probability mass of every label at least as likely as y (Romano et al., NeurIPS 2020);
- ``raps``: aps + lambda * (rank of y - k_reg)^+ (Angelopoulos et al., ICLR 2021), which
  discourages long tails of unlikely labels.

Why the maths is here and not a library call: the libraries that offer these scores do not fit
cached few-shot probabilities well. MAPIE wraps them in an estimator life cycle, always
randomizes APS calibration scores, and tunes RAPS on a 20% hold-out of the calibration set,
which refuses sets as small as ours (fewer than 1/alpha hold-out cases); TorchCP pulls in
torch_geometric and a compiled torchsort; crepes takes precomputed scores but has no APS or
RAPS. The few lines below are tested against MAPIE's numbers (tests/test_conformal.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SCORES = ("lac", "aps", "raps")
#: RAPS penalty per label beyond k_reg: Angelopoulos et al. (ICLR 2021), repository
#: aangelopoulos/conformal_classification, experiments/figure2.py line 102 (lamda = 0.2)
RAPS_LAMBDA = 0.2
#: labels free of penalty. calbench: figure2.py line 101 uses 5 of ImageNet's 1000 classes; with the
#: 2-11 classes of calbench's datasets, a penalty from the second label on is the only one that bites
RAPS_K_REG = 1
#: a label whose score exceeds the threshold by rounding only is in the set: the mass of all labels is 1
#: up to float error, and must not drop a row's last label (MAPIE compares with the same 1e-8)
TOLERANCE = 1e-8


def _ranks(p: np.ndarray) -> np.ndarray:
    """Per (case, label): how many labels are at least as likely (1 for the top label; ties count ahead)."""
    return (p[:, None, :] >= p[:, :, None]).sum(axis=2)


def score_matrix(probs: np.ndarray, score: str, k_reg: int = RAPS_K_REG, lam: float = RAPS_LAMBDA) -> np.ndarray:
    """(N, C) nonconformity of every label of every case under ``score`` (lac, aps or raps)."""
    p = np.asarray(probs, dtype=np.float64)
    if score == "lac":
        return 1.0 - p
    if score not in SCORES:
        raise ValueError(f"unknown conformal score {score!r}; choose one of {', '.join(SCORES)}")
    p = p / p.sum(axis=1, keepdims=True)  # stored float32 probabilities sum to 1 only up to ~1e-7
    ranks = _ranks(p)
    mass = np.cumsum(-np.sort(-p, axis=1), axis=1)  # mass of the r most likely labels, r = 1..C
    aps = np.take_along_axis(mass, ranks - 1, axis=1)
    return aps if score == "aps" else aps + lam * np.maximum(ranks - k_reg, 0)


def quantile_index(n: int, alpha: float) -> int:
    """k = ceil((n + 1)(1 - alpha)): the order statistic of n calibration scores that bounds coverage
    from below by 1 - alpha (k > n: no finite threshold, every set is every label)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return math.ceil((n + 1) * (1.0 - alpha) - 1e-9)  # (n + 1)(1 - alpha) is often an integer up to rounding


def min_calibration_size(alpha: float) -> int:
    """The fewest calibration cases with a finite threshold at 1 - alpha: the smallest n with k <= n
    (:func:`quantile_index`), about (1 - alpha) / alpha. With fewer, every set holds every label."""
    n = max(1, math.floor((1.0 - alpha) / alpha) - 1)
    while quantile_index(n, alpha) > n:
        n += 1
    return n


@dataclass
class SplitConformal:
    """Split conformal classification on probabilities: ``fit`` on validation, ``predict`` sets on test."""

    score: str = "lac"
    alpha: float = 0.1
    k_reg: int = RAPS_K_REG
    lam: float = RAPS_LAMBDA
    threshold: float = math.nan
    n: int = 0  # calibration cases
    k: int = 0  # order statistic used

    def scores(self, probs: np.ndarray) -> np.ndarray:
        return score_matrix(probs, self.score, self.k_reg, self.lam)

    def fit(self, probs: np.ndarray, labels: np.ndarray) -> SplitConformal:
        y = np.asarray(labels).astype(np.int64)
        true = np.sort(self.scores(probs)[np.arange(len(y)), y])
        self.n, self.k = len(y), quantile_index(len(y), self.alpha)
        self.threshold = float(true[self.k - 1]) if self.k <= self.n else math.inf
        return self

    @property
    def level(self) -> float:
        """The quantile level actually used, k / n (>= 1 - alpha: the finite-sample correction)."""
        return self.k / self.n if self.n else math.nan

    def predict(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) boolean prediction sets. An aps or raps set always holds the top label (as MAPIE's and
        Angelopoulos et al.'s ``allow_zero_sets=False``); an empty lac set means no label is plausible."""
        sets = self.scores(probs) <= self.threshold + TOLERANCE
        if self.score != "lac":
            sets[np.arange(len(sets)), np.asarray(probs).argmax(axis=1)] = True
        return sets


def set_metrics(sets: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Empirical coverage, mean set size, share of singleton sets, and the lowest coverage of any class present."""
    y = np.asarray(labels).astype(np.int64)
    covered = sets[np.arange(len(y)), y]
    sizes = sets.sum(axis=1)
    worst = min(float(covered[y == c].mean()) for c in np.unique(y))
    return {
        "coverage": float(covered.mean()),
        "size": float(sizes.mean()),
        "singleton": float((sizes == 1).mean()),
        "worst_class": worst,
    }


def halves_set_size(probs: np.ndarray, labels: np.ndarray, alpha: float, score: str = "lac", seed: int = 0) -> float:
    """Mean set size at level 1 - alpha from validation data alone: calibrate on one seeded, class-stratified
    half and measure on the other, then swap, and average (what `tune --objective conformal-size` minimises)."""
    y = np.asarray(labels).astype(np.int64)
    rng = np.random.default_rng(seed)
    first = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        first[members[: len(members) // 2]] = True
    sizes = []
    for cal in (first, ~first):
        model = SplitConformal(score, alpha).fit(probs[cal], y[cal])
        sizes.append(float(model.predict(probs[~cal]).sum(axis=1).mean()))
    return float(np.mean(sizes))
