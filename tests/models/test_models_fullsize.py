"""Each Med-VLM at its full published size (random weights, nothing downloaded) takes a checkpoint with
the published key list and shapes, strictly: no missing, unexpected or reshaped keys.

The published key lists come from the libraries' own architectures at the published configs
(transformers' ViT-B/32 ``CLIPConfig`` for PLIP, open_clip's ViT-B-32 for QuiltNet and for the
OpenAI-format PLIP file, BiomedCLIP's open_clip config, MedCLIP's module layout), built on the
meta device, plus buffers that older ``transformers`` saved; literal shapes pin the sizes.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from torch import nn

from calbench.models import load_vlm

WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] a photo of x .".split()


def _published(build) -> dict[str, torch.Tensor]:
    """Real tensors with a published module's keys and shapes, one constant each: cheap at full size."""
    with torch.device("meta"):
        module = build()
    return {k: torch.full(v.shape, (i % 97) / 97).to(v.dtype) for i, (k, v) in enumerate(module.state_dict().items())}


def _load_with(monkeypatch, module: str, state: dict, name: str, path: Path):
    """Run the real loading path with ``state`` as the checkpoint's content (no 600 MB write)."""
    monkeypatch.setattr(f"calbench.models.{module}.load_state_dict_file", lambda _: dict(state))
    return load_vlm(name, weights=path)


def _placeholder(folder: Path, *files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        (folder / file).write_bytes(b"")
    (folder / "vocab.txt").write_text("\n".join(WORDS))
    return folder


def _check_loaded(vlm, state: dict) -> None:
    """Strict load happened, and a tensor really came from the checkpoint."""
    own = vlm.model.state_dict()
    key = next(k for k in state if k.endswith("weight") and k in own)
    assert torch.equal(own[key].cpu(), state[key].to(own[key].dtype))


def test_plip_hf_folder(monkeypatch, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    state = _published(lambda: CLIPModel(CLIPConfig()))
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # saved by transformers < 4.31
    assert state["text_model.embeddings.token_embedding.weight"].shape == (49408, 512)
    assert state["vision_model.embeddings.patch_embedding.weight"].shape == (768, 3, 32, 32)
    assert state["visual_projection.weight"].shape == (512, 768) and state["text_projection.weight"].shape == (512, 512)
    folder = _placeholder(tmp_path / "plip", "model.safetensors")
    CLIPConfig().save_pretrained(folder)
    vlm = _load_with(monkeypatch, "hf_clip_backend", state, "plip", folder)
    _check_loaded(vlm, state)
    assert vlm.embed_dim == 512 and vlm.preprocess.size == 224


def test_plip_openai_format_file(monkeypatch, tmp_path):
    cfg = open_clip.get_model_config("ViT-B-32-quickgelu")
    state = _published(lambda: open_clip.CLIP(**cfg))
    assert state["visual.conv1.weight"].shape == (768, 3, 32, 32) and state["text_projection"].shape == (512, 512)
    path = tmp_path / "plip_vit_b32.pt"
    path.write_bytes(b"")
    monkeypatch.setattr("calbench.models.load_state_dict_file", lambda _: dict(state))
    vlm = load_vlm("plip", weights=path)
    _check_loaded(vlm, state)
    assert vlm.model.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"


def test_quiltnet_state_dict(monkeypatch, tmp_path):
    state = _published(lambda: open_clip.CLIP(**open_clip.get_model_config("ViT-B-32")))
    assert len(state) > 150 and state["positional_embedding"].shape == (77, 512)
    folder = _placeholder(tmp_path / "quiltnet", "open_clip_pytorch_model.bin")
    vlm = _load_with(monkeypatch, "open_clip_backend", state, "quiltnet", folder)
    _check_loaded(vlm, state)
    assert vlm.model.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"  # as published


def test_biomedclip_state_dict(monkeypatch, tmp_path):
    from calbench.models.open_clip_backend import shipped_config, text_config_folder

    model_cfg = dict(shipped_config("biomedclip")["model_cfg"])
    text_cfg = dict(model_cfg["text_cfg"], hf_model_pretrained=False)
    text_cfg["hf_model_name"] = text_config_folder(text_cfg["hf_model_name"], None)
    text_cfg.pop("hf_tokenizer_name")
    state = _published(
        lambda: open_clip.CustomTextCLIP(embed_dim=512, vision_cfg=model_cfg["vision_cfg"], text_cfg=text_cfg)
    )
    state["text.transformer.embeddings.position_ids"] = torch.arange(512)[None]
    assert state["text.transformer.embeddings.word_embeddings.weight"].shape == (30522, 768)
    assert state["text.proj.0.weight"].shape == (640, 768) and state["text.proj.2.weight"].shape == (512, 640)
    assert state["visual.trunk.patch_embed.proj.weight"].shape == (768, 3, 16, 16) and state[
        "visual.trunk.pos_embed"
    ].shape == (1, 197, 768)
    assert state["visual.head.proj.weight"].shape == (512, 768) and not any("pooler" in k for k in state)
    folder = _placeholder(tmp_path / "biomedclip", "open_clip_pytorch_model.bin")
    vlm = _load_with(monkeypatch, "open_clip_backend", state, "biomedclip", folder)
    _check_loaded(vlm, state)
    assert vlm.context_length == 256


class _PublishedMedCLIP(nn.Module):
    """MedCLIP's published module tree: {vision,text}_model.{model,projection_head} and logit_scale."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel, SwinConfig, SwinModel

        self.vision_model = nn.Module()
        self.vision_model.model = SwinModel(SwinConfig())  # microsoft/swin-tiny-patch4-window7-224
        self.vision_model.projection_head = nn.Linear(768, 512, bias=False)
        self.text_model = nn.Module()
        self.text_model.model = BertModel(BertConfig(vocab_size=28996))  # emilyalsentzer/Bio_ClinicalBERT
        self.text_model.projection_head = nn.Linear(768, 512, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(0.0))


def test_medclip_state_dict(monkeypatch, tmp_path):
    state = _published(_PublishedMedCLIP)
    # buffers transformers < 4.31 saved in the published pytorch_model.bin
    state["text_model.model.embeddings.position_ids"] = torch.arange(512)[None]
    for key in [k for k in state if k.endswith("relative_position_bias_table")]:
        state[key.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(
            49 * 49, dtype=torch.long
        )
    assert state["vision_model.model.embeddings.patch_embeddings.projection.weight"].shape == (96, 3, 4, 4)
    assert state["text_model.model.pooler.dense.weight"].shape == (768, 768)
    folder = _placeholder(tmp_path / "medclip", "pytorch_model.bin")
    vlm = _load_with(monkeypatch, "medclip", state, "medclip", folder)
    _check_loaded(vlm, state)
    # fed as the published CalibPrompt code feeds it: CLIP's pixel mean, prompts padded to 25 tokens
    # (iabh1shekbasu/CalibPrompt configs/trainers/CoOp_MedCLIP/vit_b32_medclip_c16_ep50_batch16.yaml:11,
    # trainers/classification/coop_medclip.py:90)
    assert vlm.preprocess.mean == (0.48145466, 0.4578275, 0.40821073) and vlm.context_length == 25
