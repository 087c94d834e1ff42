import numpy as np
import pytest
import torch
from netcal.scaling import TemperatureScaling as NetcalTemperatureScaling

from calbench.baselines.posthoc import TemperatureScaling


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
    np.testing.assert_allclose(ours.predict_proba(logits).numpy(), reference.transform(torch.softmax(logits, dim=1).numpy()), atol=1e-5)


@pytest.mark.parametrize("seed, spread", [(1, 0.5), (2, 8.0)])
def test_temperature_is_at_least_as_good_as_netcal_on_hard_cases(seed, spread):
    """Very sharp or very flat logits: netcal's clipped log-probabilities and its stopping rule
    leave it a little off the optimum; our validation NLL must be no worse than its."""
    logits, labels = _problem(seed, spread)
    _, reference_t = _netcal(logits, labels)
    ours = TemperatureScaling().fit(logits, labels).temperature
    nll = lambda temp: float(torch.nn.functional.cross_entropy(logits / temp, labels))
    assert ours == pytest.approx(reference_t, rel=5e-3)
    assert nll(ours) <= nll(reference_t) + 1e-12


def test_temperature_minimises_validation_nll():
    rng = np.random.default_rng(3)
    labels = torch.tensor(rng.integers(0, 4, 200))
    logits = torch.tensor(rng.normal(size=(200, 4)) * 4.0)
    t = TemperatureScaling().fit(logits, labels).temperature
    nll = lambda temp: float(torch.nn.functional.cross_entropy(logits / temp, labels))
    assert nll(t) <= min(nll(t * 0.98), nll(t * 1.02))
