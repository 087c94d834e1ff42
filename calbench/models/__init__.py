"""Model registry and the one entry point, :func:`load_vlm`.

Architectures are data (``configs/*.json`` in open_clip's format); each registry
entry says how to build the model and where its weights come from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import torch

from calbench.models.base import PreprocessConfig, TokenBatch, VLMBackend
from calbench.registry import Registry

__all__ = ["ModelSpec", "PreprocessConfig", "TokenBatch", "VLMBackend", "MODELS", "availability", "list_models", "load_vlm", "resolve_device"]


@dataclass(frozen=True)
class ModelSpec:
    """What a user needs to know about a model, and how to build it."""

    name: str
    modality: str
    source: str
    description: str
    build: Callable[[torch.device, Optional[Path]], VLMBackend]
    #: () -> (weights usable without network?, how to get them when not)
    available: Callable[[], tuple[bool, str]] = lambda: (True, "")


MODELS: Registry[ModelSpec] = Registry("model")


def list_models() -> list[str]:
    return MODELS.names()


def availability(name: str) -> tuple[bool, str]:
    """Whether ``name``'s weights can be loaded now, and if not, the command or source that provides them."""
    return MODELS.get(name).available()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' means CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_vlm(name: str, device: str | torch.device = "cpu", weights: Optional[str | Path] = None) -> VLMBackend:
    """Build model ``name`` on ``device``, frozen, with weights from ``weights`` if given."""
    spec = MODELS.get(name)
    return spec.build(resolve_device(device), Path(weights) if weights is not None else None)


def _config(name: str) -> dict:
    return json.loads(resources.files("calbench.models").joinpath("configs", f"{name}.json").read_text())


def _build_tiny(device: torch.device, weights: Optional[Path]) -> VLMBackend:
    from calbench.models.open_clip_backend import OpenClipBackend

    return OpenClipBackend.from_config("tiny", _config("tiny"), device, seed=0, weights=weights)


MODELS.add(
    "tiny",
    ModelSpec(
        name="tiny",
        modality="demo",
        source="built in (random weights from seed 0)",
        description="A 2-layer open_clip ViT/text transformer for demos and tests; not a medical model.",
        build=_build_tiny,
    ),
)
