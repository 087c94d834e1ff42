"""MedCLIP (Wang et al., EMNLP 2022), ViT variant: Swin-Tiny image encoder, Bio_ClinicalBERT text
encoder, 512-d bias-free projection heads, written with ``transformers`` building blocks.

Module names follow the published checkpoint (``vision_model.model.*``,
``vision_model.projection_head``, ``text_model.model.*``, ``text_model.projection_head``,
``logit_scale``), so its ``pytorch_model.bin`` loads with no missing or unexpected keys.

How calbench feeds the model is part of its config, each key with its source in the config's
``sources``: ``context_length``, ``text_pooling``, ``clamp_logit_scale`` and ``preprocess_cfg``.
``configs/medclip.json`` feeds it as the published CalibPrompt code does (the published numbers
come from that); a registry variant lays its own feed over it (``configs/medclip-masked.json``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calbench.errors import CalbenchError, warn
from calbench.models.base import PreprocessConfig, TokenBatch
from calbench.models.text import bert_tokenizer, bert_tokens
from calbench.models.weights import load_state_dict_file, load_strict, model_fingerprint

WEIGHTS_NAME = "pytorch_model.bin"
#: an optional architecture file next to the weights (same schema as configs/medclip.json)
CONFIG_NAME = "medclip_config.json"
TOKENIZER_HUB_ID = "emilyalsentzer/Bio_ClinicalBERT"
#: MedCLIP's own forward clamps log(scale) to [0, ln 100] before every use (modeling_medclip.py:229)
MAX_LOG_SCALE = 4.6052
#: "all_positions": the published CalibPrompt mean over every position, padding included;
#: "real_tokens": calbench's mean over [CLS] .. [SEP] only
TEXT_POOLINGS = ("all_positions", "real_tokens")


def pool_text(hidden_states: Sequence[Tensor], attention_mask: Tensor, pooling: str) -> Tensor:
    """Mean of hidden states 1, 2 and last (MedCLIP's choice), then over positions as ``pooling`` says."""
    layers = torch.stack([hidden_states[1], hidden_states[2], hidden_states[-1]]).mean(0)
    if pooling == "all_positions":
        return layers.mean(1)
    mask = attention_mask.unsqueeze(-1).to(layers.dtype)
    return (layers * mask).sum(1) / mask.sum(1)


class MedCLIPVision(nn.Module):
    def __init__(self, config: dict, projection_dim: int) -> None:
        super().__init__()
        from transformers import SwinConfig, SwinModel

        self.model = SwinModel(SwinConfig(**{k: v for k, v in config.items() if k != "model_type"}))
        self.projection_head = nn.Linear(self.model.num_features, projection_dim, bias=False)

    def forward(self, pixels: Tensor) -> Tensor:
        if pixels.shape[1] == 1:  # grayscale radiographs
            pixels = pixels.repeat(1, 3, 1, 1)
        return self.projection_head(self.model(pixel_values=pixels).pooler_output)


class MedCLIPText(nn.Module):
    def __init__(self, config: dict, projection_dim: int) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.model = BertModel(BertConfig(**{k: v for k, v in config.items() if k != "model_type"}))
        self.projection_head = nn.Linear(self.model.config.hidden_size, projection_dim, bias=False)

    def forward(self, embeddings: Tensor, attention_mask: Tensor, pooling: str = TEXT_POOLINGS[0]) -> Tensor:
        """The tower on input embeddings, pooled by :func:`pool_text`, then the projection."""
        out = self.model(inputs_embeds=embeddings, attention_mask=attention_mask, output_hidden_states=True)
        return self.projection_head(pool_text(out.hidden_states, attention_mask, pooling))


class MedCLIPModel(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.vision_model = MedCLIPVision(config["vision"], config["projection_dim"])
        self.text_model = MedCLIPText(config["text"], config["projection_dim"])
        self.logit_scale = nn.Parameter(torch.log(torch.tensor(1 / 0.07)))


def medclip_config(folder: Optional[Path], variant: Optional[str] = None) -> dict:
    """The config next to the weights (else the shipped one), with a variant's feed laid over it."""
    from calbench.models.open_clip_backend import shipped_config

    if folder is not None and (folder / CONFIG_NAME).is_file():
        config = json.loads((folder / CONFIG_NAME).read_text())
    else:
        config = shipped_config("medclip")
    if variant is None:
        return config
    feed = shipped_config(variant)
    preprocess = {**config.get("preprocess_cfg", {}), **feed.get("preprocess_cfg", {})}
    return {**config, **feed, "preprocess_cfg": preprocess}


class MedCLIPBackend:
    """MedCLIP behind the backend protocol; text prompts are [CLS] .. [SEP] with an attention mask.

    ``text_pooling`` "all_positions" (the default, as published) pads every prompt to the
    context length and averages the tower's output over all positions, [PAD] included,
    so a prompt's feature depends on how much padding it gets; "real_tokens"
    (``medclip-masked``) averages over the real tokens only, which on one unpadded prompt is
    MedCLIP's own forward, and lets prompts be cut to the longest one.
    """

    prompt_prefix_len = 1  # [CLS]

    def __init__(self, name: str, model: MedCLIPModel, config: dict, tokenizer: Any, device: torch.device) -> None:
        self.name = name
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = device
        pp = config["preprocess_cfg"]
        self.preprocess = PreprocessConfig(
            size=int(pp["size"]),
            mean=tuple(pp["mean"]),
            std=tuple(pp["std"]),
            interpolation=pp.get("interpolation", "bicubic"),
        )
        self.context_length = int(config["context_length"])
        self.text_pooling = str(config.get("text_pooling", TEXT_POOLINGS[0]))
        if self.text_pooling not in TEXT_POOLINGS:
            raise CalbenchError(f"{name}: text_pooling {self.text_pooling!r} is not one of {', '.join(TEXT_POOLINGS)}")
        self.clamp_logit_scale = bool(config.get("clamp_logit_scale", False))
        self.tokenizer = tokenizer
        self._config_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_path(
        cls, name: str, path: Path, device: torch.device, tokenizer: Any = None, variant: Optional[str] = None
    ) -> MedCLIPBackend:
        """Load the published ``pytorch_model.bin`` (a file, or the folder that holds it), strictly;
        ``variant`` names a shipped feed (``configs/<variant>.json``) to lay over the config."""
        folder = path if path.is_dir() else path.parent
        weights = folder / WEIGHTS_NAME if path.is_dir() else path
        if not weights.is_file():
            raise CalbenchError(f"{path} has no {WEIGHTS_NAME}; pass the folder unzipped from MedCLIP's ViT checkpoint")
        config = medclip_config(folder, variant)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = MedCLIPModel(config)
        load_strict(model, load_state_dict_file(weights), name, weights)
        tokenizer = tokenizer or bert_tokenizer([folder, TOKENIZER_HUB_ID])
        return cls(name, model, config, tokenizer, device)

    @functools.cached_property
    def fingerprint(self) -> str:
        return model_fingerprint("medclip", self.name, self._config_id, self.model)

    @property
    def logit_scale(self) -> float:
        log_scale = self.model.logit_scale
        return float((log_scale.clamp(0, MAX_LOG_SCALE) if self.clamp_logit_scale else log_scale).exp())

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_model.projection_head.out_features)

    def encode_images(self, pixels: Tensor) -> Tensor:
        return F.normalize(self.model.vision_model(pixels.to(self.device)).float(), dim=-1)

    def _warn_if_cut(self, texts: Sequence[str]) -> None:
        """Prompts longer than the context length lose their end (the class name), as in the published code."""
        lengths = [len(ids) for ids in self.tokenizer(list(texts), truncation=False)["input_ids"]]
        if max(lengths, default=0) > self.context_length:
            longest = texts[lengths.index(max(lengths))]
            warn(
                f"{self.name}: {sum(n > self.context_length for n in lengths)} prompt(s) are longer than "
                f"{self.context_length} tokens and are cut, e.g. {longest!r} ({max(lengths)} tokens)"
            )

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        """[CLS] .. [SEP] ids with the attention mask, padded to the context length when padding is
        pooled, else cut to the longest prompt (exact: masked padding changes no real token)."""
        self._warn_if_cut(texts)
        cut = self.text_pooling != "all_positions"
        return bert_tokens(self.tokenizer, texts, self.context_length, self.device, cut=cut)[1]

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.model.text_model.model.embeddings.word_embeddings(ids.to(self.device))

    def encode_embeddings(self, embeddings: Tensor, tokens: TokenBatch) -> Tensor:
        return self.model.text_model(embeddings, tokens.attention_mask, self.text_pooling)

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """The published zero-shot forward on token ids (zsclip.py:76-96): all prompts padded to the
        context length when padding is pooled, else each prompt alone, unpadded (MedCLIP's own)."""
        self._warn_if_cut(texts)
        bert = self.model.text_model.model
        padded = self.text_pooling == "all_positions"
        batches = [list(texts)] if padded else [[text] for text in texts]
        features = []
        for batch in batches:
            enc = self.tokenizer(
                batch,
                padding="max_length" if padded else False,
                truncation=True,
                max_length=self.context_length,
                return_tensors="pt",
            )
            mask = enc["attention_mask"].to(self.device)
            out = bert(input_ids=enc["input_ids"].to(self.device), attention_mask=mask, output_hidden_states=True)
            features.append(
                self.model.text_model.projection_head(pool_text(out.hidden_states, mask, self.text_pooling))
            )
        return F.normalize(torch.cat(features).float(), dim=-1)
