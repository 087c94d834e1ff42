"""MedCLIP (Wang et al., EMNLP 2022), ViT variant: Swin-Tiny image encoder, Bio_ClinicalBERT text
encoder, 512-d bias-free projection heads, written with ``transformers`` building blocks.

Module names follow the published checkpoint (``vision_model.model.*``,
``vision_model.projection_head``, ``text_model.model.*``, ``text_model.projection_head``,
``logit_scale``), so its ``pytorch_model.bin`` loads with no missing or unexpected keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calbench.errors import CalbenchError
from calbench.models.base import PreprocessConfig, TokenBatch
from calbench.models.text import bert_tokenizer, bert_tokens
from calbench.models.weights import load_state_dict_file, load_strict, state_dict_digest

WEIGHTS_NAME = "pytorch_model.bin"
#: an optional architecture file next to the weights (same schema as configs/medclip.json)
CONFIG_NAME = "medclip_config.json"
TOKENIZER_HUB_ID = "emilyalsentzer/Bio_ClinicalBERT"
#: the published model clamps log(scale) to [0, ln 100] before every use
MAX_LOG_SCALE = 4.6052


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

    def forward(self, embeddings: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean of hidden states 1, 2 and last, then over the real tokens, then the projection."""
        out = self.model(inputs_embeds=embeddings, attention_mask=attention_mask, output_hidden_states=True)
        layers = torch.stack([out.hidden_states[1], out.hidden_states[2], out.hidden_states[-1]]).mean(0)
        mask = attention_mask.unsqueeze(-1).to(layers.dtype)
        return self.projection_head((layers * mask).sum(1) / mask.sum(1))


class MedCLIPModel(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.vision_model = MedCLIPVision(config["vision"], config["projection_dim"])
        self.text_model = MedCLIPText(config["text"], config["projection_dim"])
        self.logit_scale = nn.Parameter(torch.log(torch.tensor(1 / 0.07)))


def medclip_config(folder: Optional[Path]) -> dict:
    from calbench.models.open_clip_backend import shipped_config

    if folder is not None and (folder / CONFIG_NAME).is_file():
        return json.loads((folder / CONFIG_NAME).read_text())
    return shipped_config("medclip")


class MedCLIPBackend:
    """MedCLIP behind the backend protocol; text prompts are [CLS] .. [SEP] with an attention mask.

    Text pooling averages over real tokens only. On one unpadded prompt this is exactly the
    published forward; the published code also averages [PAD] positions when it pads a batch,
    which makes a prompt's feature depend on the other prompts in its batch, so we do not.
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
        self._tokenizer = tokenizer
        self._config_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
        self._fingerprint: Optional[str] = None

    @classmethod
    def from_path(cls, name: str, path: Path, device: torch.device, tokenizer: Any = None) -> MedCLIPBackend:
        """Load the published ``pytorch_model.bin`` (a file, or the folder that holds it), strictly."""
        folder = path if path.is_dir() else path.parent
        weights = folder / WEIGHTS_NAME if path.is_dir() else path
        if not weights.is_file():
            raise CalbenchError(f"{path} has no {WEIGHTS_NAME}; pass the folder unzipped from MedCLIP's ViT checkpoint")
        config = medclip_config(folder)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = MedCLIPModel(config)
        load_strict(model, load_state_dict_file(weights), name, weights)
        tokenizer = tokenizer or bert_tokenizer([folder, TOKENIZER_HUB_ID])
        return cls(name, model, config, tokenizer, device)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = f"medclip:{self.name}:cfg-{self._config_id}:w-{state_dict_digest(self.model)}"
        return self._fingerprint

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.clamp(0, MAX_LOG_SCALE).exp())

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_model.projection_head.out_features)

    def encode_images(self, pixels: Tensor) -> Tensor:
        return F.normalize(self.model.vision_model(pixels.to(self.device)).float(), dim=-1)

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        """[CLS] .. [SEP] ids cut to the longest prompt, with the attention mask (exact: padding is masked)."""
        return bert_tokens(self._tokenizer, texts, self.context_length, self.device)[1]

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.model.text_model.model.embeddings.word_embeddings(ids.to(self.device))

    def encode_embeddings(self, embeddings: Tensor, tokens: TokenBatch) -> Tensor:
        return self.model.text_model(embeddings, tokens.attention_mask)

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """The published text forward (hidden states 1, 2, last; mean over tokens) on each prompt alone."""
        bert = self.model.text_model.model
        features = []
        for text in texts:
            enc = self._tokenizer([text], truncation=True, max_length=self.context_length, return_tensors="pt")
            out = bert(
                input_ids=enc["input_ids"].to(self.device),
                attention_mask=enc["attention_mask"].to(self.device),
                output_hidden_states=True,
            )
            pooled = (
                torch.stack([out.hidden_states[1], out.hidden_states[2], out.hidden_states[-1]])
                .permute(1, 0, 2, 3)
                .mean(2)
                .mean(1)
            )
            features.append(self.model.text_model.projection_head(pooled))
        return F.normalize(torch.cat(features).float(), dim=-1)
