"""Split conformal sets: hand-computed scores and quantiles, parity with MAPIE, and coverage of at least
1 - alpha on exchangeable data over many random splits."""

import math

import numpy as np
import pytest
from mapie.classification import SplitConformalClassifier
from sklearn.base import BaseEstimator, ClassifierMixin

from calbench.deferral.conformal import SplitConformal, halves_set_size, quantile_index, score_matrix, set_metrics

C = 5


def sample(rng, n, temperature=2.0):
    """Exchangeable (probs, labels): labels drawn from the probabilities themselves (calibrated by construction)."""
    logits = rng.normal(size=(n, C)) * temperature
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = (probs.cumsum(axis=1) < rng.uniform(size=(n, 1))).sum(axis=1)
    return probs, np.minimum(labels, C - 1)


def test_scores_by_hand():
    p = np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
    np.testing.assert_allclose(score_matrix(p, "lac"), [[0.5, 0.7, 0.8], [0.6, 0.6, 0.8]])
    # aps: mass of every label at least as likely (a tie counts both labels)
    np.testing.assert_allclose(score_matrix(p, "aps"), [[0.5, 0.8, 1.0], [0.8, 0.8, 1.0]])
    # raps with k_reg 1, lambda 0.2: + 0.2 per label ahead beyond the first
    np.testing.assert_allclose(score_matrix(p, "raps", k_reg=1, lam=0.2), [[0.5, 1.0, 1.4], [1.0, 1.0, 1.4]])
    # randomized (Romano et al. eq. 5): mass ranked ahead + u * p_y; a tie is ranked by label index
    u = np.array([0.5, 0.25])
    np.testing.assert_allclose(score_matrix(p, "aps", u=u), [[0.25, 0.65, 0.9], [0.1, 0.5, 0.85]])
    # + lambda * (rank - k_reg)^+ (Angelopoulos et al. eq. 4), the penalty not scaled by u
    np.testing.assert_allclose(score_matrix(p, "raps", k_reg=1, lam=0.2, u=u), [[0.25, 0.85, 1.3], [0.1, 0.7, 1.25]])
    with pytest.raises(ValueError):
        score_matrix(p, "naive")


def test_quantile_with_the_finite_sample_correction():
    assert quantile_index(40, 0.1) == 37  # ceil(41 * 0.9 = 36.9)
    assert quantile_index(19, 0.05) == 19  # 20 * 0.95 is 19 up to rounding: not 20
    assert quantile_index(8, 0.1) == 9  # more than n: no finite threshold
    scores = np.linspace(0.05, 0.5, 10)  # true-label lac scores 0.05..0.5 of labels 0
    probs = np.stack([1 - scores, scores], axis=1)
    model = SplitConformal("lac", alpha=0.2).fit(probs, np.zeros(10, dtype=int))
    assert (model.n, model.k, model.level) == (10, 9, 0.9)  # ceil(11 * 0.8 = 8.8)
    assert model.threshold == pytest.approx(scores[8])
    tiny = SplitConformal("lac", alpha=0.1).fit(probs[:8], np.zeros(8, dtype=int))
    assert tiny.threshold == math.inf and tiny.predict(probs).all()  # too few cases: every label


def test_set_metrics_by_hand():
    sets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1]], dtype=bool)
    measured = set_metrics(sets, np.array([0, 2, 2, 1]))
    assert measured == {"coverage": 0.75, "size": 1.5, "singleton": 0.5, "worst_class": 0.5}


def test_aps_and_raps_sets_always_hold_the_top_label_and_lac_may_be_empty():
    p = np.array([[0.9, 0.05, 0.05]])
    for score, randomized in (("aps", False), ("raps", False), ("aps", True), ("raps", True)):
        model = SplitConformal(score, 0.5, randomized, k_reg=1, lam=0.2)
        model.threshold = 0.01  # below the top label's own score (randomized: unless u < 0.011)
        assert model.predict(p).tolist() == [[True, False, False]]
    lac = SplitConformal("lac", 0.5)
    lac.threshold = 0.05
    assert not lac.predict(p).any()


class Cached(ClassifierMixin, BaseEstimator):
    """A 'classifier' whose inputs are its probabilities: how MAPIE is given cached predictions."""

    def fit(self, X, y):
        self.classes_ = np.arange(C)
        self.n_features_in_ = C
        return self

    def predict_proba(self, X):
        return np.asarray(X)

    def predict(self, X):
        return np.asarray(X).argmax(axis=1)


class NoRandomization(np.random.RandomState):
    """MAPIE randomizes APS calibration scores by u * p_y with u ~ U(0, 1); u = 0 gives the deterministic score."""

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.zeros(size)


def mapie_sets(score, cal, test, alpha):
    model = SplitConformalClassifier(
        Cached().fit(*cal), confidence_level=1 - alpha, conformity_score=score, random_state=NoRandomization(0)
    ).conformalize(*cal)
    # include_last_label=False: labels up to the quantile, never an empty set (calbench's aps/raps rule)
    _, sets = model.predict_set(test, conformity_score_params={"include_last_label": False})
    return model._mapie_classifier.conformity_score_function_, sets[:, :, 0]


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_quantile_and_sets_match_mapie(score):
    rng = np.random.default_rng(0)
    cal, (test, _) = sample(rng, 200), sample(rng, 500)
    scored, theirs = mapie_sets(score, cal, test, alpha=0.1)
    ours = SplitConformal(score, 0.1, randomized=False).fit(*cal)
    assert ours.threshold == pytest.approx(float(scored.quantiles_[0]), abs=1e-12)
    np.testing.assert_array_equal(ours.predict(test), theirs)


def test_raps_matches_mapie_at_its_tuned_parameters():
    """MAPIE tunes k_reg and lambda on a held-out part of the calibration set; calibrated on the rest with
    the same k_reg and lambda, calbench's RAPS gives MAPIE's quantile and sets."""
    rng = np.random.default_rng(1)
    cal, (test, _) = sample(rng, 400), sample(rng, 500)
    scored, theirs = mapie_sets("raps", cal, test, alpha=0.1)
    held = np.isin(cal[0], scored.X_raps).all(axis=1)
    ours = SplitConformal("raps", 0.1, False, k_reg=int(scored.k_star[0]), lam=float(scored.lambda_star))
    ours.fit(cal[0][~held], cal[1][~held])
    assert ours.threshold == pytest.approx(float(scored.quantiles_[0]), abs=1e-12)
    np.testing.assert_array_equal(ours.predict(test), theirs)


class Fed(np.random.RandomState):
    """MAPIE's uniform draws, fed in: the calibration draws first, then the test draws."""

    def __init__(self, *draws):
        super().__init__(0)
        self.draws = list(draws)

    def uniform(self, low=0.0, high=1.0, size=None):
        return self.draws.pop(0).reshape(size)


def test_randomized_aps_matches_mapie_given_the_same_draws():
    """MAPIE's randomized APS (its calibration score: mass up to y minus v * p_y; its test sets keep the last
    label when mass - v * p <= threshold) is Romano et al.'s with u = 1 - v: same quantile, same sets."""
    rng = np.random.default_rng(5)
    cal, (test, _) = sample(rng, 300), sample(rng, 400)
    v_cal, v_test = rng.uniform(size=300), rng.uniform(size=400)
    model = SplitConformalClassifier(
        Cached().fit(*cal), confidence_level=0.9, conformity_score="aps", random_state=Fed(v_cal, v_test)
    ).conformalize(*cal)
    _, theirs = model.predict_set(test, conformity_score_params={"include_last_label": "randomized"})
    theirs = theirs[:, :, 0]
    ours = SplitConformal("aps", 0.1).fit(*cal, u=1 - v_cal)
    assert ours.threshold == pytest.approx(
        float(model._mapie_classifier.conformity_score_function_.quantiles_[0]), abs=1e-12
    )
    sets = ours.predict(test, u=1 - v_test)
    theirs[np.arange(len(test)), test.argmax(axis=1)] = (
        True  # MAPIE may return an empty set; calbench keeps the top label
    )
    np.testing.assert_array_equal(sets, theirs)
    assert 1.0 < sets.sum(axis=1).mean() < SplitConformal("aps", 0.1, False).fit(*cal).predict(test).sum(axis=1).mean()


def test_randomized_sets_are_seeded_on_their_own_stream_and_tune_raps_as_the_authors_code():
    rng = np.random.default_rng(6)
    cal, (test, _) = sample(rng, 100), sample(rng, 50)
    one, same, other = (SplitConformal("raps", 0.1, seed=s).fit(*cal) for s in (1, 1, 2))
    assert one.threshold == same.threshold and np.array_equal(one.predict(test), same.predict(test))
    assert one.threshold != other.threshold
    # tuned on a 30-case hold-out (ceil(0.3 * 100)), calibrated on the other 70
    assert one.n == 70 and one.k_reg >= 1 and one.lam in (0.001, 0.01, 0.1, 0.2, 0.5)
    given = SplitConformal("raps", 0.1, seed=1, k_reg=2, lam=0.1).fit(*cal)
    assert (given.n, given.k_reg, given.lam) == (100, 2, 0.1)


def test_randomized_aps_sets_of_an_overconfident_model_are_informative():
    """A model whose float32 softmax saturates (the top logit 40 ahead), right 95% of the time, as CoOp-CE on
    the demo: every label's deterministic APS score is 1 up to rounding, so the threshold is 1 and every set
    holds all 6 labels. Randomized, a right answer's score is u * p_top, spread over [0, 1]: singletons, with
    the coverage promised and the same sets as LAC."""
    rng = np.random.default_rng(7)
    n, c = 2000, 6
    top = rng.integers(c, size=n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), top] += 40.0
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
    labels = np.where(rng.uniform(size=n) < 0.95, top, (top + 1 + rng.integers(c - 1, size=n)) % c)
    cal, test = slice(0, 1000), slice(1000, None)
    measured = {
        r: set_metrics(
            SplitConformal("aps", 0.1, r, seed=3).fit(probs[cal], labels[cal]).predict(probs[test]), labels[test]
        )
        for r in (False, True)
    }
    assert (measured[False]["size"], measured[False]["coverage"]) == (6.0, 1.0)
    lac = set_metrics(SplitConformal("lac", 0.1).fit(probs[cal], labels[cal]).predict(probs[test]), labels[test])
    assert measured[True]["size"] == 1.0 and measured[True]["coverage"] == lac["coverage"] == 0.949


@pytest.mark.parametrize("randomized", [True, False])
@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_coverage_is_at_least_one_minus_alpha_over_random_splits(score, randomized):
    """Split conformal's guarantee: E[coverage] >= 1 - alpha (here k / (n + 1) = 37/41 for n = 40). Over T
    splits the mean coverage has variance Var / T, Var = the Beta(k, n + 1 - k) variance of one split's
    coverage plus the binomial variance of its m test cases; the test allows 4 standard deviations."""
    rng = np.random.default_rng(2024)
    n, m, alpha, trials = 40, 100, 0.1, 300
    pool_probs, pool_labels = sample(rng, trials * (n + m), temperature=1.0)
    coverages = []
    for t in range(trials):
        part = slice(t * (n + m), (t + 1) * (n + m))
        probs, labels = pool_probs[part], pool_labels[part]
        model = SplitConformal(score, alpha, randomized, seed=t).fit(probs[:n], labels[:n])
        coverages.append(set_metrics(model.predict(probs[n:]), labels[n:])["coverage"])
    n = model.n  # RAPS calibrates on what its tuning hold-out leaves
    k = quantile_index(n, alpha)
    variance = k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2)) + alpha * (1 - alpha) / m
    tolerance = 4 * math.sqrt(variance / trials)
    assert np.mean(coverages) >= 1 - alpha - tolerance
    assert np.mean(coverages) <= k / (n + 1) + tolerance + (0.05 if score != "lac" else 0.0)


def test_half_split_set_size_uses_validation_only_and_is_seeded():
    rng = np.random.default_rng(3)
    probs, labels = sample(rng, 80)
    size = halves_set_size(probs, labels, 0.1, seed=1)
    assert size == halves_set_size(probs, labels, 0.1, seed=1) and 1.0 <= size <= C
    sure = np.eye(C)[np.arange(80) % C]
    assert halves_set_size(sure, np.arange(80) % C, 0.1) == 1.0  # every label right and certain: singletons


@pytest.mark.parametrize(("alpha", "n"), [(0.1, 9), (0.05, 19), (0.2, 4), (0.5, 1), (0.999, 1), (0.01, 99)])
def test_the_fewest_calibration_cases_give_a_finite_threshold(alpha, n):
    from calbench.deferral import min_calibration_size

    assert min_calibration_size(alpha) == n
    assert quantile_index(n, alpha) <= n
    if n > 1:
        assert quantile_index(n - 1, alpha) > n - 1


@pytest.mark.parametrize(("alpha", "classes", "shots"), [(1e-9, 5, 8), (0.1, 2, 2)])
def test_too_few_calibration_cases_warn_and_record_no_level(alpha, classes, shots):
    """k > n: no score bounds the coverage, every set is every class; the level k / n (1.08, 1.25) is no level."""
    from calbench.deferral import DeferralSettings, deferral_metrics
    from calbench.errors import CalbenchWarning

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(classes), size=classes * shots)
    labels = np.repeat(np.arange(classes), shots)
    with pytest.warns(CalbenchWarning, match=rf"--conformal-alpha {alpha:g} needs at least \d+ validation cases"):
        row = deferral_metrics(probs, labels, probs, labels, DeferralSettings(alpha=alpha))
    assert math.isnan(row["conformal_level"]) and row["conformal_n"] == classes * shots
    assert row["lac_size"] == row["aps_size"] == row["raps_size"] == classes


def test_enough_calibration_cases_record_the_level_without_a_warning():
    import warnings

    from calbench.deferral import DeferralSettings, deferral_metrics

    probs, labels = sample(np.random.default_rng(1), 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = deferral_metrics(probs, labels, probs, labels, DeferralSettings(alpha=0.1))
    assert row["conformal_level"] == 1.0  # k = ceil(10 * 0.9) = 9 of n = 9


def test_the_report_prints_one_minus_alpha_at_every_alpha_and_skips_runs_without_a_level(tmp_path):
    from calbench.report.deferral import _finite_sample

    rows = {("m", "d", "x"): []}
    text = " ".join(b.text for b in _finite_sample(rows, {(1000.0, 0.001): 0.999, (900.0, 0.9): 0.1}))
    assert "1 - alpha = 0.001)" in text and "1 - alpha = 0.9)" in text and "0.00)" not in text
