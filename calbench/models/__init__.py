"""Model registry and the one entry point, :func:`load_vlm`.

Architectures are data (``configs/*.json``); each registry entry says what the model is
(modality, license, prompt template family, resolution), where its weights come from, and
how to build it from a local file or folder. :mod:`calbench.models.weights` finds that file
or folder: ``--weights``, then ``$CALBENCH_WEIGHTS/<model>/``, then the published source.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from calbench.errors import CalbenchError
from calbench.models.base import PreprocessConfig, TokenBatch, VLMBackend
from calbench.models.weights import (
    WEIGHTS_ENV,
    HubSource,
    Source,
    UrlSource,
    load_state_dict_file,
    locate,
    trusting_code,
)
from calbench.registry import Registry

if TYPE_CHECKING:  # torch is imported when a model is built, not to list models or their modality
    import torch

__all__ = [
    "ModelSpec",
    "PreprocessConfig",
    "TokenBatch",
    "VLMBackend",
    "MODELS",
    "availability",
    "fetch",
    "list_models",
    "load_vlm",
    "resolve_device",
]


@dataclass(frozen=True)
class ModelSpec:
    """What a user needs to know about a model, and how to build it from local weights."""

    name: str
    modality: str  # histopathology, radiology, general, demo
    source: str  # hub id or URL, as a user would look it up
    license: str
    template_family: str  # which prompt templates suit it (see calbench.data)
    resolution: int  # input image side in pixels
    description: str
    #: (file or folder, or None for built-in weights, device) -> backend
    build: Callable[[Optional[Path], torch.device], VLMBackend]
    #: the published weights; further sources (e.g. a tokenizer) follow
    sources: tuple[Source, ...] = ()
    #: the model this entry runs differently (same weights, its own name in results and cache
    #: keys); `compare --all` and modality-wide tuning run the models, not their variants
    variant_of: str = ""
    #: how it runs differently from the published CalibPrompt code (empty: as published, or not a published
    #: model); the report marks a pair's numbers "(published)" only where this is empty
    unlike_published: str = ""

    @property
    def weights_name(self) -> str:
        """The model whose ``$CALBENCH_WEIGHTS/<name>/`` folder holds the weights (a variant shares its model's)."""
        return self.variant_of or self.name

    @property
    def fetch_command(self) -> str:
        return f"calbench models fetch {self.weights_name}"


MODELS: Registry[ModelSpec] = Registry("model")


def list_models() -> list[str]:
    return MODELS.names()


def published_model(model: Optional[str]) -> Optional[str]:
    """The model whose published settings and numbers ``model`` takes: a variant (``medclip-masked``) its
    model's; a name calbench does not register, itself."""
    return MODELS.get(model).weights_name if model is not None and model in MODELS else model


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' means CUDA when present, else CPU; an unusable device is a user error."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise CalbenchError(f"unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and (
        not torch.cuda.is_available() or (resolved.index or 0) >= torch.cuda.device_count()
    ):
        raise CalbenchError(
            f"device {str(device)!r} is not available here (CUDA devices: {torch.cuda.device_count()}); use --device auto or cpu"
        )
    return resolved


def load_vlm(
    name: str,
    device: str | torch.device = "cpu",
    weights: Optional[str | Path] = None,
    trust_weights: bool = False,
) -> VLMBackend:
    """Build model ``name`` on ``device``, frozen, with weights from ``weights`` or the model's own source.

    ``trust_weights`` also accepts TorchScript archives, whose embedded code runs when they are
    loaded; without it weights are read as tensors only.
    """
    spec = MODELS.get(name)
    source = spec.sources[0] if spec.sources else None
    path = (
        Path(weights)
        if weights is not None and source is None
        else locate(spec.weights_name, source, weights, spec.fetch_command)
    )
    with trusting_code(trust_weights):
        return spec.build(path, resolve_device(device))


def availability(name: str) -> tuple[bool, str]:
    """Whether ``name`` loads without network (True, where from), or (False, how to get it)."""
    spec = MODELS.get(name)
    if not spec.sources:
        return True, "built in"
    home, folder = os.environ.get(WEIGHTS_ENV), spec.weights_name
    if home and (Path(home) / folder).is_dir():
        return True, str(Path(home) / folder)
    found = [source.resolve(download=False) for source in spec.sources]
    if all(found):
        return True, str(found[0])
    return False, f"run `{spec.fetch_command}` or download {spec.sources[0].hint()} into ${WEIGHTS_ENV}/{folder}/"


def fetch(name: str) -> Path:
    """Download ``name``'s weights (and tokenizer) into the library caches; the folder of its weights."""
    spec = MODELS.get(name)
    if not spec.sources:
        return Path("built in")
    paths = [source.resolve(download=True) for source in spec.sources]
    return paths[0]


# ---------------------------------------------------------------- builders


def _build_tiny(path: Optional[Path], device: torch.device) -> VLMBackend:
    from calbench.models.tiny import build_tiny

    return build_tiny(path, device)


def _build_tiny_random(path: Optional[Path], device: torch.device) -> VLMBackend:
    from calbench.models.tiny import build_tiny_random

    return build_tiny_random(path, device)


def _open_clip_builder(
    name: str, config: str, overrides: Optional[dict] = None, embed_twice: bool = False
) -> Callable[[Optional[Path], torch.device], VLMBackend]:
    def build(path: Optional[Path], device: torch.device) -> VLMBackend:
        from calbench import published
        from calbench.models.open_clip_backend import load_open_clip

        architecture = published.architecture(name)  # what the published runs used (QuiltNet's QuickGELU)
        return load_open_clip(name, path, config, device, overrides, embed_twice, published=architecture)

    return build


def _build_plip(path: Optional[Path], device: torch.device) -> VLMBackend:
    """A ``save_pretrained`` folder (the Hub's vinid/plip), or an OpenAI-CLIP-format file: a state dict,
    or OpenAI's TorchScript ``.pt`` (e.g. ``plip_vit_b32.pt``), which loads only with ``trust_weights``."""
    from calbench.errors import CalbenchError
    from calbench.models.hf_clip_backend import HFClipBackend
    from calbench.models.open_clip_backend import OpenClipBackend, openai_config

    if path.is_dir():
        return HFClipBackend.from_folder("plip", path, device)
    state = load_state_dict_file(path)
    if "visual.proj" not in state:
        raise CalbenchError(
            f"{path} is not an OpenAI-CLIP-format state dict; pass that file or a folder saved with save_pretrained"
        )
    state = {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    return OpenClipBackend.from_config("plip", openai_config(state), device, weights=state)


def _medclip_builder(name: str, variant: Optional[str] = None) -> Callable[[Optional[Path], torch.device], VLMBackend]:
    """MedCLIP fed as ``configs/medclip.json`` says, or with ``configs/<variant>.json`` laid over it."""

    def build(path: Optional[Path], device: torch.device) -> VLMBackend:
        from calbench.models.medclip import MedCLIPBackend

        return MedCLIPBackend.from_path(name, path, device, variant=variant)

    return build


OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CLIP_LICENSE = "MIT (OpenAI CLIP)"

MODELS.add(
    "tiny",
    ModelSpec(
        name="tiny",
        modality="demo",
        source="built in (pre-trained on synthetic H&E-like tiles, shipped with calbench)",
        license="MIT (calbench)",
        template_family="general",
        resolution=64,
        description=(
            "A small open_clip ViT/text transformer pre-trained contrastively on synthetic H&E-like tiles and "
            "their captions (python -m calbench.models.train_tiny); a demo model, not a medical one."
        ),
        build=_build_tiny,
    ),
)
MODELS.add(
    "tiny-random",
    ModelSpec(
        name="tiny-random",
        modality="test",  # no dataset has it: `compare --all` and modality-wide tuning leave it out
        source="built in (random weights from seed 0)",
        license="MIT (calbench)",
        template_family="general",
        resolution=32,
        description="A 2-layer open_clip ViT/text transformer with random weights, for fast tests of the machinery.",
        build=_build_tiny_random,
    ),
)
MODELS.add(
    "plip",
    ModelSpec(
        name="plip",
        modality="histopathology",
        source="hf-hub:vinid/plip",
        license="research use only (see the PLIP model card)",
        template_family="histopathology",
        resolution=224,
        description="PLIP (Huang et al., Nat. Med. 2023): CLIP ViT-B/32 fine-tuned on OpenPath Twitter image-text pairs.",
        build=_build_plip,
        sources=(
            HubSource(
                "vinid/plip",
                one_of=("model.safetensors", "pytorch_model.bin"),
                required=("config.json",),
                optional=("preprocessor_config.json",),
            ),
        ),
    ),
)
for _name, _repo, _patch in (
    ("quiltnet", "wisdomik/QuiltNet-B-32", 32),
    ("quiltnet-b16", "wisdomik/QuiltNet-B-16", 16),
):
    MODELS.add(
        _name,
        ModelSpec(
            name=_name,
            modality="histopathology",
            source=f"hf-hub:{_repo}",
            license="MIT, research use only (see the Quilt-1M model card)",
            template_family="histopathology",
            resolution=224,
            description=f"QuiltNet (Ikezogwo et al., NeurIPS 2023): open_clip ViT-B/{_patch} trained on Quilt-1M.",
            build=_open_clip_builder(_name, f"quiltnet-b{_patch}"),
            sources=(HubSource(_repo, one_of=OPEN_CLIP_WEIGHTS, optional=("open_clip_config.json",)),),
        ),
    )
MODELS.add(
    "biomedclip",
    ModelSpec(
        name="biomedclip",
        modality="radiology",
        source="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        license="MIT, research use only (see the BiomedCLIP model card)",
        template_family="radiology",
        resolution=224,
        description="BiomedCLIP (Zhang et al., NEJM AI 2024): ViT-B/16 + PubMedBERT (256 tokens) trained on PMC-15M.",
        build=_open_clip_builder("biomedclip", "biomedclip"),
        unlike_published="prompt tokens embedded once; the published learner embeds them twice (biomedclip-published)",
        sources=(
            HubSource(
                "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
                one_of=OPEN_CLIP_WEIGHTS,
                required=("open_clip_config.json",),
                optional=BERT_TOKENIZER_FILES,
            ),
        ),
    ),
)
MODELS.add(
    "medclip",
    ModelSpec(
        name="medclip",
        modality="radiology",
        source="https://github.com/RyanWangZf/MedCLIP/raw/main/medclip/medclip_vit_weight.txt (names the zip)",
        license="research use only (see the MedCLIP repository)",
        template_family="radiology",
        resolution=224,
        description=(
            "MedCLIP-ViT (Wang et al., EMNLP 2022): Swin-Tiny + Bio_ClinicalBERT trained on CheXpert and MIMIC-CXR; "
            "run as the published CalibPrompt code runs it (prompts padded to its length and averaged over every "
            "position, CLIP's pixel mean and std)."
        ),
        build=_medclip_builder("medclip"),
        sources=(
            UrlSource(
                "https://github.com/RyanWangZf/MedCLIP/raw/main/medclip/medclip_vit_weight.txt",
                "medclip-vit",
                "pytorch_model.bin",
                pointer=True,
            ),
            HubSource(
                "emilyalsentzer/Bio_ClinicalBERT",
                one_of=("vocab.txt",),
                optional=("tokenizer_config.json", "config.json"),
            ),
        ),
    ),
)
# variants: the same weights run another way, under their own name in results and cache keys
MODELS.add(
    "biomedclip-published",
    replace(
        MODELS.get("biomedclip"),
        name="biomedclip-published",
        description=(
            "BiomedCLIP with the published CalibPrompt prompt learner's embedding: the frozen prompt tokens go "
            "through BERT's embedding layer twice, the learned context once."
        ),
        build=_open_clip_builder("biomedclip-published", "biomedclip", embed_twice=True),
        variant_of="biomedclip",
        unlike_published="",
    ),
)
MODELS.add(
    "medclip-masked",
    replace(
        MODELS.get("medclip"),
        name="medclip-masked",
        description=(
            "MedCLIP run as its own code runs it: text averaged over the real tokens only (padding-free), "
            "MedCLIP's pixel mean and std and its logit-scale clamp."
        ),
        build=_medclip_builder("medclip-masked", variant="medclip-masked"),
        variant_of="medclip",
        unlike_published="MedCLIP's own pooling, pixel statistics and clamp, not the published code's (medclip)",
    ),
)
for _name, _repo, _patch in (
    ("clip-b32", "timm/vit_base_patch32_clip_224.openai", 32),
    ("clip-b16", "timm/vit_base_patch16_clip_224.openai", 16),
):
    MODELS.add(
        _name,
        ModelSpec(
            name=_name,
            modality="general",
            source=f"hf-hub:{_repo}",
            license=CLIP_LICENSE,
            template_family="general",
            resolution=224,
            description=f"OpenAI CLIP ViT-B/{_patch} (Radford et al., ICML 2021) through open_clip: the general-domain reference.",
            build=_open_clip_builder(_name, _name, overrides={"quick_gelu": True}),
            sources=(HubSource(_repo, one_of=OPEN_CLIP_WEIGHTS, optional=("open_clip_config.json",)),),
        ),
    )
