"""Nothing shared across splits, roles or run seeds: every random view's seed names its split, its
role and (training views) the run seed, so no noise a method trained or tuned on is reused to
score or certify it, and run seeds are independent replicates. Training caches one augmented
view per epoch by default."""

from __future__ import annotations

import hashlib
import shutil
import zlib

import numpy as np
import pytest
import torch
from training import train_prompt_learner

import calbench.data.transforms as transforms
from calbench.base import VAL_ADAPT, VAL_COPIES, FeatureRequest, fit_requests
from calbench.baselines.promptsmooth import NOISY_VIEWS
from calbench.cache import FeatureCache
from calbench.certify import base_votes
from calbench.data import load_dataset
from calbench.data.transforms import augment_seed, draw_noise, noise_kind, noise_seed, parse_noise_kind, to_tensor
from calbench.losses import Objective, Term
from calbench.methods import make_method
from calbench.prompts import PromptLearner
from calbench.randomized_smoothing import smoothed_proba
from calbench.session import FewShot, RunContext, Session, train_views
from calbench.train import TrainConfig

FEW = FewShot(shots=2, val_shots=1, views=2)


def sampled_sigma(kind: str, split: str, view: int, index: int, seed: int | None = None) -> float:
    """The noise level view ``view`` of image ``index`` got: the kind's one level, or its draw from the set."""
    noise = parse_noise_kind(kind)
    if noise is None:
        raise ValueError(f"{kind!r} is not a noise kind")
    return draw_noise((0,), noise, noise_seed(kind, split, view, index, seed))[0]


@pytest.fixture()
def mini(synthetic, tmp_path):
    """The first two classes of the synthetic set, 4 training and 2 test images each: cheap to encode from scratch."""
    root = tmp_path / "mini"
    names = sorted(p.name for p in (synthetic.root / "images" / "train").iterdir())[:2]
    for split, count in (("train", 4), ("test", 2)):
        for name in names:
            folder = root / "images" / split / name
            folder.mkdir(parents=True)
            for file in sorted((synthetic.root / "images" / split / name).iterdir())[:count]:
                shutil.copy(file, folder / file.name)
    lines = (synthetic.root / "classnames.txt").read_text().splitlines()
    (root / "classnames.txt").write_text("".join(f"{line}\n" for line in lines if line.split()[0] in names))
    return root


def _session(root, tmp_path):
    return Session("tiny", str(root), RunContext(device="cpu", cache_dir=tmp_path / "cache"))


# --- the seed words ---------------------------------------------------------------------------


def test_seed_words_name_the_split_the_role_the_run_seed_the_view_the_image_and_the_noise_level():
    # [stream, split (train pool 0, test 1), role (train, score, adapt, select, estimate), run seed, view, image, sigma(s)]
    assert noise_seed("score-noise0.25", "test", 2, 7) == [1, 1, 1, 0, 2, 7, zlib.crc32(b"0.25")]
    assert noise_seed("score-noise0.25", "train", 2, 7) == [1, 0, 1, 0, 2, 7, zlib.crc32(b"0.25")]
    assert noise_seed("adapt-noise0.25", "test", 2, 7)[2] == 2
    assert noise_seed("select-noise0.25", "test", 2, 7)[2] == 3
    assert noise_seed("estimate-noise0.25", "test", 2, 7)[2] == 4
    mixed = noise_seed("train-noise0.25+0.5+1", "train", 2, 7, seed=3)
    assert mixed == [1, 0, 0, 3, 2, 7, zlib.crc32(b"0.25,0.5,1.0")]
    assert augment_seed("train", 3, 2, 7) == [0, 0, 3, 2, 7]  # stream 0: crops never share numbers with noise
    # numpy pads short seeds with zeros ([a, b] draws as [a, b, 0]): the words have a fixed length
    assert len({len(noise_seed(k, "test", 0, 0)) for k in ("score-noise1", "estimate-noise0.5")}) == 1


def test_training_views_need_the_run_seed_and_evaluation_views_refuse_one(tiny, synthetic):
    cfg, image = tiny.preprocess, synthetic.load_image("train", 0)
    for kind in ("train", "train-noise0.25"):
        with pytest.raises(ValueError, match="run seed"):
            to_tensor(image, kind, cfg, 0, 0, "train")
    for kind in ("eval", "score-noise0.25"):
        with pytest.raises(ValueError, match="every run"):
            to_tensor(image, kind, cfg, 0, 0, "train", seed=1)
    with pytest.raises(ValueError, match="split"):
        to_tensor(image, "score-noise0.25", cfg, 0, 0, "val")


def _noise(image, kind, cfg, split, view=0, index=3, seed=None):
    """The pixel noise of one view: the noisy view minus the same geometry without noise."""
    clean = "train" if kind.startswith("train-") else "eval"
    std, mean = torch.tensor(cfg.std)[:, None, None], torch.tensor(cfg.mean)[:, None, None]
    noisy = to_tensor(image, kind, cfg, view, index, split, seed) * std + mean
    plain = to_tensor(image, clean, cfg, view, index, split, seed if clean == "train" else None) * std + mean
    return (noisy - plain).flatten()


def _uncorrelated(a, b):
    return not torch.equal(a, b) and abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.1


def test_test_image_i_never_gets_the_noise_training_image_i_got(tiny, synthetic):
    """The old seeds were (view, index, sigma): test image 3's copy 0 was training image 3's view 0."""
    cfg, image = tiny.preprocess, synthetic.load_image("test", 3)  # one picture, so only the noise differs
    train = _noise(image, "train-noise0.25", cfg, "train", seed=1)
    for role in ("score", "adapt", "select", "estimate"):
        assert _uncorrelated(train, _noise(image, noise_kind(0.25, role), cfg, "test"))
    # validation copies (train pool) and test copies of image 3 are different draws too
    assert _uncorrelated(_noise(image, "score-noise0.25", cfg, "train"), _noise(image, "score-noise0.25", cfg, "test"))


def test_every_role_draws_its_own_noise(tiny, synthetic):
    cfg, image = tiny.preprocess, synthetic.load_image("test", 3)
    noises = {
        role: _noise(image, noise_kind(0.5, role), cfg, "test") for role in ("score", "adapt", "select", "estimate")
    }
    for a in noises:
        for b in noises:
            if a < b:
                assert _uncorrelated(noises[a], noises[b]), (a, b)


def test_each_training_view_draws_its_sigma_from_the_set(tiny, synthetic):
    cfg, image = tiny.preprocess, synthetic.load_image("train", 0)
    kind = "train-noise0.25+0.5+1"
    drawn = [sampled_sigma(kind, "train", view, index, seed=1) for view in range(20) for index in range(10)]
    assert set(drawn) == {0.25, 0.5, 1.0} and max(drawn.count(s) for s in set(drawn)) < 100  # per (view, image)
    assert drawn != [sampled_sigma(kind, "train", v, i, seed=2) for v in range(20) for i in range(10)]
    for view in range(3):  # the pixels carry the drawn level
        sigma = sampled_sigma(kind, "train", view, 0, seed=1)
        assert float(_noise(image, kind, cfg, "train", view, 0, seed=1).std()) == pytest.approx(sigma, rel=0.05)


# --- nothing a method trained or tuned on is scored ---------------------------------------------


def test_no_noise_used_in_scoring_or_certifying_was_used_in_training_or_tuning(mini, tmp_path, monkeypatch):
    draws: dict[tuple[int, str], set[str]] = {}
    real = transforms.draw_noise

    def spy(shape, noise, words):
        sigma, draw = real(shape, noise, words)
        draws.setdefault((words[1], noise.role), set()).add(hashlib.sha1(draw.tobytes()).hexdigest())
        return sigma, draw

    monkeypatch.setattr(transforms, "draw_noise", spy)
    session = _session(mini, tmp_path)
    method = make_method("promptsmooth-zs", init="fewshot", epochs=2, n_samples=3, adapt_samples=2, sigma=0.5)
    method.fit(session.fit_data(1, FEW, method, score_val=True))
    session.test_features(method)
    base_votes(session, method, np.arange(4), 0.5, n0=3, n=5)
    train, test = 0, 1
    counts = {key: len(hashes) for key, hashes in draws.items()}
    assert counts == {
        (train, "train"): 4 * 2,  # 2 classes x 2 shots x 2 views (one per epoch)
        (train, "adapt"): 2 * 2,  # 2 validation images x 2 copies
        (train, "score"): 2 * 3,
        (test, "adapt"): 4 * 2,
        (test, "score"): 4 * 3,
        (test, "select"): 4 * 3,
        (test, "estimate"): 4 * 5,
    }
    seen: set[str] = set()
    for hashes in draws.values():
        assert not seen & hashes  # no two uses share a noise tensor
        seen |= hashes


def test_the_session_refuses_a_role_that_does_not_suit_the_images(mini, tmp_path):
    session = _session(mini, tmp_path)
    with pytest.raises(ValueError, match="test images may not take transform kind 'train-noise0.25'"):
        session.test_views("train-noise0.25", range(1))
    with pytest.raises(ValueError, match="test images may not take transform kind 'train'"):
        session.test_views("train", range(1))

    class ValTraining:
        capabilities = make_method("coop-ce").capabilities.__class__(
            fit_features={"x": FeatureRequest("val", "train-noise0.25")}
        )

    with pytest.raises(ValueError, match="val images may not take"):
        session.fit_data(1, FEW, ValTraining())


def test_compare_tunes_promptsmooth_zs_on_copies_it_is_not_scored_on(mini, tmp_path):
    session = _session(mini, tmp_path)
    method = make_method("promptsmooth-zs", n_samples=3, adapt_samples=2)
    caps = method.capabilities
    assert (caps.adapt_copies.kind, caps.test_copies.kind) == ("adapt-noise0.25", "score-noise0.25")
    fit = session.fit_data(1, FEW, method, score_val=True)
    method.fit(fit)
    inputs = session.test_features(method)
    assert inputs.shape[:2] == (2 + 3, 4)
    torch.testing.assert_close(inputs[:2], session.test_views("adapt-noise0.25", range(2)))
    torch.testing.assert_close(inputs[2:], session.test_views("score-noise0.25", range(3)))
    with torch.no_grad():
        torch.testing.assert_close(method.predict_proba(inputs), smoothed_proba(method.adapt(inputs[:2])(inputs[2:])))
    # a calibrator on top is fitted the same way on the validation images
    assert set(fit_requests(method, score_val=True)) == {VAL_COPIES, VAL_ADAPT}
    torch.testing.assert_close(fit.val_inputs(method), torch.cat([fit.extra[VAL_ADAPT], fit.extra[VAL_COPIES]]))


def test_certify_tunes_selects_and_estimates_on_three_draws(mini, tmp_path, monkeypatch):
    session = _session(mini, tmp_path)
    method = make_method("promptsmooth-zs", sigma=0.5, n_samples=3, adapt_samples=2)
    method.fit(session.fit_data(1, FEW, method))
    kinds = []
    real = session.test_views
    monkeypatch.setattr(
        session, "test_views", lambda kind, views, indices=None: kinds.append(kind) or real(kind, views, indices)
    )
    selection, estimation = base_votes(session, method, np.arange(4), 0.5, n0=3, n=5)
    assert (selection.shape, estimation.shape) == ((3, 4), (5, 4))
    assert kinds == ["adapt-noise0.5", "select-noise0.5", "estimate-noise0.5"]


# --- run seeds are independent replicates -------------------------------------------------------


def test_two_run_seeds_see_different_crops_of_a_shared_image(tiny, mini, tmp_path):
    dataset = load_dataset(str(mini), cache_dir=tmp_path)
    cache = FeatureCache(tmp_path / "c", tiny, progress=False)
    one, two = (cache.features(dataset, "train", [0, 1], kind="train", views=range(2), seed=s) for s in (1, 2))
    assert not torch.allclose(one, two)
    again = FeatureCache(tmp_path / "other", tiny, progress=False).features(dataset, "train", [1], "train", [1], seed=2)
    torch.testing.assert_close(again[0, 0], two[1, 1], atol=1e-6, rtol=0)  # a function of (seed, view, image)
    names = sorted(p.name for p in (tmp_path / "c" / "features").glob("*.safetensors"))
    assert [n.split("-")[3] for n in names].count("seed1") == 2 and len(names) == 4  # the seed is in the key
    with pytest.raises(ValueError, match="needs the run seed"):
        cache.features(dataset, "train", [0], kind="train")
    with pytest.raises(ValueError, match="same for every run"):
        cache.features(dataset, "train", [0], kind="eval", seed=1)


def test_fit_data_of_two_seeds_draws_a_shared_images_views_apart(mini, tmp_path):
    session = _session(mini, tmp_path)
    (train1, _), (train2, _) = session.split(1, FEW), session.split(2, FEW)
    shared = sorted(set(train1) & set(train2))
    assert shared  # 2 of 4 images per class: the two seeds share at least one
    image = shared[0]
    a = session.fit_data(1, FEW).train_features[:, list(train1).index(image)]
    b = session.fit_data(2, FEW).train_features[:, list(train2).index(image)]
    assert a.shape[0] == b.shape[0] == 2  # views of one image
    assert not torch.allclose(a, b)


# --- one cached view per epoch ------------------------------------------------------------------


def test_views_default_to_one_per_epoch_of_the_method():
    assert FewShot().views is None
    assert train_views(FewShot(), make_method("coop-ce")) == TrainConfig().epochs == 50
    assert train_views(FewShot(), make_method("coop-ce", epochs=3)) == 3
    assert train_views(FewShot(), make_method("promptsmooth", epochs=7)) == 7
    assert train_views(FewShot(), make_method("zero-shot")) == 1  # trains nothing
    assert train_views(FewShot(), make_method("coop-ce+ts")) == 50
    assert train_views(FewShot(), None) == TrainConfig.epochs
    assert train_views(FewShot(views=4), make_method("coop-ce")) == 4  # --views trades crops for encodings


def test_fit_data_caches_one_view_per_epoch_unless_views_says_fewer(mini, tmp_path):
    session = _session(mini, tmp_path)
    every = FewShot(shots=2, val_shots=1)
    assert session.fit_data(1, every, make_method("coop-ce", epochs=3)).train_features.shape[0] == 3
    smooth = make_method("promptsmooth", epochs=3, n_samples=1)
    assert session.fit_data(1, every, smooth).extra[NOISY_VIEWS].shape[0] == 3
    assert session.fit_data(1, FEW, smooth).extra[NOISY_VIEWS].shape[0] == 2


class _Views(Objective):
    """Cross-entropy that records each step's logits."""

    def __init__(self) -> None:
        super().__init__({"ce": Term("cross_entropy")})
        object.__setattr__(self, "seen", [])

    def __call__(self, **inputs):
        self.seen.append(inputs["logits"].detach().clone())
        return super().__call__(**inputs)


def test_the_trainer_reads_view_e_mod_v_in_epoch_e(tiny):
    learner = PromptLearner(tiny, ["a", "b"], n_ctx=2, seed=0)
    dim = tiny.embed_dim
    views = torch.eye(dim)[:3, None, :].repeat(1, 4, 1)  # view v: every image is the unit vector e_v
    objective = _Views()
    cfg = TrainConfig(epochs=5, batch_size=4, lr=1e-9, warmup_lr=1e-9)  # the prompt stays put
    train_prompt_learner(learner, objective, views, torch.tensor([0, 1, 0, 1]), cfg, seed=1)
    with torch.no_grad():
        per_view = [tiny.logit_scale * views[v, 0] @ learner.text_features().T for v in range(3)]
    used = [min(range(3), key=lambda v: float((logits[0] - per_view[v]).abs().max())) for logits in objective.seen]
    assert used == [0, 1, 2, 0, 1]


# --- one stream per (role, run seed) -------------------------------------------------------------


def test_stream_words_keep_roles_apart_and_are_not_padded_into_each_other():
    from calbench import streams

    first = {role: streams.rng(role, 7).integers(0, 2**62, size=4).tolist() for role in streams.ROLES}
    assert len({tuple(v) for v in first.values()}) == len(streams.ROLES)
    # numpy pads short entropy with zeros: default_rng([7, 0]) is default_rng(7); the value count keeps them apart
    assert np.random.default_rng([7, 0]).random() == np.random.default_rng(7).random()
    assert streams.rng("conformal", 7, 0).random() != streams.rng("conformal", 7).random()
    assert streams.rng("certify-subset", 0).random() != np.random.default_rng(7).random()
    assert streams.torch_seed("context-init", 1) != streams.torch_seed("batch-order", 1)
    with pytest.raises(ValueError, match="unknown random stream"):
        streams.rng("shuffle", 1)


def test_context_init_and_batch_order_draw_from_streams_of_their_own(tiny):
    """Before, both were torch.Generator().manual_seed(seed): the context's N(0, 1) draws and the first
    epoch's permutation came from one sequence."""
    from calbench import streams
    from calbench.train import TrainRun, _Progress

    learner = PromptLearner(tiny, ["a", "b", "c"], n_ctx=4, seed=3)
    shared = torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(3)) * 0.02
    own = torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(streams.torch_seed("context-init", 3)))
    assert not torch.allclose(learner.ctx.detach(), shared)
    torch.testing.assert_close(learner.ctx.detach(), own * 0.02)
    run = TrainRun(
        learner, Objective({"ce": Term("cross_entropy")}), torch.zeros(1, 6, 8), torch.arange(6) % 3, TrainConfig(), 3
    )
    assert _Progress(run).generator.initial_seed() == streams.torch_seed("batch-order", 3)


def test_few_shot_split_and_bootstrap_draw_from_streams_of_their_own(monkeypatch):
    """Before, both were default_rng(seed): the split's permutations and the bootstrap's resamples were one sequence."""
    from calbench import streams
    from calbench.data.folder import few_shot_split
    from calbench.metrics import bootstrap_ece

    labels = np.repeat(np.arange(3), 10)
    train, val = few_shot_split(labels, 2, 2, seed=5)
    rng, expect = streams.rng("fewshot-split", 5), []
    for c in range(3):
        expect.append(rng.permutation(np.flatnonzero(labels == c))[:4])
    assert [sorted(e) for e in expect] == [
        sorted([*train[2 * c : 2 * c + 2], *val[2 * c : 2 * c + 2]]) for c in range(3)
    ]
    old = np.random.default_rng(5)
    assert [sorted(old.permutation(np.flatnonzero(labels == c))[:4]) for c in range(3)] != [sorted(e) for e in expect]
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=30)
    asked = []
    real = streams.rng
    monkeypatch.setattr(streams, "rng", lambda role, *values: asked.append((role, *values)) or real(role, *values))
    bootstrap_ece(probs, labels, 20, seed=5)
    assert asked == [("bootstrap", 5)]
