"""MedCLIP and BiomedCLIP as the published CalibPrompt code runs them, and calbench's own variants.

Each feature is computed here by hand, step by step as the published code does it, with the
replica's own modules (``tests/models/test_backends.py``), and compared with the prompt learner's.
Published code: iabh1shekbasu/CalibPrompt at commit c6ec13e.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_backends import CLASSNAMES, HAND, _biomedclip, _medclip

from calbench.errors import CalbenchWarning
from calbench.models import MODELS, availability, load_vlm
from calbench.models.medclip import medclip_config
from calbench.prompts import PromptLearner

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEDCLIP_MEAN = (0.5862785803043838,) * 3
MEDCLIP_STD = (0.27950088968644304,) * 3


@pytest.fixture(scope="module")
def medclip_folder(tmp_path_factory):
    return _medclip(tmp_path_factory.mktemp("medclip"))[0]


@pytest.fixture(scope="module")
def biomedclip_folder(tmp_path_factory):
    return _biomedclip(tmp_path_factory.mktemp("biomedclip"))[0]


def _medclip_by_hand(vlm, learner, padding: bool) -> torch.Tensor:
    """coop_medclip.py:90 tokenises (padded to 25, or unpadded), :95 takes word embeddings, :122-129 puts
    the context after [CLS], :144 runs BERT on them, :152-153 averages hidden states 1, 2 and last over
    every position (``padding``) or, as calbench's masked variant, over the real tokens only."""
    tokenizer, text = vlm.tokenizer, vlm.model.text_model
    if padding:
        enc = tokenizer(learner.prompts, padding="max_length", max_length=25, truncation=True, return_tensors="pt")
    else:
        enc = tokenizer(learner.prompts, padding=True, return_tensors="pt")
    words = text.model.embeddings.word_embeddings(enc["input_ids"])
    n_ctx, classes = learner.n_ctx, len(learner.classnames)
    prompts = torch.cat([words[:, :1], learner.ctx.expand(classes, -1, -1), words[:, 1 + n_ctx :]], dim=1)
    out = text.model(inputs_embeds=prompts, attention_mask=enc["attention_mask"], output_hidden_states=True)
    hidden = torch.stack([out.hidden_states[1], out.hidden_states[2], out.hidden_states[-1]])  # layer, class, pos, dim
    if padding:
        embed = hidden.permute(1, 0, 2, 3).mean(2).mean(1)
    else:
        mask = enc["attention_mask"][None, :, :, None].float()
        embed = ((hidden * mask).sum(2) / mask.sum(2)).mean(0)
    return F.normalize(text.projection_head(embed), dim=-1)


def test_medclip_averages_all_25_positions_padding_included(medclip_folder):
    """Default ``medclip``: prompts padded to 25 tokens (coop_medclip.py:90) and the tower's output
    averaged over all 25 positions, [PAD] included (coop_medclip.py:152-153)."""
    vlm = load_vlm("medclip", weights=medclip_folder)
    assert vlm.context_length == 25 and vlm.text_pooling == "all_positions"
    learner = PromptLearner(vlm, CLASSNAMES, n_ctx=16, seed=0)
    assert learner.tokens.ids.shape == (len(CLASSNAMES), 25)
    with torch.no_grad():
        ours = learner.text_features()
        torch.testing.assert_close(ours, _medclip_by_hand(vlm, learner, padding=True), atol=1e-6, rtol=0)
        # the padding really enters: the masked mean is a different feature
        assert (ours - _medclip_by_hand(vlm, learner, padding=False)).abs().max() > 1e-3


def test_medclip_masked_averages_the_real_tokens_only(medclip_folder):
    """``medclip-masked``: the same context and tower, the mean over [CLS] .. [SEP] only; prompts are
    cut to the longest one, which masked padding cannot change."""
    vlm = load_vlm("medclip-masked", weights=medclip_folder)
    assert vlm.text_pooling == "real_tokens"
    learner = PromptLearner(vlm, CLASSNAMES, n_ctx=16, seed=0)
    assert learner.tokens.ids.shape[1] == int(learner.tokens.eot.max()) + 1 < 25
    with torch.no_grad():
        torch.testing.assert_close(
            learner.text_features(), _medclip_by_hand(vlm, learner, padding=False), atol=1e-6, rtol=0
        )


def test_medclip_zero_shot_is_the_published_zero_shot_forward(medclip_folder):
    """Hand prompts through token ids: zsclip.py:76-82 pads to 25, :87-96 pools every position."""
    vlm = load_vlm("medclip", weights=medclip_folder)
    texts = [f"{HAND} {c}." for c in CLASSNAMES]
    enc = vlm.tokenizer(texts, padding="max_length", max_length=25, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = vlm.model.text_model.model(**enc, output_hidden_states=True).hidden_states
        embed = torch.stack([out[1], out[2], out[-1]]).permute(1, 0, 2, 3).mean(2).mean(1)
        expected = F.normalize(vlm.model.text_model.projection_head(embed), dim=-1)
        torch.testing.assert_close(vlm.encode_texts(texts), expected, atol=1e-6, rtol=0)


def test_medclip_pixels_and_logit_scale_as_published_and_as_medclip_own(medclip_folder):
    """CLIP's mean/std (configs/trainers/CoOp_MedCLIP/vit_b32_medclip_c16_ep50_batch16.yaml:11-12) and the
    unclamped exp(log-scale) (coop_medclip.py:258) by default; MedCLIP's own mean/std
    (models/medclip/constants.py:8-9) and clamp to ln 100 (models/medclip/modeling_medclip.py:229)
    for ``medclip-masked``. The replica's log-scale is 5.0, above the clamp."""
    published, masked = medclip_config(None), medclip_config(None, "medclip-masked")
    assert (tuple(published["preprocess_cfg"]["mean"]), tuple(published["preprocess_cfg"]["std"])) == (
        CLIP_MEAN,
        CLIP_STD,
    )
    assert (tuple(masked["preprocess_cfg"]["mean"]), tuple(masked["preprocess_cfg"]["std"])) == (
        MEDCLIP_MEAN,
        MEDCLIP_STD,
    )
    assert masked["preprocess_cfg"]["size"] == published["preprocess_cfg"]["size"] == 224
    assert (published["context_length"], masked["context_length"]) == (25, 77)  # dataset.py:153 for MedCLIP's own
    default, variant = load_vlm("medclip", weights=medclip_folder), load_vlm("medclip-masked", weights=medclip_folder)
    assert (default.preprocess.mean, default.preprocess.std) == (CLIP_MEAN, CLIP_STD)
    assert (variant.preprocess.mean, variant.preprocess.std) == (MEDCLIP_MEAN, MEDCLIP_STD)
    assert default.logit_scale == pytest.approx(math.exp(5.0), rel=1e-6)
    assert variant.logit_scale == pytest.approx(math.exp(4.6052), rel=1e-6)
    assert default.fingerprint != variant.fingerprint  # never one cache for both


def test_medclip_feed_values_cite_their_source():
    """Every feed setting names where it comes from, in the one file that holds it."""
    published, masked = medclip_config(None)["sources"], medclip_config(None, "medclip-masked")["sources"]
    assert published["context_length"].startswith(
        "iabh1shekbasu/CalibPrompt trainers/classification/coop_medclip.py:90"
    )
    assert published["text_pooling"].startswith("iabh1shekbasu/CalibPrompt trainers/classification/coop_medclip.py:153")
    assert published["clamp_logit_scale"].startswith(
        "iabh1shekbasu/CalibPrompt trainers/classification/coop_medclip.py:258"
    )
    assert published["preprocess_cfg"].startswith(
        "iabh1shekbasu/CalibPrompt configs/trainers/CoOp_MedCLIP/vit_b32_medclip_c16_ep50_batch16.yaml:11"
    )
    assert masked["text_pooling"].startswith("calbench: ")
    assert masked["preprocess_cfg"].startswith("iabh1shekbasu/CalibPrompt models/medclip/constants.py:8")


def test_a_prompt_longer_than_25_tokens_is_cut_as_published_with_a_warning(medclip_folder):
    vlm = load_vlm("medclip", weights=medclip_folder)
    with pytest.warns(CalbenchWarning, match="longer than 25 tokens and are cut"):
        tokens = vlm.tokenize(["a photo of " * 8 + "lymphocytes."])
    assert tokens.ids.shape == (1, 25) and int(tokens.ids[0, -1]) == vlm.tokenizer.sep_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vlm.tokenize([f"{HAND} {c}." for c in CLASSNAMES])


def _biomedclip_by_hand(vlm, learner) -> torch.Tensor:
    """coop_biomedclip.py:78-79 pads to 256 with the mask ``id != pad``; :82 runs the ids through BERT's
    whole embedding layer (word + position + token type, LayerNorm) for [CLS] and the suffix; :105-110
    puts the raw context between them; :125 gives the result to BERT as ``inputs_embeds``, which embeds
    it again; :126-127 pool at [CLS] and project."""
    text = vlm.model.text
    enc = vlm.tokenizer(learner.prompts, padding="max_length", max_length=256, truncation=True, return_tensors="pt")
    ids = enc["input_ids"]
    mask = (ids != text.config.pad_token_id).long()
    frozen = text.transformer.embeddings(input_ids=ids)
    n_ctx, classes = learner.n_ctx, len(learner.classnames)
    prompts = torch.cat([frozen[:, :1], learner.ctx.expand(classes, -1, -1), frozen[:, 1 + n_ctx :]], dim=1)
    out = text.transformer(inputs_embeds=prompts, attention_mask=mask)
    return F.normalize(text.proj(text.pooler(out, mask)), dim=-1)


def test_biomedclip_published_embeds_the_frozen_tokens_twice(biomedclip_folder):
    vlm = load_vlm("biomedclip-published", weights=biomedclip_folder)
    default = load_vlm("biomedclip", weights=biomedclip_folder)
    learner = PromptLearner(vlm, CLASSNAMES, n_ctx=4, seed=0)
    single = PromptLearner(default, CLASSNAMES, n_ctx=4, seed=0)
    with torch.no_grad():
        ours = learner.text_features()
        torch.testing.assert_close(ours, _biomedclip_by_hand(vlm, learner), atol=1e-5, rtol=0)
        torch.testing.assert_close(learner.ctx, single.ctx)
        assert (ours - single.text_features()).abs().max() > 1e-3  # embedding twice is a different feature
    assert vlm.fingerprint != default.fingerprint and vlm.fingerprint.split(":")[1] == "biomedclip-published"


def test_biomedclip_default_hand_prompt_is_the_models_own_encode_text(biomedclip_folder):
    """calbench's single embedding: the context initialised from a hand prompt gives exactly
    open_clip's ``encode_text`` on that prompt (256 padded ids); the zero-shot text features of
    both entries are that forward too, as in the published zero-shot code (zsclip.py:104-118)."""
    default = load_vlm("biomedclip", weights=biomedclip_folder)
    published = load_vlm("biomedclip-published", weights=biomedclip_folder)
    texts = [f"{HAND} {c}." for c in CLASSNAMES]
    ids = default.tokenizer(texts, padding="max_length", max_length=256, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(default.model.encode_text(ids["input_ids"]), dim=-1)
        learner = PromptLearner(default, CLASSNAMES, ctx_init=HAND)
        torch.testing.assert_close(learner.text_features(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(default.encode_texts(texts), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(published.encode_texts(texts), expected, atol=1e-5, rtol=0)


def test_variants_share_their_models_weights_and_stay_out_of_the_grid(monkeypatch, medclip_folder, tmp_path):
    from calbench.compare import plan_grid

    assert MODELS.get("medclip-masked").variant_of == "medclip"
    assert MODELS.get("biomedclip-published").variant_of == "biomedclip"
    (tmp_path / "medclip").symlink_to(medclip_folder)  # $CALBENCH_WEIGHTS/medclip/ serves both entries
    monkeypatch.setenv("CALBENCH_WEIGHTS", str(tmp_path))
    assert availability("medclip-masked") == (True, str(tmp_path / "medclip"))
    assert load_vlm("medclip-masked").name == "medclip-masked"
    run, skipped = plan_grid(True, "tiny", "synthetic", tmp_path)
    models = {m for m, *_ in run} | {m for m, *_ in skipped}
    assert {"medclip", "biomedclip"} <= models and not models & {"medclip-masked", "biomedclip-published"}
    from calbench.tune import modality_pairs

    monkeypatch.setattr("calbench.models.availability", lambda name: (True, "here"))
    monkeypatch.setattr("calbench.data.availability", lambda name, root=None: (True, "here"))
    assert {m for m, _ in modality_pairs("radiology", None)} == {"medclip", "biomedclip"}
