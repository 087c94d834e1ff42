import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from calbench import published
from calbench.base import Calibrated, FitData
from calbench.baselines.coop import LOSS_METHODS
from calbench.baselines.promptsmooth import RANGES as PROMPTSMOOTH_RANGES
from calbench.baselines.promptsmooth import default_of as promptsmooth_default
from calbench.calibprompt import RANGES as CALIBPROMPT_RANGES
from calbench.calibprompt import PromptMethod
from calbench.errors import CalbenchError
from calbench.methods import list_methods, make_method, read_params_file
from calbench.session import FewShot
from calbench.train import TRAIN_RANGES, TrainConfig, logits_for


@pytest.fixture(scope="module")
def fit_data(session) -> FitData:
    return session.fit_data(1, FewShot(shots=4, views=2))


def test_fit_data_has_no_test_split(fit_data):
    assert not any("test" in name for name in vars(fit_data))
    assert fit_data.train_features.shape == (2, 24, 128)
    assert fit_data.val_features.shape == (24, 128)


def test_hand_prompts_are_encoded_once_per_model_and_prompt_list(session, fit_data, monkeypatch):
    template = "a never encoded tile of {}."  # prompts no other test has encoded: the first ask encodes them
    fresh, other_seed = (
        replace(data, template=template) for data in (fit_data, session.fit_data(2, FewShot(4, views=2)))
    )
    vlm = fresh.vlm
    calls = []
    own = vlm.encode_texts
    monkeypatch.setattr(vlm, "encode_texts", lambda texts: calls.append(list(texts)) or own(texts))
    with torch.inference_mode():  # first asked under inference mode: still a tensor a loss may keep
        assert not fresh.hand_features().is_inference()
    zero_shot = [make_method("zero-shot").fit(data) for data in (fresh, other_seed)]
    make_method("coop-tmm", epochs=1).training_run(other_seed)  # a zero-shot-anchored loss reads them too
    assert calls == [fresh.hand_prompts()]
    with torch.no_grad():
        expected = logits_for(fresh.val_features, own(fresh.hand_prompts()), vlm.logit_scale)
        torch.testing.assert_close(zero_shot[1].predict_logits(fresh.val_features), expected, rtol=0, atol=0)
    other_template = replace(fresh, template="a tile of {}.")
    other_template.hand_features()
    assert calls[1:] == [other_template.hand_prompts()]


def test_calibprompt_defaults_are_the_papers():
    method = make_method("calibprompt")
    assert isinstance(method, PromptMethod)
    terms = method.objective.terms
    assert (terms["ls"].kwargs["alpha"], terms["smac"].weight, terms["smac"].kwargs["alpha"], terms["as"].weight) == (
        0.05,
        1.0,
        0.05,
        0.01,
    )
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
    from calbench.base import VAL_COPIES, FeatureRequest, fit_requests

    plain = fit_requests(make_method("promptsmooth"))
    wrapped = fit_requests(make_method("promptsmooth+ts"))
    assert VAL_COPIES not in plain
    test_request = make_method("promptsmooth").capabilities.test_copies
    assert wrapped[VAL_COPIES] == FeatureRequest("val", test_request.kind, test_request.views)
    assert set(wrapped) - {VAL_COPIES} == set(plain)
    assert fit_requests(make_method("coop-ce+ts")) == {}


def test_calibrated_fit_uses_the_validation_views_it_is_given(fit_data):
    from dataclasses import replace

    from calbench.base import VAL_COPIES, Capabilities, FeatureRequest

    class Recorder:
        def fit(self, logits, labels):
            self.seen = logits
            return self

        def predict_proba(self, logits):
            return torch.softmax(logits, dim=1)

    base = make_method("zero-shot").fit(fit_data)
    base.capabilities = Capabilities(
        test_copies=FeatureRequest("test", "score-noise0.25", 1)
    )  # a smoothed base: scored on VAL_COPIES
    noisy = fit_data.val_features.flip(0)
    recorder = Recorder()
    Calibrated(base, recorder, base_is_fitted=True).fit(replace(fit_data, extra={VAL_COPIES: noisy}))
    torch.testing.assert_close(recorder.seen, base.predict_logits(noisy))


def test_capabilities_are_declared_and_a_smoothed_method_has_two_entry_points(session):
    assert make_method("coop-ce").capabilities.learns_prompt and not make_method("zero-shot").capabilities.learns_prompt
    assert make_method("promptsmooth-zs").capabilities.adapts_at_test
    method = make_method("promptsmooth", epochs=2, n_samples=3)
    assert method.capabilities.smoothed and not make_method("coop-ce").capabilities.smoothed
    method.fit(session.fit_data(1, FewShot(shots=4, views=2), method))
    features = session.test_features()[:5]
    assert method.base_logits(features).shape == (5, 6)  # the base classifier on one view: 5 images, 6 classes
    with pytest.raises(ValueError, match=r"predicts from \(S, N, D\) noisy copies"):
        method.predict_proba(features)  # the smoothed classifier takes copies only
    copies = session.test_views(method.capabilities.test_copies.kind, range(3), np.arange(5))
    torch.testing.assert_close(
        method.predict_proba(copies), torch.softmax(method.base_logits(copies), dim=-1).mean(dim=0)
    )


@pytest.mark.parametrize(
    "name, params",
    [
        ("promptsmooth", {"n_samples": 64}),
        ("promptsmooth-zs", {"adapt_samples": 50}),
        ("promptsmooth", {"train_sigmas": [0.5]}),
        ("promptsmooth-zs", {"init": "fewshot", "epochs": 5}),
    ],
)
def test_every_setting_of_a_smoothed_method_is_in_its_config(name, params):
    from calbench.methods import resolve

    default = {"init": "fewshot"} if "init" in params else {}
    assert resolve(name, overrides=params).config_hash() != resolve(name, overrides=default).config_hash()
    assert resolve(name, overrides=default).config_hash() == resolve(name, overrides=default).config_hash()


# --- every parameter inside its declared range -------------------------------------------------

NAN, INF = float("nan"), float("inf")


OUT_OF_RANGE = [
    ("coop-ce", {"epochs": 0}, "coop-ce epochs=0 is outside [1, 10000]"),
    ("coop-ce", {"epochs": 1e12}, "coop-ce epochs=1000000000000 is outside [1, 10000]"),  # killed at 22 GB
    ("calibprompt", {"epochs": 10_001}, "calibprompt epochs=10001 is outside [1, 10000]"),
    ("coop-ce", {"n_ctx": 0}, "coop-ce n_ctx=0 is outside [1, inf)"),
    ("coop-ce", {"batch_size": 0}, "coop-ce batch_size=0 is outside [1, inf)"),
    ("coop-ce", {"shots": 0}, "coop-ce shots=0 is outside [1, inf)"),
    ("coop-ce", {"lr": -0.002}, "coop-ce lr=-0.002 is outside (0, inf)"),
    ("coop-ce", {"lr": NAN}, "coop-ce lr=nan is outside (0, inf)"),
    ("coop-ce", {"lr": INF}, "coop-ce lr=inf is outside (0, inf)"),
    ("coop-ce", {"momentum": 1.0}, "coop-ce momentum=1.0 is outside [0, 1)"),
    ("coop-ce", {"weight_decay": -1e-4}, "coop-ce weight_decay=-0.0001 is outside [0, inf)"),
    ("coop-ce", {"warmup_epochs": -1}, "coop-ce warmup_epochs=-1 is outside [0, inf)"),
    ("coop-ce", {"warmup_lr": -1e-5}, "coop-ce warmup_lr=-1e-05 is outside [0, inf)"),
    ("coop-ls", {"alpha": 1.5}, "coop-ls alpha=1.5 is outside [0, 1)"),
    ("coop-ls", {"alpha": 1.0}, "coop-ls alpha=1.0 is outside [0, 1)"),
    ("coop-ls", {"alpha": NAN}, "coop-ls alpha=nan is outside [0, 1)"),
    ("coop-mbls", {"margin": 0.0}, "coop-mbls margin=0.0 is outside (0, inf)"),
    ("coop-mbls", {"alpha": -0.1}, "coop-mbls alpha=-0.1 is outside [0, inf)"),
    ("coop-focal", {"gamma": -1.0}, "coop-focal gamma=-1.0 is outside [0, inf)"),
    ("coop-mdca", {"beta": -1}, "coop-mdca beta=-1 is outside [0, inf)"),
    ("coop-mmce", {"weight": INF}, "coop-mmce weight=inf is outside [0, inf)"),
    ("coop-logitnorm", {"temperature": 0}, "coop-logitnorm temperature=0 is outside (0, inf)"),
    ("coop-mmv", {"beta": -0.01}, "coop-mmv beta=-0.01 is outside [0, inf)"),
    ("ls+smac", {"w_smac": -1.0}, "ls+smac w_smac=-1.0 is outside [0, inf)"),
    ("calibprompt-focal", {"alpha": 2}, "calibprompt-focal alpha=2 is outside [0, 1)"),
    ("calibprompt", {"alpha": 1.5}, "calibprompt alpha=1.5 is outside [0, 1)"),
    ("calibprompt", {"w_smac": -1.0}, "calibprompt w_smac=-1.0 is outside [0, inf)"),
    ("calibprompt", {"w_as": NAN}, "calibprompt w_as=nan is outside [0, inf)"),
    ("calibprompt", {"epochs": 0}, "calibprompt epochs=0 is outside [1, 10000]"),
    ("promptsmooth", {"sigma": 0.0}, "promptsmooth sigma=0.0 is outside (0, inf)"),
    ("promptsmooth", {"train_sigmas": [0.25, -1.0]}, "promptsmooth train_sigmas=-1.0 is outside (0, inf)"),
    ("promptsmooth", {"n_samples": 0}, "promptsmooth n_samples=0 is outside [1, inf)"),
    ("promptsmooth-zs", {"adapt_samples": 0}, "promptsmooth-zs adapt_samples=0 is outside [1, inf)"),
    ("promptsmooth", {"epochs": 0}, "promptsmooth epochs=0 is outside [1, 10000]"),
    ("promptsmooth-as", {"w_as": -0.01}, "promptsmooth-as w_as=-0.01 is outside [0, inf)"),
    ("promptsmooth-zs", {"tta_lr": 0.0}, "promptsmooth-zs tta_lr=0.0 is outside (0, inf)"),
    ("promptsmooth-zs", {"tta_steps": -1}, "promptsmooth-zs tta_steps=-1 is outside [0, inf)"),
    ("promptsmooth-zs", {"sigma": INF}, "promptsmooth-zs sigma=inf is outside (0, inf)"),
]


@pytest.mark.parametrize("method, params, message", OUT_OF_RANGE)
def test_a_parameter_outside_its_range_is_one_line_naming_it(method, params, message):
    with pytest.raises(CalbenchError) as caught:
        make_method(method, **params)
    assert str(caught.value) == f"{message}; pass a value in that range"


def test_counts_must_be_whole_numbers():
    with pytest.raises(CalbenchError) as caught:
        make_method("promptsmooth", n_samples=2.5)
    assert str(caught.value) == "promptsmooth n_samples=2.5 must be a whole number in [1, inf)"
    with pytest.raises(CalbenchError) as caught:
        make_method("promptsmooth", train_sigmas=[])
    assert str(caught.value) == "promptsmooth train_sigmas is empty; give at least one noise level, e.g. [0.25]"


def test_every_default_lies_inside_its_declared_range():
    numeric = {"epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs", "warmup_lr", "n_ctx", "shots"}
    assert set(TRAIN_RANGES) == numeric
    for name, allowed in TRAIN_RANGES.items():
        assert getattr(TrainConfig(), name) in allowed, name
    for method, spec in LOSS_METHODS.items():
        for name, param in spec.params.items():
            assert published.default(method, name) in param.allowed, (method, name)
    assert set(CALIBPROMPT_RANGES) == {"alpha", "w_smac", "w_as"}
    for name, allowed in PROMPTSMOOTH_RANGES.items():
        defaults = promptsmooth_default(
            "promptsmooth-zs" if name in ("adapt_samples", "tta_steps", "tta_lr") else "promptsmooth-as", name
        )
        assert all(d in allowed for d in (defaults if isinstance(defaults, tuple) else [defaults])), name


def test_boundaries_inside_the_range_are_accepted():
    assert make_method("coop-ls", alpha=0.0).objective.terms["ls"].kwargs == {"alpha": 0.0}
    assert make_method("coop-ce", momentum=0.0, weight_decay=0, warmup_epochs=0, warmup_lr=0).config.momentum == 0.0
    assert make_method("promptsmooth-zs", tta_steps=0).tta_steps == 0


# --- --params shapes ---------------------------------------------------------------------------

BAD_SHAPES = [
    ({"coop-ce": [1]}, 'coop-ce must map to an object of parameters like {"alpha": 0.1}, got [1]'),
    ({"coop-ce": 0.1}, 'coop-ce must map to an object of parameters like {"alpha": 0.1}, got 0.1'),
    ({"coop-ce": {"alpha": [1]}}, "coop-ce alpha must be one number, text or true/false, got [1]"),
    ({"coop-ce": {"lr": {"a": 1}}}, 'coop-ce lr must be one number, text or true/false, got {"a": 1}'),
    ({"promptsmooth": {"sigma": [0.5]}}, "promptsmooth sigma must be one number, text or true/false, got [0.5]"),
    ({"promptsmooth": {"train_sigmas": ["a"]}}, 'promptsmooth train_sigmas must be a list of numbers, got ["a"]'),
    (
        {"promptsmooth": {"train_sigmas": {"a": 1}}},
        'promptsmooth train_sigmas must be one number, text or true/false (or a list of numbers), got {"a": 1}',
    ),
    ({"method": "coop-ce", "params": [1]}, 'coop-ce must map to an object of parameters like {"alpha": 0.1}, got [1]'),
]


@pytest.mark.parametrize("content, message", BAD_SHAPES)
def test_a_params_file_of_the_wrong_shape_is_one_line(tmp_path, content, message):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(content))
    with pytest.raises(CalbenchError) as caught:
        read_params_file(path)
    assert str(caught.value) == f"{path}: {message}"


def test_lists_of_numbers_are_read_where_a_method_declares_them(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"promptsmooth": {"sigma": 0.5, "train_sigmas": [0.5, 1]}, "coop-ce": {}}))
    assert read_params_file(path) == {"promptsmooth": {"sigma": 0.5, "train_sigmas": [0.5, 1]}, "coop-ce": {}}
    path.write_text(json.dumps({"method": "coop-ls", "params": {"alpha": 0.1, "ctx_init": None}, "value": 0.03}))
    assert read_params_file(path) == {"coop-ls": {"alpha": 0.1, "ctx_init": None}}
