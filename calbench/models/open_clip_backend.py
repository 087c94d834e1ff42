"""open_clip backend: CLIP-style (causal, EOT-pooled) text transformers."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from calbench.errors import CalbenchError
from calbench.models.base import PreprocessConfig, TokenBatch


def state_dict_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every tensor's name, shape and bytes: the weights' identity."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Read weights from safetensors or a torch checkpoint (safely: tensors only)."""
    if not path.is_file():
        raise CalbenchError(f"weights file {path} does not exist; pass --weights with an existing file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise CalbenchError(f"cannot read weights file {path}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


class OpenClipBackend:
    """Wraps an ``open_clip.CLIP`` so its text tower can run on learned input embeddings."""

    prompt_prefix_len = 1  # [SOS]

    def __init__(
        self,
        name: str,
        model: open_clip.CLIP,
        preprocess: PreprocessConfig,
        config_id: str,
        device: torch.device,
    ) -> None:
        if model.text_pool_type != "argmax":
            raise ValueError(f"{name}: only EOT (argmax) text pooling is supported, got {model.text_pool_type!r}")
        self.name = name
        self.model = model.eval().requires_grad_(False).to(device)
        self.preprocess = preprocess
        self.device = device
        self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
        self._config_id = config_id
        self._fingerprint: Optional[str] = None

    @classmethod
    def from_config(
        cls,
        name: str,
        config: dict[str, Any],
        device: torch.device,
        seed: int = 0,
        weights: Optional[Path] = None,
    ) -> "OpenClipBackend":
        """Build from an open_clip config dict; random weights from ``seed`` unless ``weights`` is given."""
        cfg = dict(config)
        pp = cfg.pop("preprocess_cfg", {})
        preprocess = PreprocessConfig(
            size=int(pp.get("size", cfg["vision_cfg"]["image_size"])),
            mean=tuple(pp.get("mean", PreprocessConfig.mean)),
            std=tuple(pp.get("std", PreprocessConfig.std)),
            interpolation=pp.get("interpolation", "bicubic"),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.CLIP(**cfg)
        if weights is not None:
            state = load_state_dict_file(Path(weights))
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise CalbenchError(
                    f"weights {weights} do not fit model {name!r}: {len(missing)} missing keys "
                    f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
                )
        config_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
        return cls(name, model, preprocess, config_id, device)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = f"open_clip:{self.name}:cfg-{self._config_id}:w-{state_dict_digest(self.model)}"
        return self._fingerprint

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @property
    def embed_dim(self) -> int:
        proj = self.model.text_projection
        return proj.out_features if isinstance(proj, torch.nn.Linear) else int(proj.shape[1])

    def encode_images(self, pixels: Tensor) -> Tensor:
        return F.normalize(self.model.encode_image(pixels.to(self.device)).float(), dim=-1)

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        """Token ids cut after the longest prompt's EOT.

        The text tower is causal and pools at EOT, so positions after EOT cannot
        change the feature: cutting them is exact and saves most of the compute.
        """
        ids = self._tokenizer(list(texts))
        eot = ids.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
        return TokenBatch(ids[:, : int(eot.max()) + 1].to(self.device), eot.to(self.device))

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.model.token_embedding(ids.to(self.device))

    def encode_embeddings(self, embeddings: Tensor, tokens: TokenBatch) -> Tensor:
        m = self.model
        length = embeddings.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = embeddings.to(cast) + m.positional_embedding[:length].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.eot]
        proj = m.text_projection
        return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        ids = self._tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(ids).float(), dim=-1)
