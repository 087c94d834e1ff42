import numpy as np
import pytest
import torch

from calbench.errors import CalbenchError
from calbench.experiment import DEFAULT_METHODS, fewshot_features
from calbench.cache import FeatureCache
from calbench.methods import Calibrated, FitData, PromptMethod, list_methods, make_method
from calbench.train import TrainConfig


@pytest.fixture(scope="module")
def fit_data(tiny, synthetic, cache_dir) -> FitData:
    cache = FeatureCache(cache_dir, tiny, progress=False)
    return fewshot_features(tiny, synthetic, cache, shots=4, seed=1, views=2).fit


def test_fit_data_has_no_test_split(fit_data):
    assert not any("test" in name for name in vars(fit_data))
    assert fit_data.train_features.shape == (2, 20, 64)
    assert fit_data.val_features.shape == (20, 64)


@pytest.mark.parametrize("name", DEFAULT_METHODS)
def test_every_method_gives_probabilities(fit_data, name):
    method = make_method(name, epochs=3) if "zero-shot" not in name else make_method(name)
    probs = method.fit(fit_data).predict_proba(fit_data.val_features)
    assert probs.shape == (20, 5)
    assert torch.all(probs >= 0)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(20, dtype=probs.dtype))


def test_calibprompt_defaults_are_the_papers():
    method = make_method("calibprompt")
    assert isinstance(method, PromptMethod)
    terms = method.objective.terms
    assert (terms["ls"].kwargs["alpha"], terms["smac"].weight, terms["smac"].kwargs["alpha"], terms["as"].weight) == (0.05, 1.0, 0.05, 0.01)
    assert method.config == TrainConfig()


def test_post_hoc_variant_wraps_the_base(fit_data):
    method = make_method("coop-ce+ts", epochs=2)
    assert isinstance(method, Calibrated)
    method.fit(fit_data)
    base = method.base.predict_logits(fit_data.val_features)
    t = method.calibrator.temperature
    torch.testing.assert_close(method.predict_proba(fit_data.val_features), torch.softmax(base / t, dim=1))


def test_bad_method_names_and_parameters():
    with pytest.raises(CalbenchError, match="unknown method 'coop'"):
        make_method("coop")
    with pytest.raises(CalbenchError, match="unknown calibrator 'xx'"):
        make_method("coop-ce+xx")
    with pytest.raises(CalbenchError, match="unknown parameter"):
        make_method("calibprompt", beta=1)
    assert {"zero-shot", "coop-ce", "coop-ls", "coop-mbls", "calibprompt"} <= set(list_methods())


@pytest.mark.parametrize("name", [m for m in list_methods() if m != "zero-shot" and not m.startswith("promptsmooth")])
def test_every_loss_method_trains_and_gives_probabilities(fit_data, name):
    method = make_method(name, epochs=2)
    probs = method.fit(fit_data).predict_proba(fit_data.val_features)
    assert torch.isfinite(probs).all() and torch.all(probs >= 0)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(20, dtype=probs.dtype))


def test_loss_method_parameters_set_their_terms():
    m = make_method("calibprompt-focal", alpha=0.2, gamma=2.0, w_as=0.5)
    terms = m.objective.terms
    assert terms["focal"].kwargs == {"gamma": 2.0}
    assert (terms["smac"].kwargs, terms["smac"].weight, terms["as"].weight) == ({"alpha": 0.2}, 1.0, 0.5)
    ls_smac = make_method("ls+smac", alpha=0.1).objective.terms
    assert ls_smac["ls"].kwargs == ls_smac["smac"].kwargs == {"alpha": 0.1}  # one shared alpha
    assert make_method("coop-mdca", beta=5.0).objective.terms["mdca"].weight == 5.0
    with pytest.raises(CalbenchError, match="coop-focal: unknown parameter"):
        make_method("coop-focal", alpha=0.1)


def test_ablation_ids_with_plus_still_take_a_calibrator():
    from calbench.methods import parse_method

    assert parse_method("ls+smac") == ("ls+smac", None)
    assert parse_method("ls+smac+ts") == ("ls+smac", "ts")
    assert parse_method("calibprompt+iso") == ("calibprompt", "iso")


def test_calibrators_on_smoothed_methods_fit_on_noisy_validation_views():
    from calbench.methods import VAL_AS_TEST, FeatureRequest, feature_requests

    plain = feature_requests(make_method("promptsmooth"))
    wrapped = feature_requests(make_method("promptsmooth+ts"))
    assert VAL_AS_TEST not in plain
    test_request = make_method("promptsmooth").test_request
    assert wrapped[VAL_AS_TEST] == FeatureRequest("val", test_request.kind, test_request.views)
    assert set(wrapped) - {VAL_AS_TEST} == set(plain)
    assert feature_requests(make_method("coop-ce+ts")) == {}


def test_calibrated_fit_uses_the_validation_views_it_is_given(fit_data):
    from dataclasses import replace

    from calbench.methods import VAL_AS_TEST

    class Recorder:
        def fit(self, logits, labels):
            self.seen = logits
            return self

        def predict_proba(self, logits):
            return torch.softmax(logits, dim=1)

    base = make_method("zero-shot").fit(fit_data)
    noisy = fit_data.val_features.flip(0)
    recorder = Recorder()
    Calibrated(base, recorder, base_is_fitted=True).fit(replace(fit_data, extra={VAL_AS_TEST: noisy}))
    torch.testing.assert_close(recorder.seen, base.predict_logits(noisy))
