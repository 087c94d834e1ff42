"""The shared prompt start run once per learner (calbench.models.shared_prefix) equals the full pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from calbench.models.base import PreprocessConfig, can_share_prefix
from calbench.models.shared_prefix import suffix_mask
from calbench.prompts import PromptLearner, text_features_together

CLASSES = ["tumor", "stroma", "immune cells", "debris"]


@pytest.fixture(scope="module")
def vlm():
    from calbench.models import load_vlm

    return load_vlm("tiny-random", device="cpu")


@pytest.fixture(scope="module")
def hf_vlm():
    """A small transformers CLIPModel (PLIP's format) with random weights."""
    from transformers import CLIPConfig, CLIPModel

    from calbench.models.hf_clip_backend import HFClipBackend

    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(layers, max_position_embeddings=77),
        vision_config=dict(layers, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    return HFClipBackend("plip", CLIPModel(config), PreprocessConfig(size=32), torch.device("cpu"))


def _full(learner: PromptLearner) -> torch.Tensor:
    """The old path: every prompt whole through the tower."""
    return F.normalize(learner.vlm.encode_embeddings(learner.embeddings(), learner.tokens).float(), dim=-1)


def _record(monkeypatch: pytest.MonkeyPatch, vlm) -> list[tuple[int, ...]]:
    """Make the full pass fail and record the (prefix, suffix) shapes the shared pass gets."""
    shapes: list[tuple[int, ...]] = []
    shared = vlm.encode_shared_prefix

    def recording(prefix, suffix, owner, tokens):
        shapes.append((*prefix.shape[:2], *suffix.shape[:2]))
        return shared(prefix, suffix, owner, tokens)

    def refuse(*args):
        raise AssertionError("the full pass ran")

    monkeypatch.setattr(vlm, "encode_shared_prefix", recording)
    monkeypatch.setattr(vlm, "encode_embeddings", refuse)
    return shapes


def test_the_mask_lets_a_suffix_see_the_prefix_and_its_own_past():
    assert suffix_mask(2, 3, torch.device("cpu")).int().tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]


@pytest.mark.parametrize("backend", ["vlm", "hf_vlm"])
def test_one_learner_equals_the_full_pass_features_and_gradients(backend, request, monkeypatch):
    vlm = request.getfixturevalue(backend)
    learner = PromptLearner(vlm, CLASSES, n_ctx=4, seed=0)
    assert learner.shared_len == 5  # [SOS] + 4 context tokens; the class names start differently
    weights = torch.randn(len(CLASSES), vlm.embed_dim, generator=torch.Generator().manual_seed(1))

    full = _full(learner)
    (expected,) = torch.autograd.grad((full * weights).sum(), learner.ctx)
    shapes = _record(monkeypatch, vlm)
    shared = learner.text_features()
    (grad,) = torch.autograd.grad((shared * weights).sum(), learner.ctx)

    length = learner.tokens.ids.shape[1]
    assert shapes == [(1, 5, len(CLASSES), length - 5)]  # 5 + 4 (L - 5) tokens, not 4 L
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert expected.abs().max() > 1e-4  # the gradient reaches the context


def test_learners_in_one_pass_equal_their_full_passes(vlm, monkeypatch):
    # the first learner's classes also share their first word, so its start is one token longer: the
    # pass shares the shorter start of all learners
    learners = [
        PromptLearner(vlm, ["normal colon", "normal stomach"], n_ctx=4, seed=1),
        PromptLearner(vlm, ["tumor colon", "debris stomach"], n_ctx=4, seed=2),
        PromptLearner(vlm, ["tumor colon", "debris stomach"], ctx_init="a photo of a", learned=4),
    ]
    assert [learner.shared_len for learner in learners] == [6, 5, 5]
    weights = torch.randn(2, vlm.embed_dim, generator=torch.Generator().manual_seed(2))
    full = [_full(learner) for learner in learners]
    expected = torch.autograd.grad(sum((f * weights).sum() for f in full), [lr.ctx for lr in learners])

    shapes = _record(monkeypatch, vlm)
    shared = text_features_together(learners)
    grads = torch.autograd.grad(sum((f * weights).sum() for f in shared), [lr.ctx for lr in learners])

    assert shapes == [(3, 5, 6, learners[0].tokens.ids.shape[1] - 5)]
    for ours, theirs in zip(shared, full):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    for ours, theirs in zip(grads, expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * float(theirs.abs().max()))


def test_frozen_words_common_to_every_class_join_the_start(vlm):
    # "a photo of a" with two learned tokens: the other two words are frozen but the same in every prompt
    learner = PromptLearner(vlm, CLASSES, ctx_init="a photo of a", learned=2)
    assert (learner.n_ctx, learner.shared_len) == (2, 5)
    torch.testing.assert_close(learner.text_features(), _full(learner), rtol=0, atol=1e-5)


def test_class_specific_context_takes_the_full_pass(vlm, monkeypatch):
    learner = PromptLearner(vlm, CLASSES, n_ctx=4, class_specific=True, seed=0)
    assert learner.shared_len is None

    def refuse(*args):
        raise AssertionError("the shared pass ran")

    monkeypatch.setattr(vlm, "encode_shared_prefix", refuse)
    features = learner.text_features()
    torch.testing.assert_close(features, _full(learner), rtol=0, atol=0)
    # one learner that cannot share sends the whole pass the old way
    text_features_together([PromptLearner(vlm, CLASSES, n_ctx=4, seed=1), learner])


def test_a_bert_tower_takes_the_full_pass(tmp_path: Path):
    from transformers import BertConfig, BertTokenizerFast

    from calbench.models.open_clip_backend import OpenClipBertBackend

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "x", ".", "tumor", "stroma", "immune", "cells", "debris"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ).save_pretrained(tmp_path / "text")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {
            "hf_model_name": str(tmp_path / "text"),
            "hf_model_pretrained": False,
            "hf_proj_type": "linear",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 64,
        },
    }
    tokenizer = BertTokenizerFast.from_pretrained(str(tmp_path))
    bert = OpenClipBertBackend.from_config("bert", config, torch.device("cpu"), tokenizer=tokenizer, context_length=64)
    assert not can_share_prefix(bert)
    learner = PromptLearner(bert, CLASSES, n_ctx=4, seed=0)
    assert learner.shared_len is None
    torch.testing.assert_close(learner.text_features(), _full(learner), rtol=0, atol=0)


def test_causal_towers_offer_prefix_sharing(vlm, hf_vlm):
    assert can_share_prefix(vlm) and can_share_prefix(hf_vlm)
    assert not can_share_prefix(object())


def test_tokens_past_each_eot_are_never_computed(vlm):
    """Shorter class names leave padding after their EOT in the cut prompts; those rows are dropped, so no
    block computes them (each MLP sees the prefix and the real suffix tokens only), and not even a NaN there
    reaches a feature."""
    learner = PromptLearner(vlm, CLASSES, n_ctx=4, seed=0)
    start, eot = learner.shared_len, learner.tokens.eot
    assert start == 5 and len(set(eot.tolist())) > 1  # names of different lengths: padding in the grid
    embeddings = learner.embeddings().detach()
    prefix, suffix = embeddings[:1, :start], embeddings[:, start:].clone()
    owner = torch.zeros(len(CLASSES), dtype=torch.long)
    clean = vlm.encode_shared_prefix(prefix, suffix, owner, learner.tokens)

    rows: list[int] = []
    hooks = [
        b.mlp.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0])) for b in vlm.model.transformer.resblocks
    ]
    past = torch.arange(suffix.shape[1]) > (eot - start).unsqueeze(1)
    suffix[past] = float("nan")
    try:
        poisoned = vlm.encode_shared_prefix(prefix, suffix, owner, learner.tokens)
    finally:
        for hook in hooks:
            hook.remove()
    real = start + int((eot - start + 1).sum())
    assert rows == [real] * len(vlm.model.transformer.resblocks) and real < start + suffix.shape[0] * suffix.shape[1]
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)
