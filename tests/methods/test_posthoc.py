import warnings

import numpy as np
import pytest
import torch
from folders import class_copy
from netcal.scaling import TemperatureScaling as NetcalTemperatureScaling

from calbench.base import Calibrated
from calbench.baselines.coop import LOSS_METHODS
from calbench.baselines.posthoc import TemperatureScaling
from calbench.methods import CALIBRATORS, list_calibrators, list_methods, make_method
from calbench.session import FewShot, RunContext, Session


def _problem(seed: int, spread: float):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, 400)
    logits = rng.normal(size=(400, 5)) * spread
    logits[np.arange(400), labels] += 2.0
    return torch.tensor(logits), torch.tensor(labels)


def _netcal(logits, labels):
    reference = NetcalTemperatureScaling()
    reference.fit(torch.softmax(logits, dim=1).numpy(), labels.numpy())
    return reference, 1.0 / float(np.ravel(reference.weights)[0])  # netcal scales log-probs by w = 1/T


@pytest.mark.parametrize("seed, spread", [(0, 3.0), (4, 2.0), (5, 4.0), (6, 1.0)])
def test_temperature_scaling_matches_netcal(seed, spread):
    logits, labels = _problem(seed, spread)
    reference, reference_t = _netcal(logits, labels)
    ours = TemperatureScaling().fit(logits, labels)
    assert ours.temperature == pytest.approx(reference_t, rel=1e-5)
    np.testing.assert_allclose(
        ours.predict_proba(logits).numpy(), reference.transform(torch.softmax(logits, dim=1).numpy()), atol=1e-5
    )


@pytest.mark.parametrize("seed, spread", [(1, 0.5), (2, 8.0)])
def test_temperature_is_at_least_as_good_as_netcal_on_hard_cases(seed, spread):
    """Very sharp or very flat logits: netcal's clipped log-probabilities and its stopping rule
    leave it a little off the optimum; our validation NLL must be no worse than its."""
    logits, labels = _problem(seed, spread)
    _, reference_t = _netcal(logits, labels)
    ours = TemperatureScaling().fit(logits, labels).temperature

    def nll(temp):
        return float(torch.nn.functional.cross_entropy(logits / temp, labels))

    assert ours == pytest.approx(reference_t, rel=5e-3)
    assert nll(ours) <= nll(reference_t) + 1e-12


def test_temperature_minimises_validation_nll():
    rng = np.random.default_rng(3)
    labels = torch.tensor(rng.integers(0, 4, 200))
    logits = torch.tensor(rng.normal(size=(200, 4)) * 4.0)
    t = TemperatureScaling().fit(logits, labels).temperature

    def nll(temp):
        return float(torch.nn.functional.cross_entropy(logits / temp, labels))

    assert nll(t) <= min(nll(t * 0.98), nll(t * 1.02))


def test_vector_scaling_matches_netcal():
    """netcal's multiclass logistic calibration is vector scaling on log-probabilities:
    on normalised log-probabilities both must find the same per-class scale and bias."""
    from netcal.scaling import LogisticCalibration

    from calbench.baselines.posthoc import VectorScaling

    logits, labels = _problem(0, 3.0)
    log_probs = torch.log_softmax(logits, dim=1)
    reference = LogisticCalibration()
    reference.fit(log_probs.exp().numpy(), labels.numpy())
    ours = VectorScaling().fit(log_probs, labels)
    np.testing.assert_allclose(ours.weight.numpy(), np.ravel(reference.weights), rtol=1e-3)
    np.testing.assert_allclose(ours.bias.numpy(), np.ravel(reference.intercept), atol=1e-3)
    np.testing.assert_allclose(
        ours.predict_proba(log_probs).numpy(), reference.transform(log_probs.exp().numpy()), atol=1e-4
    )


def test_isotonic_calibrator_is_one_vs_all_isotonic_regression():
    """netcal's isotonic calibrator, checked against scikit-learn's isotonic regression per class."""
    from sklearn.isotonic import IsotonicRegression

    from calbench.methods import CALIBRATORS

    logits, labels = _problem(4, 2.0)
    probs = torch.softmax(logits, dim=1).numpy()
    ours = CALIBRATORS.get("iso")().fit(logits, labels).predict_proba(logits).numpy()
    expected = np.stack(
        [
            IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
            .fit(probs[:, c], labels.numpy() == c)
            .predict(probs[:, c])
            for c in range(5)
        ],
        axis=1,
    )
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ours, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["ts", "vs", "hist", "iso", "beta"])
def test_every_calibrator_gives_probabilities_and_lowers_validation_nll(name):
    from calbench.methods import CALIBRATORS

    logits, labels = _problem(5, 4.0)  # overconfident: temperature about 7.6
    calibrated = CALIBRATORS.get(name)().fit(logits, labels).predict_proba(logits)
    assert calibrated.shape == logits.shape and torch.all(calibrated >= 0)
    torch.testing.assert_close(calibrated.sum(dim=1), torch.ones(400, dtype=calibrated.dtype))
    before = float(torch.nn.functional.cross_entropy(logits, labels))
    after = float(torch.nn.functional.nll_loss(torch.log(calibrated.clamp_min(1e-12)), labels))
    assert after < before


# --- every calibrator on every method family, two classes and three ------------------------------

FEWSHOT = FewShot(shots=2, views=1)


TEST_ITEMS = 12  # test images scored per case: enough for every calibrator, fast for test-time tuning


#: one member of every registered method family, with few epochs and noisy copies
FAMILIES = {
    "zero-shot": {},
    "coop-ce": {"epochs": 2},
    "calibprompt": {"epochs": 2},
    "ls+smac": {"epochs": 2},
    "promptsmooth": {"epochs": 2, "n_samples": 2, "train_sigmas": [0.25]},
    "promptsmooth-zs": {"n_samples": 2, "adapt_samples": 2},
}


@pytest.fixture(scope="module")
def sessions(synthetic, binary_folder, cache_dir, tmp_path_factory):
    """Two classes and three: netcal's multiclass beta calibration takes 20-40 s per fit on five."""
    three = class_copy(synthetic.root, tmp_path_factory.mktemp("three") / "three", 3)
    context = RunContext(device="cpu", cache_dir=cache_dir)
    return {
        "two classes": Session("tiny", str(binary_folder), context),
        "three classes": Session("tiny", str(three), context),
    }


@pytest.fixture(scope="module")
def fitted(sessions):
    """Each family fitted once per dataset, shared by the calibrators on top of it."""
    cache = {}

    def get(kind, family):
        if (kind, family) not in cache:
            method = make_method(family, **FAMILIES[family])
            cache[(kind, family)] = method.fit(sessions[kind].fit_data(1, FEWSHOT, method))
        return cache[(kind, family)]

    return get


# --- every calibrator on every method family, two classes and five ----------------------------


def test_the_families_cover_every_registered_method():
    families = set(FAMILIES) | set(LOSS_METHODS) | {"promptsmooth-as"}  # CoOp losses share coop-ce's code
    assert set(list_methods()) <= families
    assert sorted(list_calibrators()) == ["beta", "hist", "iso", "ts", "vs"]


@pytest.mark.parametrize("calibrator", list_calibrators())
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind, n_classes", [("two classes", 2), ("three classes", 3)])
def test_every_calibrator_on_every_family_gives_distributions(sessions, fitted, kind, n_classes, family, calibrator):
    session = sessions[kind]
    method = Calibrated(fitted(kind, family), CALIBRATORS.get(calibrator)(), base_is_fitted=True)
    method.fit(session.fit_data(1, FEWSHOT, method))
    inputs = session.test_features(method)
    inputs = inputs[:, :TEST_ITEMS] if inputs.dim() == 3 else inputs[:TEST_ITEMS]
    items = min(TEST_ITEMS, len(session.test_labels))
    with torch.no_grad():
        probs = method.predict_proba(inputs)
    assert probs.shape == (items, n_classes)
    assert torch.isfinite(probs).all() and torch.all(probs >= 0)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(items, dtype=probs.dtype))


@pytest.mark.parametrize("name", ["hist", "iso", "beta"])
def test_two_class_netcal_output_is_one_minus_p_and_p(name):
    """netcal calibrates the positive class alone on two columns; the wrapper gives [1 - p, p]."""
    rng = np.random.default_rng(0)
    labels = torch.tensor(rng.integers(0, 2, 200))
    logits = torch.tensor(rng.normal(size=(200, 2)) * 3.0)
    logits[torch.arange(200), labels] += 1.0
    ours = CALIBRATORS.get(name)().fit(logits, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        positive = np.ravel(ours.model.transform(torch.softmax(logits.double(), dim=1).numpy()))
    probs = ours.predict_proba(logits).numpy()
    np.testing.assert_allclose(probs[:, 1], np.clip(positive, 0, 1), atol=1e-12)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
