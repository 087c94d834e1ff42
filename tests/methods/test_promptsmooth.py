"""PromptSmooth on the demo: noisy transforms, the three methods, and `certify`."""

import csv
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import norm
from typer.testing import CliRunner

from calbench.baselines.promptsmooth import NOISY_VIEWS, PromptSmooth, hand_context, marginal_entropy
from calbench.calibprompt import PromptMethod
from calbench.certify import ITEM_COLUMNS, run_certify
from calbench.cli.app import app
from calbench.data.transforms import NoiseKind, describe, noise_kind, parse_noise_kind, to_tensor
from calbench.errors import CalbenchError
from calbench.losses import Objective, Term
from calbench.methods import make_method
from calbench.published import default
from calbench.randomized_smoothing import certified_accuracy, smoothed_proba
from calbench.results import CERTIFY_COLUMNS
from calbench.session import FewShot, RunContext

TEST_IMAGES = np.arange(0, 900, 75)  # 12 test images, 2 per class
SMALL = {"epochs": 2, "n_samples": 4}
ZS_SMALL = {"n_samples": 4, "adapt_samples": 3}


def _fit(method, session):
    return session.fit_data(1, FewShot(shots=4, views=2), method)


def _copies(method, session):
    """The test images in the form ``method`` predicts from (Session.test_features, on TEST_IMAGES only)."""
    caps = method.capabilities
    requests = [r for r in (caps.adapt_copies, caps.test_copies) if r is not None]
    return torch.cat([session.test_views(r.kind, range(r.views), TEST_IMAGES) for r in requests])


def _assert_probabilities(probs):
    assert probs.shape[0] == len(TEST_IMAGES) and probs.shape[1] >= 2
    assert torch.all(probs >= 0) and torch.all(probs <= 1)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(TEST_IMAGES), dtype=probs.dtype))


# --- noisy transforms -------------------------------------------------------------------------


def test_noise_kinds_have_distinct_cache_descriptions_and_leave_eval_alone(tiny):
    cfg = tiny.preprocess
    assert describe("eval", cfg) == f"eval:resize-shortest+center-crop;{cfg.describe()}"
    assert describe("train", cfg) == f"train:rrc(0.08, 1.0)+hflip;seeded(split,run-seed,view,index);{cfg.describe()}"
    kinds = ["eval", "train", "score-noise0.25", "score-noise0.5", "adapt-noise0.25", "select-noise0.25"]
    kinds += ["estimate-noise0.25", "train-noise0.25", "train-noise0.25+0.5+1"]
    assert len({describe(kind, cfg) for kind in kinds}) == len(kinds)
    assert (noise_kind(0.25, "score"), noise_kind([1.0, 0.5], "train")) == ("score-noise0.25", "train-noise1+0.5")
    assert parse_noise_kind("train-noise0.5+1") == NoiseKind("train", (0.5, 1.0))
    assert parse_noise_kind("eval") is None
    for bad in ("noise0.25", "score-noise", "score-noise-1", "blur0.5", "score-noise0.25+0.5", "train-noise0.5+0.5"):
        with pytest.raises(ValueError):
            describe(bad, cfg)
    for sigma, role in ((0.0, "score"), (0.25, "scoring"), ([0.25, 0.5], "adapt")):
        with pytest.raises(ValueError):
            noise_kind(sigma, role)


def _pixels(tensor, cfg):
    return tensor * torch.tensor(cfg.std)[:, None, None] + torch.tensor(cfg.mean)[:, None, None]


@pytest.mark.parametrize("sigma", [0.25, 1.0])
def test_noise_is_seeded_gaussian_added_in_pixel_space_before_normalisation(tiny, synthetic, sigma):
    cfg, image = tiny.preprocess, synthetic.load_image("test", 3)
    kind = noise_kind(sigma, "score")
    clean = _pixels(to_tensor(image, "eval", cfg, 0, 3, "test"), cfg)
    noise = _pixels(to_tensor(image, kind, cfg, 0, 3, "test"), cfg) - clean
    assert abs(float(noise.mean())) < 0.05 * sigma and float(noise.std()) == pytest.approx(sigma, rel=0.05)
    assert torch.equal(to_tensor(image, kind, cfg, 0, 3, "test"), to_tensor(image, kind, cfg, 0, 3, "test"))
    other_view = _pixels(to_tensor(image, kind, cfg, 1, 3, "test"), cfg) - clean
    assert abs(float(torch.corrcoef(torch.stack([noise.flatten(), other_view.flatten()]))[0, 1])) < 0.1
    # the augmented kind keeps the crop and flip of the plain "train" view of the same run seed, and adds the noise
    train = noise_kind(sigma, "train")
    crop_noise = _pixels(to_tensor(image, train, cfg, 2, 3, "train", seed=1), cfg) - _pixels(
        to_tensor(image, "train", cfg, 2, 3, "train", seed=1), cfg
    )
    assert float(crop_noise.std()) == pytest.approx(sigma, rel=0.05)


def test_noise_of_different_sigmas_is_independent(tiny, synthetic):
    cfg, image = tiny.preprocess, synthetic.load_image("test", 3)
    clean = _pixels(to_tensor(image, "eval", cfg, 0, 3, "test"), cfg)
    a, b = (_pixels(to_tensor(image, noise_kind(s, "score"), cfg, 0, 3, "test"), cfg) - clean for s in (0.25, 0.5))
    assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.1


# --- methods ----------------------------------------------------------------------------------


def test_defaults_are_promptsmooths():
    method = make_method("promptsmooth")
    assert (method.config.n_ctx, method.config.epochs, method.config.shots, method.config.batch_size) == (5, 50, 16, 32)
    views = method.capabilities.fit_features[NOISY_VIEWS]
    assert (views.images, views.kind, views.views) == ("train", "train-noise0.25+0.5+1", None)  # one per epoch
    copies = method.capabilities.test_copies
    assert copies.kind == "score-noise0.25" and copies.views == default("promptsmooth", "n_samples") == 32
    assert set(make_method("promptsmooth-as").objective.terms) == {"ce", "as"}
    assert make_method("promptsmooth-as").objective.terms["as"].weight == default("calibprompt", "w_as")


def test_few_shot_promptsmooth_is_coop_on_the_mixed_sigma_noisy_views(session):
    method = make_method("promptsmooth", train_sigmas=[0.25, 0.5], **SMALL)
    fit = _fit(method, session)
    assert fit.extra[NOISY_VIEWS].shape[0] == 2  # FewShot(views=2)
    method.fit(fit)
    reference = PromptMethod(Objective({"ce": Term("cross_entropy")}), method.config).fit(
        replace(fit, train_features=fit.extra[NOISY_VIEWS])
    )
    torch.testing.assert_close(method.learner.ctx, reference.learner.ctx)


@pytest.mark.parametrize("name", ["promptsmooth", "promptsmooth-as"])
def test_few_shot_probabilities_are_the_mean_softmax_over_noisy_copies(session, name):
    method = make_method(name, **SMALL)
    method.fit(_fit(method, session))
    copies = _copies(method, session)
    with torch.no_grad():
        probs = method.predict_proba(copies)
        _assert_probabilities(probs)
        torch.testing.assert_close(
            probs, torch.stack([torch.softmax(method.base_logits(view), dim=1) for view in copies]).mean(dim=0)
        )
        torch.testing.assert_close(method.predict_logits(copies).exp(), probs)


def test_marginal_entropy_hand_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # softmax (1/2, 1/2), (3/4, 1/4): mean (5/8, 3/8)
    assert float(marginal_entropy(logits)) == pytest.approx(
        -(0.625 * math.log(0.625) + 0.375 * math.log(0.375)), rel=1e-6
    )


def test_zero_shot_promptsmooth_starts_from_the_hand_prompt_and_scores_on_other_copies(session):
    assert hand_context("a photo of a {}.") == "a photo of a"
    untuned = make_method("promptsmooth-zs", tta_steps=0, **ZS_SMALL)
    fit = _fit(untuned, session)
    untuned.fit(fit)
    zero_shot = make_method("zero-shot").fit(fit)
    inputs = _copies(untuned, session)
    assert inputs.shape[0] == 3 + 4  # adaptation copies, then scoring copies
    with torch.no_grad():
        expected = torch.stack([zero_shot.predict_proba(view) for view in inputs[3:]]).mean(dim=0)
        torch.testing.assert_close(untuned.predict_proba(inputs), expected, atol=1e-5, rtol=1e-4)


def test_test_time_tuning_lowers_the_marginal_entropy_and_resets_the_prompt(session):
    before = make_method("promptsmooth-zs", tta_steps=0, **ZS_SMALL)
    after = make_method("promptsmooth-zs", tta_steps=2, tta_lr=0.05, **ZS_SMALL)
    fit = _fit(before, session)
    inputs = _copies(before, session)
    entropy = {}
    for name, method in (("before", before), ("after", after)):
        method.fit(fit)
        start = method.learner.ctx.detach().clone()
        with torch.no_grad():
            probs = smoothed_proba(method.adapt(inputs[:3])(inputs[:3]))  # on the copies it tuned to
        _assert_probabilities(probs)
        entropy[name] = -(probs * probs.log()).sum(dim=1)
        assert torch.equal(method.learner.ctx.detach(), start)
    assert float(entropy["after"].mean()) < float(entropy["before"].mean())


def test_zero_shot_promptsmooth_from_the_few_shot_prompt(session):
    fewshot = make_method("promptsmooth", **SMALL)
    untuned = make_method("promptsmooth-zs", init="fewshot", tta_steps=0, adapt_samples=3, **SMALL)
    tuned = make_method("promptsmooth-zs", init="fewshot", adapt_samples=3, **SMALL)
    assert (
        isinstance(untuned.fewshot, PromptSmooth)
        and untuned.capabilities.fit_features == fewshot.capabilities.fit_features
        and untuned.capabilities.epochs == fewshot.capabilities.epochs == 2
    )
    fit = _fit(fewshot, session)
    inputs = _copies(untuned, session)
    for method in (fewshot, untuned, tuned):
        method.fit(fit)
    with torch.no_grad():
        torch.testing.assert_close(
            untuned.predict_proba(inputs), fewshot.predict_proba(inputs[3:]), atol=1e-5, rtol=1e-4
        )
        _assert_probabilities(tuned.predict_proba(inputs))


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("promptsmooth", {"nope": 1}, "promptsmooth: unknown parameter"),
        (
            "promptsmooth",
            {"train_sigmas": [0.25, 0.0]},
            r"promptsmooth train_sigmas=0.0 is outside \(0, inf\); pass a value",
        ),
        ("promptsmooth", {"n_samples": 0}, r"promptsmooth n_samples=0 is outside \[1, inf\); pass a value"),
        ("promptsmooth", {"n_samples": 2.5}, r"promptsmooth n_samples=2.5 must be a whole number in \[1, inf\)"),
        ("promptsmooth-zs", {"epochs": 3}, "only apply with init=fewshot"),
        ("promptsmooth-zs", {"init": "random"}, "init must be 'hand' or 'fewshot'"),
    ],
)
def test_bad_parameters_are_user_errors(name, params, message):
    with pytest.raises(CalbenchError, match=message):
        make_method(name, **params)


# --- certify ----------------------------------------------------------------------------------


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.mark.e2e
def test_certify_writes_certified_accuracy_at_each_radius(tmp_path, cache_dir):
    common = dict(
        n=20,
        n0=4,
        alpha=0.01,
        subset=12,
        shots=4,
        fewshot=FewShot(views=2),
        context=RunContext(device="cpu", cache_dir=cache_dir),
        out=tmp_path,
    )
    result = run_certify(method="promptsmooth", sigma=0.5, params=SMALL, **common)
    columns, rows = _read(result.path)
    assert columns == CERTIFY_COLUMNS and [float(r["radius"]) for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert {(r["method"], r["sigma"], r["n0"], r["n"], r["subset"], r["shots"]) for r in rows} == {
        ("promptsmooth", "0.5", "4", "20", "12", "4")
    }
    item_columns, items = _read(result.items_path)
    assert item_columns == ITEM_COLUMNS and len(items) == 12 and len({i["index"] for i in items}) == 12
    predicted, radii, labels = (np.array([float(i[k]) for i in items]) for k in ("predicted", "radius", "label"))
    expected = certified_accuracy(predicted, radii, labels)
    assert [float(r["certified_accuracy"]) for r in rows] == [expected[r] for r in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert float(rows[0]["abstain_rate"]) == np.mean(predicted == -1)
    # with n samples the bound is at most alpha^(1/n): no radius can exceed sigma * Phi^-1 of it
    assert radii.max() <= 0.5 * norm.ppf(0.01 ** (1 / 20)) + 1e-12
    assert np.all(radii[predicted == -1] == 0.0)

    run_certify(method="promptsmooth-zs", sigma=0.5, params=ZS_SMALL, **common)
    run_certify(method="promptsmooth", sigma=0.5, params=SMALL, **common)  # the same run again replaces its rows
    _, rows = _read(result.path)
    assert [r["method"] for r in rows].count("promptsmooth") == 5 and [r["method"] for r in rows].count(
        "promptsmooth-zs"
    ) == 5


@pytest.mark.e2e
def test_certify_command(tmp_path, cache_dir):
    runner = CliRunner()
    args = [
        "certify",
        "--method",
        "zero-shot",
        "--n",
        "10",
        "--n0",
        "3",
        "--subset",
        "8",
        "--shots",
        "2",
        "--out",
        str(tmp_path),
        "--cache-dir",
        str(cache_dir),
    ]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "certified acc %" in result.output and (tmp_path / "certification.csv").is_file()
    bad = runner.invoke(app, [*args, "--alpha", "2"], catch_exceptions=False)
    assert bad.exit_code == 2 and bad.output.strip() == "error: --alpha must be in (0, 1), got 2.0"


def test_zero_shot_promptsmooth_from_the_few_shot_prompt_takes_the_models_published_training_options():
    """init=fewshot trains an inner few-shot prompt: on MedCLIP it warms up at the published 1e-3, as every
    other prompt learner there; init=hand trains nothing, so it takes no training option."""
    from calbench.methods import resolve

    fewshot = resolve("promptsmooth-zs", "medclip", "covid", {"init": "fewshot"})
    assert fewshot.params == {"init": "fewshot", "warmup_lr": 1e-3}
    assert fewshot.build().fewshot.config.warmup_lr == 1e-3
    assert fewshot.sources["warmup_lr"].endswith("vit_b32_medclip_c16_ep50_batch16.yaml:22")
    assert fewshot.values["n_ctx"] == 5  # the inner few-shot PromptSmooth's trainer options, not CoOp's
    assert resolve("promptsmooth-zs", "medclip", "covid").params == {}
