"""Hugging Face ``transformers`` CLIP backend (PLIP's published format: a ``save_pretrained`` folder)."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from calbench.errors import CalbenchError
from calbench.models.base import PreprocessConfig, TokenBatch
from calbench.models.shared_prefix import Block, hf_clip_blocks, run_blocks
from calbench.models.text import clip_tokens
from calbench.models.weights import first_file, load_state_dict_file, load_strict, model_fingerprint

WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "architectures",
    "torch_dtype",
    "dtype",
    "_commit_hash",
}


def _features(out: Any) -> Tensor:
    """``get_*_features`` return a tensor in transformers 4 and an output object in 5."""
    return out if isinstance(out, Tensor) else out.pooler_output


def _config_id(config: dict) -> str:
    def clean(d: Any) -> Any:
        return {k: clean(v) for k, v in d.items() if k not in VOLATILE_CONFIG_KEYS} if isinstance(d, dict) else d

    return hashlib.sha256(json.dumps(clean(config), sort_keys=True, default=str).encode()).hexdigest()[:12]


class HFClipBackend:
    """A ``transformers.CLIPModel``; its text tower runs on learned input embeddings.

    CLIP's vocabulary is the same BPE that open_clip ships, so prompts are tokenised
    offline with open_clip's tokenizer; pooling is at the EOT token, as in the model.
    """

    prompt_prefix_len = 1  # [SOS]

    def __init__(self, name: str, model: torch.nn.Module, preprocess: PreprocessConfig, device: torch.device) -> None:
        self.name = name
        self.model = model.eval().requires_grad_(False).to(device)
        self.preprocess = preprocess
        self.device = device
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(
            context_length=model.config.text_config.max_position_embeddings
        )
        self._config_id = _config_id(model.config.to_dict())

    @classmethod
    def from_folder(cls, name: str, folder: Path, device: torch.device) -> HFClipBackend:
        """Load a ``save_pretrained`` folder (config.json + model.safetensors / pytorch_model.bin), strictly."""
        from transformers import CLIPConfig, CLIPModel

        weights = first_file(folder, WEIGHT_NAMES)
        if not (folder / "config.json").is_file() or weights is None:
            raise CalbenchError(
                f"{folder} is not a Hugging Face CLIP folder (needs config.json and {' or '.join(WEIGHT_NAMES)})"
            )
        config = CLIPConfig.from_pretrained(str(folder))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = CLIPModel(config)
        load_strict(model, load_state_dict_file(weights), name, weights)
        return cls(name, model, cls._preprocess(folder, config), device)

    @staticmethod
    def _preprocess(folder: Path, config: Any) -> PreprocessConfig:
        """From ``preprocessor_config.json`` when present, else CLIP's defaults at the model's resolution."""
        size = config.vision_config.image_size
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            return PreprocessConfig(size=size)
        pp = json.loads(path.read_text())
        crop = pp.get("crop_size", size)
        crop = crop.get("height", size) if isinstance(crop, dict) else crop
        return PreprocessConfig(
            size=int(crop),
            mean=tuple(pp.get("image_mean", PreprocessConfig.mean)),
            std=tuple(pp.get("image_std", PreprocessConfig.std)),
            interpolation="bilinear" if pp.get("resample", 3) == 2 else "bicubic",
        )

    @functools.cached_property
    def fingerprint(self) -> str:
        return model_fingerprint("hf_clip", self.name, self._config_id, self.model)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def encode_images(self, pixels: Tensor) -> Tensor:
        return F.normalize(
            _features(self.model.get_image_features(pixel_values=pixels.to(self.device))).float(), dim=-1
        )

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        """Token ids cut after the longest prompt's EOT (exact for a causal, EOT-pooled tower)."""
        return clip_tokens(self.tokenizer, texts, self.device)[1]

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.model.text_model.embeddings.token_embedding(ids.to(self.device))

    def encode_embeddings(self, embeddings: Tensor, tokens: TokenBatch) -> Tensor:
        """The model's own ``get_text_features`` with the token-embedding lookup replaced by ``embeddings``.

        ``tokens.ids`` still mark where EOT is, which is all the model reads from them.
        """
        layer = self.model.text_model.embeddings.token_embedding
        handle = layer.register_forward_hook(lambda module, args, output: embeddings.to(output.dtype))
        try:
            return _features(self.model.get_text_features(input_ids=tokens.ids.to(self.device)))
        finally:
            handle.remove()

    @property
    def shares_prefix(self) -> bool:
        """CLIPTextModel is causal (it builds a causal mask); its layers must be the plain CLIPEncoderLayer."""
        return self._prefix_blocks() is not None

    def _prefix_blocks(self) -> Optional[list[Block]]:
        """The tower's layers as :class:`Block`, built afresh (they refer to the current modules), or None."""
        return hf_clip_blocks(self.model.text_model.encoder.layers)

    def encode_shared_prefix(self, prefix: Tensor, suffix: Tensor, owner: Tensor, tokens: TokenBatch) -> Tensor:
        """:meth:`encode_embeddings` with each shared prefix run once (:mod:`calbench.models.shared_prefix`)."""
        blocks = self._prefix_blocks()
        if blocks is None:
            raise ValueError(f"{self.name}: this text tower cannot share a prompt prefix")
        text = self.model.text_model
        start, length = prefix.shape[1], prefix.shape[1] + suffix.shape[1]
        positions = text.embeddings.position_embedding.weight[:length]
        dtype = positions.dtype
        x = run_blocks(
            blocks,
            prefix.to(dtype) + positions[:start],
            suffix.to(dtype) + positions[start:],
            owner,
            tokens.eot - start,
        )
        return self.model.text_projection(text.final_layer_norm(x))

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        ids = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(_features(self.model.get_text_features(input_ids=ids)).float(), dim=-1)
