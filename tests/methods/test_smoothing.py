"""Randomized smoothing maths against scipy, hand cases and a linear model with a closed-form radius."""

from collections.abc import Callable
from statistics import NormalDist

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, norm
from torch import Tensor

from calbench.randomized_smoothing import (
    ABSTAIN,
    certified_accuracy,
    certify_from_counts,
    certify_predictions,
    lower_confidence_bound,
    predict_from_counts,
    smoothed_proba,
    vote_counts,
)


def sample_predictions(
    classify: Callable[[Tensor], Tensor],
    x: Tensor,
    sigma: float,
    num: int,
    generator: torch.Generator,
    batch_size: int = 10_000,
) -> Tensor:
    """(num, N) base-classifier labels on x + N(0, sigma^2 I): Cohen et al.'s sampling loop, for toy models
    cheap enough to perturb on the fly (calbench's VLM methods read cached noisy views instead)."""
    out = []
    for start in range(0, num, batch_size):
        size = min(batch_size, num - start)
        noise = torch.randn((size, *x.shape), generator=generator, dtype=x.dtype) * sigma
        noisy = (x.unsqueeze(0) + noise.to(x.device)).reshape(size * x.shape[0], *x.shape[1:])
        out.append(classify(noisy).reshape(size, x.shape[0]))
    return torch.cat(out)


def _scipy_lower(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) bound = lower end of the two-sided exact (1 - 2 alpha) interval."""
    return binomtest(n_a, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low


@pytest.mark.parametrize(
    "n_a, n, alpha", [(95, 100, 0.001), (60, 100, 0.05), (1, 10, 0.01), (9990, 10000, 0.001), (0, 50, 0.001)]
)
def test_lower_bound_is_clopper_pearson(n_a, n, alpha):
    assert lower_confidence_bound(n_a, n, alpha) == pytest.approx(_scipy_lower(n_a, n, alpha), rel=1e-9, abs=1e-12)


def test_lower_bound_when_every_vote_agrees_is_alpha_to_the_one_over_n():
    # P(all n successes | p) = p^n = alpha at the bound
    assert lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-12)


@pytest.mark.parametrize(
    "selection, estimation, sigma, alpha",
    [
        ([2, 8, 0], [5, 95, 0], 0.5, 0.001),
        ([0, 10], [0, 100], 1.0, 0.001),
        ([0, 1, 9], [3, 7, 990], 0.25, 0.01),
        ([1, 9, 0], [1, 99, 0], 0.12, 0.05),
    ],
)
def test_certify_matches_scipy(selection, estimation, sigma, alpha):
    label, radius = certify_from_counts(selection, estimation, sigma, alpha)
    c_a = int(np.argmax(selection))
    p_lower = _scipy_lower(estimation[c_a], sum(estimation), alpha)
    assert (label, radius) == (c_a, pytest.approx(sigma * norm.ppf(p_lower), rel=1e-9))


def test_certify_hand_case_and_abstentions():
    label, radius = certify_from_counts([0, 10], [0, 100], sigma=1.0, alpha=0.001)
    assert label == 1 and radius == pytest.approx(NormalDist().inv_cdf(0.001**0.01), rel=1e-9)  # 1.5007...
    assert certify_from_counts([0, 10], [40, 60], 1.0, 0.001) == (ABSTAIN, 0.0)  # pA_lower < 1/2
    # the selection's class is certified, even when the estimation favours another one
    assert certify_from_counts([10, 0], [5, 95], 1.0, 0.001) == (ABSTAIN, 0.0)


@pytest.mark.parametrize("counts", [[30, 70, 0], [45, 55, 0], [0, 0, 12, 3, 1], [50, 50], [0, 9, 1], [7]])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_predict_matches_scipy(counts, alpha):
    top = sorted(range(len(counts)), key=lambda c: -counts[c])[:2]
    n_a, n_b = counts[top[0]], (counts[top[1]] if len(top) > 1 else 0)
    expected = ABSTAIN if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha else top[0]
    assert predict_from_counts(counts, alpha) == expected


def test_predict_hand_cases():
    # 10 to 0: two-sided p-value 2 * 0.5^10 = 0.00195
    assert predict_from_counts([0, 10], alpha=0.001) == ABSTAIN
    assert predict_from_counts([0, 10], alpha=0.002) == 1
    assert predict_from_counts([0, 0, 0], alpha=0.5) == ABSTAIN
    assert predict_from_counts([5, 5, 90], alpha=0.001) == 2


def test_vote_counts_smoothed_proba_and_certified_accuracy():
    predictions = torch.tensor([[0, 1, 2], [0, 2, 2], [1, 2, 2]])  # 3 samples of 3 inputs
    assert vote_counts(predictions, 4).tolist() == [[2, 1, 0, 0], [0, 1, 2, 0], [0, 0, 3, 0]]
    logits = torch.tensor([[[0.0, 0.0]], [[float(np.log(3.0)), 0.0]]])  # softmax (1/2, 1/2) and (3/4, 1/4)
    torch.testing.assert_close(smoothed_proba(logits), torch.tensor([[0.625, 0.375]]))
    predicted, radii, labels = np.array([1, 1, -1, 0]), np.array([0.3, 0.8, 0.0, 1.2]), np.array([1, 0, 2, 0])
    assert certified_accuracy(predicted, radii, labels, at=(0.0, 0.5, 1.0, 1.5)) == {
        0.0: 0.5,
        0.5: 0.25,
        1.0: 0.25,
        1.5: 0.0,
    }


W, B = torch.tensor([3.0, 4.0], dtype=torch.float64), -1.0  # |w| = 5


def _linear(x: torch.Tensor) -> torch.Tensor:
    return (x @ W + B > 0).long()


def test_smoothed_linear_classifier_certifies_the_distance_to_its_hyperplane():
    """For f(x) = [w.x + b > 0], P(f(x + e) = f(x)) = Phi(d / sigma) with d the distance to the
    hyperplane, so the certified radius tends to sigma * Phi^-1(Phi(d / sigma)) = d from below."""
    sigma, n0, n, alpha = 0.5, 100, 200_000, 0.001
    x = torch.tensor([[1.0, 0.5], [0.2, 0.3], [-1.0, -0.5], [2.0, 4.0]], dtype=torch.float64)
    distance = ((x @ W + B).abs() / W.norm()).numpy()  # 0.6, 0.16, 0.8, 4.2
    generator = torch.Generator().manual_seed(0)
    selection = sample_predictions(_linear, x, sigma, n0, generator)
    estimation = sample_predictions(_linear, x, sigma, n, generator)
    share = (estimation == _linear(x)).double().mean(dim=0).numpy()
    np.testing.assert_allclose(share, norm.cdf(distance / sigma), atol=4e-3)
    labels, radii = certify_predictions(selection, estimation, 2, sigma, alpha)
    assert labels[:3].tolist() == [1, 1, 0]
    assert np.all(radii[:3] <= distance[:3]) and np.all(radii[:3] >= distance[:3] - 0.02)
    # 4.2 is 8.4 sigma away: all 200,000 votes agree, and the bound (alpha^(1/n)) caps the radius below d
    assert labels[3] == 1 and radii[3] == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-9)


def test_smoothed_linear_classifier_abstains_on_its_hyperplane():
    x = torch.tensor([[1.0, -0.5]], dtype=torch.float64)  # w.x + b = 0
    generator = torch.Generator().manual_seed(1)
    votes = vote_counts(sample_predictions(_linear, x, 1.0, 1000, generator), 2)[0]
    assert predict_from_counts(votes, alpha=0.001) == ABSTAIN
    far = torch.tensor([[3.0, 3.0]], dtype=torch.float64)
    assert (
        predict_from_counts(vote_counts(sample_predictions(_linear, far, 1.0, 1000, generator), 2)[0], alpha=0.001) == 1
    )
