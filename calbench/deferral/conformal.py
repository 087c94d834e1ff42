"""Split conformal prediction sets from cached probabilities: calibrated on validation, applied to test.

A nonconformity score s(x, y) says how unusual label y is for x. The (1 - alpha) quantile of
the true-label scores of n exchangeable calibration cases, taken with the finite-sample
correction (the ceil((n + 1)(1 - alpha))-th smallest score; Vovk et al. 2005, Angelopoulos &
Bates, "A gentle introduction to conformal prediction", 2021), gives sets C(x) = {y : s(x, y) <= q} that contain the true label with
probability at least 1 - alpha. That level is an average over calibration draws: with one draw
of n cases the coverage is Beta(k, n + 1 - k) distributed, k the order statistic used
(Vovk, "Conditional validity of inductive conformal predictors", ACML 2012), which is wide for
few-shot validation sets.

Scores, randomized as their authors define them (the default), or deterministic (``randomized=False``):

- ``lac``: 1 - p_y (Sadinle et al., JASA 2019), the smallest sets on average;
- ``aps``: the probability mass of the labels ranked ahead of y plus u * p_y, u ~ U(0, 1) per case
  (Romano et al., NeurIPS 2020, eq. 5); deterministically, the mass of every label at least as
  likely as y. Without u the score of an overconfident model's top label is about 1 on almost
  every case, so the threshold lands near 1 and the sets hold nearly every label;
- ``raps``: aps + lambda * (rank of y - k_reg)^+ (Angelopoulos et al., ICLR 2021, eq. 4), which
  discourages long tails of unlikely labels. Unless given, k_reg and lambda are tuned as the
  authors' ``ConformalModel`` does by default (repository aangelopoulos/conformal_classification,
  conformal.py:17: ``kreg=None, lamda=None, pct_paramtune=0.3``): on a hold-out of 30% of the
  calibration cases (line 267), k_reg is the (1 - alpha) quantile of the true label's rank
  (``pick_kreg``, line 238) and lambda the value of their grid with the smallest mean set size
  (``pick_lamda_size``, line 245); the other 70% calibrate.

The draws u come from the run seed on a stream of their own (:mod:`calbench.streams`), one for
the calibration cases and one for the test cases. Sets always hold the top label (the authors'
``allow_zero_sets=False``, conformal.py:195, and MAPIE's default).

Why the maths is here and not a library call: the libraries that offer these scores do not fit
cached few-shot probabilities well. MAPIE wraps them in an estimator life cycle and tunes RAPS on
a 20% hold-out that refuses sets as small as ours (fewer than 1/alpha hold-out cases); TorchCP
pulls in torch_geometric and a compiled torchsort; crepes takes precomputed scores but has no APS
or RAPS. The few lines below are tested against MAPIE's numbers, its uniform draws fed in
(tests/deferral/test_conformal.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from calbench import streams

SCORES = ("lac", "aps", "raps")
#: RAPS's hold-out share and lambda grid: Angelopoulos et al.'s defaults (conformal_classification
#: conformal.py:17 pct_paramtune=0.3; conformal.py:245, the grid pick_lamda_size searches)
RAPS_TUNE_FRACTION = 0.3
RAPS_LAMBDAS = (0.001, 0.01, 0.1, 0.2, 0.5)
#: a label whose score exceeds the threshold by rounding only is in the set: the mass of all labels is 1
#: up to float error, and must not drop a row's last label (MAPIE compares with the same 1e-8)
TOLERANCE = 1e-8


def _ranks(p: np.ndarray) -> np.ndarray:
    """Per (case, label): how many labels are at least as likely (1 for the top label; ties count ahead)."""
    return (p[:, None, :] >= p[:, :, None]).sum(axis=2)


def _sorted_ranks(p: np.ndarray) -> np.ndarray:
    """Per (case, label): 1-based place in the order of decreasing probability (ties by label index)."""
    order = np.argsort(-p, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(1, p.shape[1] + 1), p.shape), axis=1)
    return ranks


def score_matrix(
    probs: np.ndarray, score: str, k_reg: int = 1, lam: float = 0.0, u: Optional[np.ndarray] = None
) -> np.ndarray:
    """(N, C) nonconformity of every label of every case under ``score`` (lac, aps or raps); with ``u``
    (N uniform draws) the randomized aps / raps, without it the deterministic ones."""
    p = np.asarray(probs, dtype=np.float64)
    if score == "lac":
        return 1.0 - p
    if score not in SCORES:
        raise ValueError(f"unknown conformal score {score!r}; choose one of {', '.join(SCORES)}")
    p = p / p.sum(axis=1, keepdims=True)  # stored float32 probabilities sum to 1 only up to ~1e-7
    if u is None:
        ranks = _ranks(p)
        mass = np.cumsum(-np.sort(-p, axis=1), axis=1)  # mass of the r most likely labels, r = 1..C
        base = np.take_along_axis(mass, ranks - 1, axis=1)
    else:
        ranks = _sorted_ranks(p)
        descending = -np.sort(-p, axis=1)
        before = np.cumsum(descending, axis=1) - descending  # mass of the labels ranked ahead of place r
        base = np.take_along_axis(before, ranks - 1, axis=1) + np.asarray(u, dtype=np.float64).reshape(-1, 1) * p
    return base if score == "aps" else base + lam * np.maximum(ranks - k_reg, 0)


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
    """Split conformal classification on probabilities: ``fit`` on validation, ``predict`` sets on test.

    ``seed`` (the run seed) names the stream of the uniform draws of randomized aps / raps and of
    RAPS's tuning hold-out; ``k_reg`` / ``lam`` left None are tuned (raps only)."""

    score: str = "lac"
    alpha: float = 0.1
    randomized: bool = True
    seed: int = 0
    k_reg: Optional[int] = None
    lam: Optional[float] = None
    threshold: float = math.nan
    n: int = 0  # calibration cases
    k: int = 0  # order statistic used

    @property
    def _random(self) -> bool:
        return self.randomized and self.score != "lac"

    def _draws(self, part: int, size: int) -> Optional[np.ndarray]:
        """U(0, 1) per case: part 0 calibration, 1 test, 2 RAPS tuning; None when deterministic."""
        if not self._random:
            return None
        return streams.rng("conformal", self.seed, SCORES.index(self.score), part).uniform(size=size)

    def scores(self, probs: np.ndarray, u: Optional[np.ndarray] = None) -> np.ndarray:
        return score_matrix(probs, self.score, self.k_reg or 0, self.lam or 0.0, u)

    def fit(self, probs: np.ndarray, labels: np.ndarray, u: Optional[np.ndarray] = None) -> SplitConformal:
        """Calibrate on (probs, labels); ``u`` overrides the calibration draws (for tests)."""
        probs, y = np.asarray(probs), np.asarray(labels).astype(np.int64)
        if self.score == "raps" and (self.k_reg is None or self.lam is None):
            calibrate = self._tune(probs, y)
            probs, y = probs[calibrate], y[calibrate]
        u = self._draws(0, len(y)) if u is None else u
        true = np.sort(self.scores(probs, u)[np.arange(len(y)), y])
        self.n, self.k = len(y), quantile_index(len(y), self.alpha)
        self.threshold = float(true[self.k - 1]) if self.k <= self.n else math.inf
        return self

    def _tune(self, probs: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Angelopoulos et al.'s default RAPS tuning on a seeded hold-out; the cases left to calibrate."""
        held = np.zeros(len(y), dtype=bool)
        draws = streams.rng("conformal", self.seed, SCORES.index(self.score), 2)
        held[draws.permutation(len(y))[: math.ceil(RAPS_TUNE_FRACTION * len(y))]] = True
        if self.k_reg is None:
            rank = _sorted_ranks(probs[held])[np.arange(held.sum()), y[held]]
            self.k_reg = int(np.quantile(rank, 1.0 - self.alpha, method="higher"))
        if self.lam is None:
            u = draws.uniform(size=(2, int(held.sum()))) if self._random else [None, None]
            sizes = []
            for lam in RAPS_LAMBDAS:  # calibrated and measured on the hold-out, as pick_lamda_size does
                trial = SplitConformal(self.score, self.alpha, self.randomized, self.seed, self.k_reg, lam)
                sets = trial.fit(probs[held], y[held], u[0]).predict(probs[held], u[1])
                sizes.append(float(sets.sum(axis=1).mean()))
            self.lam = RAPS_LAMBDAS[int(np.argmin(sizes))]  # the first of equal sizes, as their strict <
        return ~held

    @property
    def level(self) -> float:
        """The quantile level actually used, k / n (>= 1 - alpha: the finite-sample correction)."""
        return self.k / self.n if self.n else math.nan

    def predict(self, probs: np.ndarray, u: Optional[np.ndarray] = None) -> np.ndarray:
        """(N, C) boolean prediction sets; ``u`` overrides the test draws (for tests). An aps or raps set
        always holds the top label (the authors' ``allow_zero_sets=False``); an empty lac set means no
        label is plausible."""
        probs = np.asarray(probs)
        u = self._draws(1, len(probs)) if u is None else u
        sets = self.scores(probs, u) <= self.threshold + TOLERANCE
        if self.score != "lac":
            sets[np.arange(len(sets)), probs.argmax(axis=1)] = True
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
