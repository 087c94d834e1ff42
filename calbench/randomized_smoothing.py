"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019), as pure functions.

The smoothed classifier g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I), is
estimated from the base classifier's votes on noisy copies of x. Its probabilities
for calibration metrics are the mean softmax over the copies (:func:`smoothed_proba`);
its prediction and certified L2 radius come from vote counts:

- PREDICT: the top two counts nA, nB; abstain unless the two-sided binomial test of
  nA successes in nA + nB trials at p = 1/2 has p-value <= alpha.
- CERTIFY: cA = argmax of n0 selection counts; pA_lower = the one-sided (1 - alpha)
  Clopper-Pearson lower bound of cA's share of n estimation counts; abstain if
  pA_lower < 1/2, else the radius is sigma * Phi^-1(pA_lower) (Theorem 1).

Nothing here touches a model or a device: callers pass counts or tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import Tensor

ABSTAIN = -1
#: the radii the PromptSmooth tables report certified accuracy at
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion: Beta(alpha; nA, n - nA + 1)."""
    if n_a == 0:
        return 0.0
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def predict_from_counts(counts: Sequence[int] | np.ndarray, alpha: float) -> int:
    """Cohen et al.'s PREDICT: the top class, or -1 (abstain) when it does not beat the runner-up at level alpha."""
    counts = np.asarray(counts, dtype=np.int64)
    order = np.argsort(-counts, kind="stable")  # ties go to the lower class index
    n_a = int(counts[order[0]])
    n_b = int(counts[order[1]]) if counts.size > 1 else 0
    if n_a + n_b == 0 or binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(order[0])


def certify_from_counts(
    counts_selection: Sequence[int] | np.ndarray,
    counts_estimation: Sequence[int] | np.ndarray,
    sigma: float,
    alpha: float,
) -> tuple[int, float]:
    """Cohen et al.'s CERTIFY: (class, L2 radius), or (-1, 0.0) when pA_lower < 1/2.

    With probability at least 1 - alpha over the estimation noise, g predicts the
    returned class everywhere within the returned radius of x.
    """
    selection = np.asarray(counts_selection, dtype=np.int64)
    estimation = np.asarray(counts_estimation, dtype=np.int64)
    c_a = int(np.argmax(selection))
    p_lower = lower_confidence_bound(int(estimation[c_a]), int(estimation.sum()), alpha)
    if p_lower < 0.5:
        return ABSTAIN, 0.0
    return c_a, float(sigma * norm.ppf(p_lower))


def vote_counts(predictions: Tensor | np.ndarray, n_classes: int) -> np.ndarray:
    """(S, N) predicted classes of S noisy copies of N inputs -> (N, C) vote counts."""
    predictions = np.asarray(predictions.cpu() if isinstance(predictions, Tensor) else predictions, dtype=np.int64)
    counts = np.zeros((predictions.shape[1], n_classes), dtype=np.int64)
    for row in predictions:
        np.add.at(counts, (np.arange(predictions.shape[1]), row), 1)
    return counts


def smoothed_proba(logits: Tensor) -> Tensor:
    """(S, N, C) base logits on S noisy copies -> (N, C) mean softmax: the smoothed classifier's probabilities."""
    return torch.softmax(logits, dim=-1).mean(dim=0)


def certify_predictions(
    selection: Tensor | np.ndarray, estimation: Tensor | np.ndarray, n_classes: int, sigma: float, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """CERTIFY for N inputs at once from (n0, N) and (n, N) base predictions: (N,) classes and radii."""
    selected, estimated = vote_counts(selection, n_classes), vote_counts(estimation, n_classes)
    results = [certify_from_counts(s, e, sigma, alpha) for s, e in zip(selected, estimated)]
    return np.array([label for label, _ in results], dtype=np.int64), np.array([radius for _, radius in results])


def certified_accuracy(
    predicted: np.ndarray, radii: np.ndarray, labels: np.ndarray, at: Sequence[float] = DEFAULT_RADII
) -> dict[float, float]:
    """Fraction of inputs certified correct with radius >= r, for each r (Cohen et al., Sec. 4)."""
    correct = np.asarray(predicted) == np.asarray(labels)
    return {float(r): float(np.mean(correct & (np.asarray(radii) >= r))) for r in at}
