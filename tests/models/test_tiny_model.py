"""The shipped ``tiny`` model: the file is what `python -m calbench.models.train_tiny` writes (config hash and
seed in its metadata, a deterministic script), it loads offline, and its zero-shot accuracy on the demo is pinned."""

from dataclasses import replace

import pytest
import torch

from calbench.models import load_vlm
from calbench.models.open_clip_backend import shipped_config
from calbench.models.tiny import EMBEDDING, pack, shipped_weights, unpack
from calbench.models.train_tiny import PretrainConfig, config_hash, corpus_tile, shipped, train
from calbench.tissue import FRAMES

#: a few steps on a few tiles: enough to check determinism, not a re-run
SMOKE = replace(PretrainConfig(), images=48, steps=3, batch_size=16, warmup_steps=1)
#: zero-shot on the demo's test split with the shipped weights (900 tiles; measured with torch 2.14.1 on CPU)
ZERO_SHOT_ACCURACY = 0.6722
ZERO_SHOT_ECE = 0.2975


def shipped_metadata() -> dict[str, str]:
    """The shipped file's metadata: config hash, training seed, final logit scale, library versions."""
    from safetensors import safe_open

    with safe_open(str(shipped_weights()), framework="pt") as f:
        return dict(f.metadata() or {})


@pytest.fixture(scope="module")
def smoke_state():
    return train(SMOKE)


def test_the_shipped_file_records_the_scripts_config_and_seed():
    meta = shipped_metadata()
    assert meta["config_hash"] == config_hash(PretrainConfig())
    assert meta["seed"] == str(PretrainConfig().seed) and meta["threads"] == str(PretrainConfig().threads)
    assert float(meta["logit_scale"]) == PretrainConfig().shipped_scale == 100.0
    assert 20 < float(meta["learned_logit_scale"]) < 30  # what pre-training learned; see shipped()
    assert shipped_weights().stat().st_size < 6_000_000  # a few MB, shipped inside the package


def test_the_hash_changes_with_the_seed_the_settings_and_the_architecture():
    base = config_hash(PretrainConfig())
    assert config_hash(replace(PretrainConfig(), seed=1)) != base
    assert config_hash(replace(PretrainConfig(), steps=10)) != base
    wider = shipped_config("tiny")
    wider["embed_dim"] = 2 * wider["embed_dim"]
    assert config_hash(PretrainConfig(), wider) != base


def test_pretraining_is_deterministic_and_learns_only_the_corpus_tokens(smoke_state):
    first, last = smoke_state
    again, _ = train(SMOKE)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other, _ = train(replace(SMOKE, seed=1))
    assert not torch.equal(other["visual.conv1.weight"], first["visual.conv1.weight"])
    assert torch.isfinite(torch.tensor(last["loss"])) and 0 < last["logit_scale"] <= 100
    used = int((first[EMBEDDING].abs().sum(dim=1) > 0).sum())
    assert 10 < used < 120  # the words and framings of the captions (the full corpus: 84 tokens); other rows zero


def test_corpus_tiles_are_seeded_per_item():
    (pixels, text), (again, same), (other, _) = corpus_tile(SMOKE, 5), corpus_tile(SMOKE, 5), corpus_tile(SMOKE, 6)
    assert (pixels == again).all() and text == same and pixels.shape == (64, 64, 3)
    assert text.startswith(FRAMES) and text.endswith(".") and "nuclei" in text
    assert not (other == pixels).all()


def test_pack_keeps_the_trained_rows_and_unpack_restores_the_full_table(smoke_state):
    state, _ = smoke_state
    packed = pack(state)
    assert EMBEDDING not in packed
    restored = unpack(packed, state[EMBEDDING].shape[0])
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    assert unpack(state, 7) is state  # a full state dict is left alone


def test_the_shipped_model_loads_offline_at_its_shipped_logit_scale(tiny):
    assert tiny.name == "tiny"
    assert tiny.logit_scale == pytest.approx(100.0, rel=1e-6)
    again = load_vlm("tiny", weights=shipped_weights())  # the packed file also loads through --weights
    assert again.fingerprint == tiny.fingerprint


def test_shipping_sets_the_logit_scale_and_nothing_else(smoke_state):
    state, last = smoke_state
    out = shipped(state, PretrainConfig())
    assert float(out["logit_scale"].exp()) == pytest.approx(100.0, rel=1e-6)
    assert float(state["logit_scale"].exp()) == pytest.approx(last["logit_scale"], rel=1e-6)  # the input is kept
    assert all(torch.equal(out[k], state[k]) for k in state if k != "logit_scale")


def test_every_token_of_the_demo_prompts_was_trained(tiny, synthetic):
    ids = tiny.tokenize([synthetic.template.format(name) for name in synthetic.classnames]).ids
    rows = tiny.model.token_embedding.weight[ids.flatten()]
    assert bool((rows.abs().sum(dim=1) > 0).all())  # zero-shot never reads an untrained (zero) row


@pytest.mark.e2e
def test_zero_shot_accuracy_on_the_demo_test_split(session):
    from calbench.methods import make_method
    from calbench.metrics import evaluate

    method = make_method("zero-shot")
    method.fit(session.fit_data(seed=1, method=method))
    with torch.no_grad():
        probs = method.predict_proba(session.test_features(method))
    scores = evaluate(probs.double().numpy(), session.test_labels)
    # pinned from the shipped weights; the tolerance allows for other BLAS builds, not other weights
    assert scores["accuracy"] == pytest.approx(ZERO_SHOT_ACCURACY, abs=0.01)
    assert scores["ece"] == pytest.approx(ZERO_SHOT_ECE, abs=0.01)
