"""The backend protocol: the only thing the cache, prompt learner and trainer know about a VLM."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: listing models needs no torch
    import torch
    from torch import Tensor


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model expects its pixels: resolution, normalisation and resampling."""

    size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"

    def describe(self) -> str:
        """A stable string for cache keys."""
        mean = ",".join(f"{m:.6g}" for m in self.mean)
        std = ",".join(f"{s:.6g}" for s in self.std)
        return f"size={self.size};interp={self.interpolation};mean={mean};std={std}"


@dataclass
class TokenBatch:
    """Tokenised prompts, cut to the longest real prompt.

    ``eot`` is the index of each row's last real token: CLIP's end-of-text token
    (where it pools) or BERT's [SEP], so a prompt's context spans
    ``prompt_prefix_len .. eot``; ``attention_mask`` is set for towers that mask
    padding (BERT-style).
    """

    ids: Tensor
    eot: Tensor
    attention_mask: Optional[Tensor] = None

    def to(self, device: torch.device | str) -> TokenBatch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return TokenBatch(self.ids.to(device), self.eot.to(device), mask)


@runtime_checkable
class VLMBackend(Protocol):
    """A frozen dual-encoder VLM, seen through what prompt learning needs.

    Prompt learning replaces some token embeddings by learned vectors, so the
    text tower must be callable on input embeddings, not only on token ids.
    """

    name: str
    device: torch.device
    preprocess: PreprocessConfig
    #: tokens before the learnable context (1 for a [SOS]/[CLS] token)
    prompt_prefix_len: int

    @property
    def fingerprint(self) -> str:
        """Architecture + weights identity, for cache keys."""
        ...

    @property
    def logit_scale(self) -> float:
        """exp of the model's learned log temperature."""
        ...

    @property
    def embed_dim(self) -> int: ...

    def encode_images(self, pixels: Tensor) -> Tensor:
        """(N, 3, H, W) preprocessed pixels -> (N, D) L2-normalised features."""
        ...

    def tokenize(self, texts: Sequence[str]) -> TokenBatch: ...

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """(C, L) token ids -> (C, L, W) input embeddings of the text tower."""
        ...

    def encode_embeddings(self, embeddings: Tensor, tokens: TokenBatch) -> Tensor:
        """Run the frozen text tower on input embeddings; (C, D) projected, unnormalised."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Reference text features through the library's own forward; (C, D), L2-normalised."""
        ...


@runtime_checkable
class SharedPrefixTower(Protocol):
    """A backend whose causal text tower can run prompts that start alike once per shared start
    (:mod:`calbench.models.shared_prefix`). Optional: BERT-style and other bidirectional towers,
    where every token sees the class name, leave it out or report ``shares_prefix`` False."""

    @property
    def shares_prefix(self) -> bool: ...

    def encode_shared_prefix(self, prefix: Tensor, suffix: Tensor, owner: Tensor, tokens: TokenBatch) -> Tensor:
        """:meth:`VLMBackend.encode_embeddings` of N prompts, each prompt ``n`` being the input embeddings
        ``prefix[owner[n]]`` (R, P, W) followed by ``suffix[n]`` (N, L - P, W); ``tokens`` as for the
        whole prompts (EOT indices count from the prompt's start). (N, D) projected, unnormalised."""
        ...


def can_share_prefix(vlm: Any) -> bool:
    """Whether ``vlm`` implements :class:`SharedPrefixTower` and its text tower allows it."""
    return isinstance(vlm, SharedPrefixTower) and bool(vlm.shares_prefix)
