"""PromptSmooth as published: every default pinned to the file and line of nhussein/promptsmooth
(222377a) or KaiyangZhou/CoOp (ff61507) it comes from, the zero-shot method's starting phrase and
learnable words, its one AdamW step, and certification's published n0 / n / alpha with what a
smaller n costs."""

from __future__ import annotations

import inspect

import pytest
import torch
from scipy.stats import norm

from calbench import published
from calbench.base import FitData
from calbench.baselines.promptsmooth import context_phrase
from calbench.certify import max_certifiable_radius, run_certify
from calbench.cli import certify_cmd
from calbench.methods import make_method
from calbench.randomized_smoothing import certify_from_counts

PS = "nhussein/promptsmooth"
CERTIFY = f"{PS} certify_promptsmooth_plip.py"
COOP_CFG = "KaiyangZhou/CoOp configs/trainers/CoOp/vit_b32_ep50.yaml"
PHRASES = {"kather": "An H&E image patch of", "pannuke": "An H&E image patch of"}
PHRASES["histopathology"] = "a histopathology slide showing"

#: (section, setting, value, "<repo> <path>:<line>") — the published line, read from the snapshot
PUBLISHED = [
    # `# args.load = ".../FewshotPromptSmooth/vit_b32_ep50_16shots/nctx5_cscFalse_ctpend/seed1/prompt_learner/model.pth.tar-50"`
    ("promptsmooth", "n_ctx", 5, f"{CERTIFY}:290"),
    ("promptsmooth", "shots", 16, f"{CERTIFY}:290"),
    ("promptsmooth", "epochs", 50, f"{COOP_CFG}:18"),  # `  MAX_EPOCH: 50`
    ("promptsmooth", "batch_size", 32, f"{COOP_CFG}:3"),  # `    BATCH_SIZE: 32`
    (
        "promptsmooth",
        "sigma",
        0.25,
        f"{PS} README.md:77",
    ),  # `python ./certify_promptsmooth_plip.py ... --sigma 0.25 ...`
    ("promptsmooth-zs", "sigma", 0.25, f"{PS} README.md:77"),
    ("promptsmooth-zs", "adapt_samples", 100, f"{CERTIFY}:101"),  # `        batch = image.repeat((100, 1, 1, 1))`
    ("promptsmooth-zs", "tta_steps", 1, f"{CERTIFY}:265"),  # `parser.add_argument('--tta_steps', default=1, ...`
    (
        "promptsmooth-zs",
        "tta_lr",
        5e-3,
        f"{CERTIFY}:263",
    ),  # `parser.add_argument('--lr', '--learning-rate', default=5e-3, ...`
    ("promptsmooth-zs", "init", "hand", f"{CERTIFY}:343"),  # `if args.dataset in ["kather", "PanNuke"]:`
    # lines 344-345 `    args.ctx_init = 'An_H&E_image_patch_of'` `    args.n_ctx = 5`, 347-348 the else branch, 4 words
    ("promptsmooth-zs", "ctx_init", PHRASES, f"{CERTIFY}:343"),
    ("certify", "n0", 100, f"{CERTIFY}:272"),  # `parser.add_argument("--N0", type=int, default=100)`
    ("certify", "n", 10000, f"{CERTIFY}:273"),  # `parser.add_argument("--N", type=int, default=10000, ...`
    ("certify", "alpha", 0.001, f"{CERTIFY}:274"),  # `parser.add_argument("--alpha", type=float, default=0.001, ...`
    ("certify", "subset", 500, f"{CERTIFY}:271"),  # `parser.add_argument("--n", type=int, default=500, ...`
    ("certify", "sigma", 0.25, f"{PS} README.md:77"),
]


@pytest.mark.parametrize(("section", "name", "value", "source"), PUBLISHED)
def test_each_promptsmooth_default_is_the_published_value_at_its_line(section, name, value, source):
    entry = published.setting(section, name)
    assert entry.value == value
    assert entry.source.split(" — ")[0] == source


def test_what_is_inferred_says_so_and_calbenchs_own_values_say_why():
    assert "inferred" in published.setting("promptsmooth", "batch_size").source  # the trainer is unpublished
    assert "certain" in published.setting("promptsmooth", "n_ctx").source  # the checkpoint path names it
    sigmas = published.setting("promptsmooth", "train_sigmas")
    assert sigmas.ours and sigmas.value == (0.25, 0.5, 1.0) and "inferred" in sigmas.source
    assert published.setting("promptsmooth", "n_samples").ours
    assert published.setting("promptsmooth-zs", "n_samples") == published.setting("promptsmooth", "n_samples")


def test_the_methods_are_built_with_the_published_values():
    cfg = make_method("promptsmooth").config
    assert (cfg.n_ctx, cfg.epochs, cfg.shots, cfg.batch_size, cfg.ctx_init) == (5, 50, 16, 32, None)
    zs = make_method("promptsmooth-zs")
    assert (zs.capabilities.adapt_copies.views, zs.tta_steps, zs.tta_lr, zs.sigma) == (100, 1, 5e-3, 0.25)
    assert dict(zs.ctx_init) == PHRASES


@pytest.mark.parametrize(
    ("dataset", "template", "phrase"),
    [
        ("kather", "An H&E image of {}.", "An H&E image patch of"),
        ("pannuke", "An H&E image patch of {} skin tissue.", "An H&E image patch of"),
        ("digestpath", "An H&E image patch of {} tissue.", "a histopathology slide showing"),
        ("covid", "A chest X-ray image of {} patient", "A chest X-ray image of"),  # no published phrase
        ("synthetic", "a histology tile showing {}.", "a histology tile showing"),
        ("my-folder", "an image of {}.", "an image of"),
    ],
)
def test_zero_shot_promptsmooth_starts_from_the_published_phrase(dataset, template, phrase):
    assert context_phrase(PHRASES, dataset, template) == phrase
    assert context_phrase("my own words", dataset, template) == "my own words"


def _fit(tiny, dataset):
    empty = torch.zeros(1, 0, tiny.embed_dim)
    return FitData(
        tiny,
        ["tumour", "stroma"],
        "An H&E image of {}.",
        empty,
        torch.zeros(0),
        empty[0],
        torch.zeros(0),
        1,
        dataset=dataset,
    )


@pytest.mark.parametrize(("dataset", "learned", "frozen"), [("kather", 5, "patch"), ("digestpath", 4, "thology")])
def test_the_published_number_of_words_learn_and_the_rest_of_the_phrase_stays_text(tiny, dataset, learned, frozen):
    """custom_plip.py:88 `n_ctx = len(ctx_init.split(" "))`, :92 `ctx_vectors = embedding[0, 1 : 1 + n_ctx, :]`:
    "An H&E image patch of" is 7 BPE tokens (an h & e image patch of), of which 5 learn; "a histopathology
    slide showing" is 7 (a hi stop a thology slide showing), of which 4 learn."""
    method = make_method("promptsmooth-zs").fit(_fit(tiny, dataset))
    learner, phrase = method.learner, PHRASES["kather" if dataset == "kather" else "histopathology"]
    tokens = tiny.tokenize([phrase])
    assert int(tokens.eot[0]) - tiny.prompt_prefix_len == 7 and learner.n_ctx == learned
    with torch.no_grad():
        embedded = tiny.embed_tokens(tokens.ids)[0]
        torch.testing.assert_close(learner.ctx, embedded[1 : 1 + learned].float())
        assert torch.equal(learner.token_suffix[0, 0], embedded[1 + learned])  # the next token stays frozen
        hand = tiny.encode_texts([f"{phrase} {name}." for name in ("tumour", "stroma")])
        torch.testing.assert_close(learner.text_features(), torch.nn.functional.normalize(hand.float(), dim=-1))
    assert tiny.tokenize([frozen]).ids[0, 1] == tokens.ids[0, 1 + learned]


def test_zero_shot_promptsmooth_takes_one_adamw_step_at_5e_3_per_image(tiny, monkeypatch):
    method = make_method("promptsmooth-zs").fit(_fit(tiny, "kather"))
    made, steps = [], []
    real = torch.optim.AdamW

    class Recording(real):
        def __init__(self, params, lr):
            made.append(lr)
            super().__init__(params, lr=lr)

        def step(self, closure=None):
            steps.append(1)
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    copies = torch.nn.functional.normalize(torch.randn(4, 3, tiny.embed_dim), dim=-1)
    method.adapt(copies)
    assert made == [5e-3] * 3 and len(steps) == 3  # a fresh optimiser and one step for each of 3 images


# --- certification ----------------------------------------------------------------------------


def test_certify_defaults_to_the_published_settings():
    given = inspect.signature(run_certify).parameters
    values = {name: given[name].default for name in ("sigma", "n", "n0", "alpha", "subset")}
    assert values == {"sigma": 0.25, "n": 10000, "n0": 100, "alpha": 0.001, "subset": 500}
    options = {o.default for o in (certify_cmd.NOpt, certify_cmd.N0Opt, certify_cmd.AlphaOpt, certify_cmd.SubsetOpt)}
    assert options == {10000, 100, 0.001, 500} and certify_cmd.SigmaOpt.default == 0.25


@pytest.mark.parametrize(
    ("n", "radius"), [(100, 0.3751187560301591), (1000, 0.6158156536952029), (10000, 0.7996443786845846)]
)
def test_a_small_n_caps_the_radius_as_the_help_says(n, radius):
    """With all n votes for the top class the one-sided Clopper-Pearson bound is Beta(0.001; n, 1) =
    0.001^(1/n) (certify_promptsmooth_plip.py:255 takes the two-sided bound at 2 alpha, the same number),
    and the radius 0.25 * Phi^-1 of it."""
    assert max_certifiable_radius(0.25, n, 0.001) == pytest.approx(radius, rel=1e-12)
    assert max_certifiable_radius(0.25, n, 0.001) == pytest.approx(0.25 * norm.ppf(0.001 ** (1 / n)), rel=1e-12)
    label, certified = certify_from_counts([0, 5], [0, n], 0.25, 0.001)
    assert label == 1 and certified == pytest.approx(radius, rel=1e-9)
    assert f"{radius:.3f} for n={n}" in certify_cmd.NOpt.help


def test_below_ten_samples_nothing_is_certified_at_alpha_0_001():
    assert max_certifiable_radius(0.25, 9, 0.001) == 0.0 and certify_from_counts([5], [9], 0.25, 0.001) == (-1, 0.0)
    assert max_certifiable_radius(0.25, 10, 0.001) > 0 and "below n=10 nothing is certified" in certify_cmd.NOpt.help
