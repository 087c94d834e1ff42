"""Every backend, offline: small architecture-exact replicas with random weights, saved in each
model's published on-disk format and loaded through ``load_vlm(name, weights=...)``.

Each replica's own forward (``CLIPModel.get_*_features``, open_clip ``encode_*``, MedCLIP's
pooling as the published CalibPrompt code runs it, and as MedCLIP's own code does for
``medclip-masked``) is the reference for our features.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from calbench.models import TokenBatch, load_vlm
from calbench.models.medclip import MedCLIPModel
from calbench.models.open_clip_backend import shipped_config
from calbench.prompts import PromptLearner

CLASSNAMES = ["crimson striped tissue", "amber striped tissue", "normal lung tissue", "lymphocytes"]
WORDS = (
    "a photo of an x . , - chest radiograph showing crimson amber striped tissue normal lung lymph ##ocytes ##s".split()
)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
HAND = "a photo of a"


def _write_vocab(folder: Path) -> None:
    """A small generated WordPiece vocabulary (the real ones cannot be downloaded offline)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n")


def _pixels(size: int) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))


def _plip_hf(root: Path):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(root)

    def reference_text(texts):
        ids = open_clip.tokenize(texts)
        out = model.get_text_features(input_ids=ids)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def reference_image(pixels):
        out = model.get_image_features(pixel_values=pixels)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return root, 32, reference_text, reference_image


def _open_clip_replica(root: Path, quick_gelu: bool, file_only: bool):
    """QuiltNet / CLIP layout (open_clip_config.json + open_clip_pytorch_model.bin), or a bare OpenAI-format file."""
    width = 64  # OpenAI's convention: 64-wide heads, so 1 head here
    cfg = {
        "embed_dim": 16,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": width, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 1, "layers": 2},
    }
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    root.mkdir(parents=True, exist_ok=True)
    if file_only:
        path = root / "plip_vit_b32.pt"
        torch.save(model.state_dict(), path)
    else:
        path = root
        torch.save(model.state_dict(), root / "open_clip_pytorch_model.bin")
        (root / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}})
        )
    return path, 32, lambda texts: model.encode_text(open_clip.tokenize(texts)), model.encode_image


QUILT_SMALL = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


@pytest.mark.parametrize(
    ("layout", "key", "quick"),
    [("openai-file", None, True), ("hub", None, True), ("hub", True, True), ("hub", False, False)],
)
def test_quiltnet_runs_the_activation_of_the_published_runs(layout, key, quick, tmp_path, monkeypatch):
    """The published QuiltNet numbers come from OpenAI CLIP's build_model, whose blocks use QuickGELU:
    calbench's features are those of open_clip built with QuickGELU, unless the weights' own config says
    otherwise (then with one warning), and differ from those of the other activation."""
    from calbench.errors import CalbenchWarning

    torch.manual_seed(0)
    models = {q: open_clip.CLIP(**QUILT_SMALL, quick_gelu=q).eval() for q in (True, False)}
    models[False].load_state_dict(models[True].state_dict())  # the same weights, the other activation
    if layout == "openai-file":  # quiltnet_b32.pt as the published code loads it: calbench's shipped architecture
        monkeypatch.setattr("calbench.models.open_clip_backend.shipped_config", lambda _: {"model_cfg": QUILT_SMALL})
        path = tmp_path / "quiltnet_b32.pt"
        torch.save(models[True].state_dict(), path)
    else:
        path = tmp_path
        torch.save(models[True].state_dict(), path / "open_clip_pytorch_model.bin")
        cfg = QUILT_SMALL if key is None else dict(QUILT_SMALL, quick_gelu=key)
        (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vlm = load_vlm("quiltnet", weights=path)
    said = [str(w.message) for w in caught if issubclass(w.category, CalbenchWarning)]
    assert said == ([] if quick else [said[0]]) and all("quick_gelu False" in m and "model.py:175" in m for m in said)
    texts, pixels = [f"{HAND} {c}." for c in CLASSNAMES], _pixels(32)
    with torch.no_grad():
        for q, model in models.items():
            want = (
                F.normalize(model.encode_text(open_clip.tokenize(texts)), dim=-1),
                F.normalize(model.encode_image(pixels), dim=-1),
            )
            got = (vlm.encode_texts(texts), vlm.encode_images(pixels))
            gaps = [float((a - b).abs().max()) for a, b in zip(got, want)]
            assert all(g < 1e-5 for g in gaps) if q == quick else all(g > 1e-3 for g in gaps), (q, gaps)


def _biomedclip(root: Path):
    from transformers import BertConfig

    _write_vocab(root)
    text_dir = root / "text"
    BertConfig(
        vocab_size=len(SPECIALS + WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    ).save_pretrained(text_dir)
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "timm_model_name": "test_vit",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 32,
        },
        "text_cfg": {
            "hf_model_name": "text",
            "hf_tokenizer_name": "text",
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    }
    text_cfg = {k: v for k, v in cfg["text_cfg"].items() if k != "hf_tokenizer_name"}
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(
        embed_dim=16,
        vision_cfg=cfg["vision_cfg"],
        text_cfg=dict(text_cfg, hf_model_name=str(text_dir), hf_model_pretrained=False),
    ).eval()
    state = model.state_dict()
    state["text.transformer.embeddings.position_ids"] = torch.arange(256)[None]  # as older transformers saved it
    torch.save(state, root / "open_clip_pytorch_model.bin")
    (root / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": cfg,
                "preprocess_cfg": {
                    "mean": [0.48145466, 0.4578275, 0.40821073],
                    "std": [0.26862954, 0.26130258, 0.27577711],
                },
            }
        )
    )
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(root))

    def reference_text(texts):  # open_clip's HFTokenizer pads to the context length
        ids = tokenizer(texts, padding="max_length", truncation=True, max_length=256, return_tensors="pt")["input_ids"]
        return model.encode_text(ids)

    return root, 32, reference_text, model.encode_image


MEDCLIP_SMALL = {
    "vision": {
        "model_type": "swin",
        "image_size": 32,
        "patch_size": 4,
        "embed_dim": 16,
        "depths": [1, 1],
        "num_heads": [1, 2],
        "window_size": 4,
    },
    "text": {
        "model_type": "bert",
        "vocab_size": len(SPECIALS + WORDS),
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
    },
    "projection_dim": 16,
    # the shipped feed (context length, pooling, logit-scale clamp, pixel statistics) at a 32 px input
    **{key: shipped_config("medclip")[key] for key in ("context_length", "text_pooling", "clamp_logit_scale")},
    "preprocess_cfg": dict(shipped_config("medclip")["preprocess_cfg"], size=32),
}


def _medclip(root: Path, masked: bool = False):
    """A MedCLIP folder; the reference text forward is the published CalibPrompt zero-shot one
    (padded to the context length, mean over every position: zsclip.py:76-96), or for
    ``medclip-masked`` MedCLIP's own forward on one unpadded prompt at a time."""
    from transformers import BertTokenizerFast

    _write_vocab(root)
    torch.manual_seed(0)
    model = MedCLIPModel(MEDCLIP_SMALL).eval()
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # above the published clamp
    state = model.state_dict()
    # buffers that transformers < 4.31 saved in the published checkpoint
    state["text_model.model.embeddings.position_ids"] = torch.arange(128)[None]
    state["vision_model.model.encoder.layers.0.blocks.0.attention.self.relative_position_index"] = torch.zeros(
        16 * 16, dtype=torch.long
    )
    torch.save(state, root / "pytorch_model.bin")
    (root / "medclip_config.json").write_text(json.dumps(MEDCLIP_SMALL))
    tokenizer = BertTokenizerFast.from_pretrained(str(root))
    text_model = model.text_model

    def reference_text(texts):
        batches = [[text] for text in texts] if masked else [texts]
        pad = (
            {}
            if masked
            else {"padding": "max_length", "truncation": True, "max_length": MEDCLIP_SMALL["context_length"]}
        )
        out = []
        for batch in batches:
            enc = tokenizer(batch, return_tensors="pt", **pad)
            hidden = text_model.model(**enc, output_hidden_states=True).hidden_states
            embed = torch.stack([hidden[1], hidden[2], hidden[-1]]).permute(1, 0, 2, 3).mean(2).mean(1)
            out.append(text_model.projection_head(embed))
        return torch.cat(out)

    def reference_image(pixels):
        return model.vision_model.projection_head(model.vision_model.model(pixel_values=pixels).pooler_output)

    return root, 32, reference_text, reference_image


REPLICAS = {
    "plip": lambda root: _plip_hf(root),
    "plip-openai-file": lambda root: _open_clip_replica(root, quick_gelu=True, file_only=True),
    "quiltnet": lambda root: _open_clip_replica(root, quick_gelu=True, file_only=False),
    "clip-b32": lambda root: _open_clip_replica(root, quick_gelu=True, file_only=False),
    "biomedclip": _biomedclip,
    "medclip": _medclip,
    "medclip-masked": lambda root: _medclip(root, masked=True),
}


@pytest.fixture(scope="module", params=list(REPLICAS))
def replica(request, tmp_path_factory):
    """(registry name, loaded backend, image size, reference text forward, reference image forward)."""
    key = request.param
    path, size, ref_text, ref_image = REPLICAS[key](tmp_path_factory.mktemp(key))
    name = "plip" if key.startswith("plip") else key
    return key, load_vlm(name, weights=path), size, ref_text, ref_image


def test_features_equal_the_replicas_own_forward(replica):
    key, vlm, size, ref_text, ref_image = replica
    texts = [f"{HAND} {c}." for c in CLASSNAMES]
    with torch.no_grad():
        torch.testing.assert_close(
            vlm.encode_texts(texts), F.normalize(ref_text(texts).float(), dim=-1), atol=1e-5, rtol=0
        )
        pixels = _pixels(size)
        torch.testing.assert_close(
            vlm.encode_images(pixels), F.normalize(ref_image(pixels).float(), dim=-1), atol=1e-5, rtol=0
        )
    assert vlm.embed_dim == 16 and vlm.preprocess.size == size


@pytest.mark.parametrize("class_specific", [False, True])
def test_ctx_init_reproduces_the_hand_prompt(replica, class_specific):
    key, vlm, *_ = replica
    learner = PromptLearner(vlm, CLASSNAMES, ctx_init=HAND, class_specific=class_specific)
    assert learner.n_ctx == 4
    reference = vlm.encode_texts([f"{HAND} {c}." for c in CLASSNAMES])
    torch.testing.assert_close(learner.text_features(), reference, atol=1e-5, rtol=0)


def test_random_context_trains_through_the_frozen_tower(replica):
    key, vlm, *_ = replica
    learner = PromptLearner(vlm, CLASSNAMES, n_ctx=6, seed=0)
    learner.text_features().pow(2).sum(dim=0)[0].backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in vlm.model.parameters())


def _full_length(vlm, texts):
    """Ids padded to the tower's whole context length (77 or 256), with their mask."""
    tokenizer = vlm.tokenizer
    if hasattr(tokenizer, "pad_token_id"):
        enc = tokenizer(texts, padding="max_length", max_length=vlm.context_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    return tokenizer(texts), None


def test_cutting_to_the_longest_prompt_leaves_features_unchanged(replica):
    """Tokens after EOT (causal towers) and masked padding (BERT towers) cannot change a feature."""
    key, vlm, *_ = replica
    texts = [f"{HAND} {c}." for c in CLASSNAMES] + ["x"]
    cut = vlm.tokenize(texts)
    if key == "medclip":  # the published mean over every position counts the padding: never cut
        assert cut.ids.shape[1] == vlm.context_length
        return
    full_ids, full_mask = _full_length(vlm, texts)
    assert cut.ids.shape[1] == int(cut.eot.max()) + 1 < full_ids.shape[1]
    with torch.no_grad():
        full = vlm.encode_embeddings(vlm.embed_tokens(full_ids), TokenBatch(full_ids, cut.eot, full_mask))
        short = vlm.encode_embeddings(vlm.embed_tokens(cut.ids), cut)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=0)


def test_fingerprint_names_the_weights(replica):
    key, vlm, *_ = replica
    assert len(vlm.fingerprint.rsplit("-", 1)[-1]) == 16
    assert vlm.fingerprint.split(":")[1] == ("plip" if key.startswith("plip") else key)
