"""open_clip backends: CLIP-style text towers (tiny, QuiltNet, CLIP, PLIP from an OpenAI-format
file) and Hugging Face BERT text towers (BiomedCLIP), both behind the backend protocol."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from calbench.errors import CalbenchError, warn
from calbench.models.base import PreprocessConfig, TokenBatch
from calbench.models.shared_prefix import Block, open_clip_blocks, run_blocks
from calbench.models.text import bert_tokenizer, bert_tokens, clip_tokens
from calbench.models.weights import first_file, load_state_dict_file, load_strict, model_fingerprint, state_dict_digest
from calbench.published import Setting

__all__ = [
    "OpenClipBackend",
    "OpenClipBertBackend",
    "load_open_clip",
    "openai_config",
    "state_dict_digest",
    "load_state_dict_file",
]

#: the file names open_clip's Hub models publish, preferred first
CONFIG_NAME = "open_clip_config.json"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: Hub ids of HF text towers whose architecture calbench ships, so no config download is needed
SHIPPED_TEXT_CONFIGS = {
    "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract": "biomedbert",
    "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract": "biomedbert",
}


def shipped_config(name: str) -> dict:
    """An architecture config that ships with calbench (``configs/<name>.json``)."""
    return json.loads(resources.files("calbench.models").joinpath("configs", f"{name}.json").read_text())


def _preprocess(model_cfg: dict, pp: dict) -> PreprocessConfig:
    size = pp.get("size", model_cfg["vision_cfg"].get("image_size", 224))
    return PreprocessConfig(
        size=int(size[0] if isinstance(size, (list, tuple)) else size),
        mean=tuple(pp.get("mean", PreprocessConfig.mean)),
        std=tuple(pp.get("std", PreprocessConfig.std)),
        interpolation=pp.get("interpolation", "bicubic"),
    )


def _config_id(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def openai_config(state: dict[str, Tensor]) -> dict:
    """The open_clip config of an OpenAI-format CLIP ViT state dict, read off its shapes.

    OpenAI's convention fixes the head width at 64 and uses QuickGELU, so shapes and
    key counts determine the whole architecture.
    """
    if "visual.proj" not in state:
        raise CalbenchError("only OpenAI-format ViT checkpoints (with 'visual.proj') are supported")
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["ln_final.weight"].shape[0]
    return {
        "embed_dim": int(state["text_projection"].shape[1]),
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": int(patch * grid),
            "layers": len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")}),
            "width": int(state["visual.conv1.weight"].shape[0]),
            "patch_size": int(patch),
        },
        "text_cfg": {
            "context_length": int(state["positional_embedding"].shape[0]),
            "vocab_size": int(state["token_embedding.weight"].shape[0]),
            "width": int(text_width),
            "heads": int(text_width // 64),
            "layers": len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
        },
    }


class OpenClipBackend:
    """Wraps an ``open_clip.CLIP`` so its text tower can run on learned input embeddings.

    Precision: the text tower and the learned context run in fp32 here. The published
    PLIP/QuiltNet runs cast the whole CLIP to fp16 and learned an fp16 context (CalibPrompt
    models/clip/model.py:693, trainers/classification/coop.py:112-116 under PREC "fp16"), so
    their numbers carry fp16 rounding that calbench's do not.
    """

    prompt_prefix_len = 1  # [SOS]

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        preprocess: PreprocessConfig,
        config_id: str,
        device: torch.device,
    ) -> None:
        self._check(name, model)
        self.name = name
        self.model = model.eval().requires_grad_(False).to(device)
        self.preprocess = preprocess
        self.device = device
        self._config_id = config_id
        self.tokenizer = self._make_tokenizer()

    def _check(self, name: str, model: torch.nn.Module) -> None:
        if model.text_pool_type != "argmax":
            raise ValueError(f"{name}: only EOT (argmax) text pooling is supported, got {model.text_pool_type!r}")

    def _make_tokenizer(self) -> Any:
        return open_clip.tokenizer.SimpleTokenizer(context_length=self.model.context_length)

    @classmethod
    def from_config(
        cls,
        name: str,
        config: dict[str, Any],
        device: torch.device,
        seed: int = 0,
        weights: Optional[Path] = None,
        config_id: Optional[str] = None,
        **kwargs: Any,
    ) -> OpenClipBackend:
        """Build from an open_clip config dict; random weights from ``seed`` unless ``weights`` is given."""
        cfg = dict(config)
        preprocess = _preprocess(cfg, cfg.pop("preprocess_cfg", {}))
        cfg.pop("custom_text", None)
        model_cls = open_clip.CustomTextCLIP if "hf_model_name" in cfg.get("text_cfg", {}) else open_clip.CLIP
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(**cfg)
        if weights is not None:
            state = weights if isinstance(weights, dict) else load_state_dict_file(Path(weights))
            load_strict(model, state, name, "given" if isinstance(weights, dict) else weights)
        return cls(name, model, preprocess, config_id or _config_id(config), device, **kwargs)

    @functools.cached_property
    def fingerprint(self) -> str:
        return model_fingerprint("open_clip", self.name, self._config_id, self.model)

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
        """Token ids cut after the longest prompt's EOT (exact for a causal, EOT-pooled tower)."""
        return clip_tokens(self.tokenizer, texts, self.device)[1]

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.model.token_embedding(ids.to(self.device))

    def encode_embeddings(self, embeddings: Tensor, tokens: TokenBatch) -> Tensor:
        m = self.model
        length = embeddings.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = embeddings.to(cast) + m.positional_embedding[:length].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        return self._project(m.ln_final(x[torch.arange(x.shape[0], device=x.device), tokens.eot]))

    def _project(self, x: Tensor) -> Tensor:
        """The (N, W) EOT states through the text projection."""
        proj = self.model.text_projection
        return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj

    @property
    def shares_prefix(self) -> bool:
        """A causal mask and open_clip's plain residual blocks: prompts that start alike can share that start."""
        return self._prefix_blocks() is not None

    def _prefix_blocks(self) -> Optional[list[Block]]:
        """The tower's blocks as :class:`Block`, built afresh (they refer to the current modules), or None."""
        mask = getattr(self.model, "attn_mask", None)
        causal = mask is not None and torch.equal(torch.isinf(mask), torch.isinf(mask).new_ones(mask.shape).triu(1))
        return open_clip_blocks(self.model.transformer.resblocks) if causal else None

    def encode_shared_prefix(self, prefix: Tensor, suffix: Tensor, owner: Tensor, tokens: TokenBatch) -> Tensor:
        """:meth:`encode_embeddings` with each shared prefix run once (:mod:`calbench.models.shared_prefix`)."""
        blocks = self._prefix_blocks()
        if blocks is None:
            raise ValueError(f"{self.name}: this text tower cannot share a prompt prefix")
        m = self.model
        cast = m.transformer.get_cast_dtype()
        start, length = prefix.shape[1], prefix.shape[1] + suffix.shape[1]
        positions = m.positional_embedding[:length].to(cast)
        x = run_blocks(
            blocks, prefix.to(cast) + positions[:start], suffix.to(cast) + positions[start:], owner, tokens.eot - start
        )
        return self._project(m.ln_final(x))

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        ids = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(ids).float(), dim=-1)


class OpenClipBertBackend(OpenClipBackend):
    """open_clip ``CustomTextCLIP`` with a Hugging Face BERT text tower (BiomedCLIP).

    The tower attends only to real tokens (``attention_mask``) and pools at [CLS]
    (or as its open_clip pooler says), then projects with open_clip's head.

    ``embed_twice`` (``biomedclip-published``) gives the prompt learner the frozen tokens as
    the published CalibPrompt learner embeds them: through BERT's whole embedding layer (word,
    position and token type, LayerNorm; trainers/classification/coop_biomedclip.py:82), which
    the tower then applies again to every input embedding (line 125). The learned context is
    embedded once, the frozen [CLS] and class-name tokens twice. A context started from words
    (which the published learner does not offer: coop_biomedclip.py:48-49) starts from those
    words as the frozen tokens get them. The default embeds every token once, as the tower was
    trained; hand prompts (``encode_texts``) are embedded once either way, as in the published
    zero-shot code (trainers/classification/zsclip.py:115).
    """

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        preprocess: PreprocessConfig,
        config_id: str,
        device: torch.device,
        tokenizer: Any = None,
        context_length: int = 256,
        embed_twice: bool = False,
    ) -> None:
        self._hf_tokenizer = tokenizer
        self.context_length = context_length
        self.embed_twice = embed_twice
        super().__init__(name, model, preprocess, config_id, device)

    def _check(self, name: str, model: torch.nn.Module) -> None:
        if not isinstance(model.text, open_clip.hf_model.HFTextEncoder):
            raise ValueError(f"{name}: expected a Hugging Face text tower")

    def _make_tokenizer(self) -> Any:
        if self._hf_tokenizer is None:
            raise CalbenchError(f"model {self.name!r} needs its WordPiece tokenizer (vocab.txt next to the weights)")
        return self._hf_tokenizer

    @property
    def embed_dim(self) -> int:
        return int(self.model.text.output_dim)

    @property
    def shares_prefix(self) -> bool:
        """Never: BERT attends both ways, so every token's state depends on the class name."""
        return False

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        """[CLS] .. [SEP] ids cut to the longest prompt, with the attention mask (exact: padding is masked)."""
        return bert_tokens(self.tokenizer, texts, self.context_length, self.device)[1]

    def embed_tokens(self, ids: Tensor) -> Tensor:
        embeddings = self.model.text.transformer.embeddings
        ids = ids.to(self.device)
        return embeddings(input_ids=ids) if self.embed_twice else embeddings.word_embeddings(ids)

    def encode_embeddings(self, embeddings: Tensor, tokens: TokenBatch) -> Tensor:
        text = self.model.text
        out = text.transformer(inputs_embeds=embeddings, attention_mask=tokens.attention_mask)
        return text.proj(text.pooler(out, tokens.attention_mask))

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """open_clip's own forward on the full 256-token padded ids (it masks ``id != pad``)."""
        ids = bert_tokens(self.tokenizer, texts, self.context_length, self.device)[0].to(self.device)
        return F.normalize(self.model.encode_text(ids).float(), dim=-1)


def text_config_folder(name: str, folder: Optional[Path]) -> str:
    """Where the HF text tower's config.json is: next to the weights, shipped with calbench, or a hub id."""
    if folder is not None and ((folder / name / "config.json").is_file() or (folder / name).is_file()):
        return str(folder / name)
    if name in SHIPPED_TEXT_CONFIGS:
        return str(resources.files("calbench.models").joinpath("configs", f"{SHIPPED_TEXT_CONFIGS[name]}.json"))
    return name


def with_published_architecture(name: str, model_cfg: dict, published: Mapping[str, Setting]) -> dict:
    """``model_cfg`` with the architecture settings the published runs used where it does not say
    (QuiltNet's QuickGELU: its Hub config omits the key, open_clip then builds GELU). A key the
    weights' own config sets explicitly is honoured, with a warning where it contradicts the
    published run: the user's file is the better witness of how those weights were trained."""
    out = dict(model_cfg)
    for key, setting in published.items():
        if key not in out:
            out[key] = setting.value
        elif out[key] != setting.value:
            warn(
                f"{name}: the weights' {CONFIG_NAME} sets {key} {out[key]}, the published runs used "
                f"{setting.value} ({setting.source.split(' — ')[0]}); running as the weights' config says"
            )
    return out


def load_open_clip(
    name: str,
    path: Path,
    default_config: str,
    device: torch.device,
    overrides: Optional[dict] = None,
    embed_twice: bool = False,
    published: Optional[Mapping[str, Setting]] = None,
) -> OpenClipBackend:
    """Load from a folder in open_clip's Hub layout (``open_clip_config.json`` + weights) or a state-dict file.

    Without ``open_clip_config.json`` the architecture shipped with calbench is used;
    ``overrides`` are model settings a model's source fixes outside its config file
    (OpenAI CLIP's QuickGELU); ``published`` are those the published runs used where the
    config does not say (:func:`with_published_architecture`); ``embed_twice`` is the
    published BiomedCLIP prompt embedding (see :class:`OpenClipBertBackend`), part of the cache key.
    """
    folder = path if path.is_dir() else None
    weights = first_file(path, WEIGHT_NAMES) if folder else path
    if weights is None:
        raise CalbenchError(
            f"{path} has none of {', '.join(WEIGHT_NAMES)}; pass the folder that holds {name}'s weights"
        )
    raw = (
        json.loads((path / CONFIG_NAME).read_text())
        if folder and (path / CONFIG_NAME).is_file()
        else shipped_config(default_config)
    )
    model_cfg = with_published_architecture(name, raw["model_cfg"], published or {})
    config = dict(model_cfg, **(overrides or {}), preprocess_cfg=raw.get("preprocess_cfg", {}))
    # before local paths are filled in: moving the folder keeps cache keys
    config_id = _config_id(dict(config, embed_twice=True) if embed_twice else config)
    text_cfg = dict(config.get("text_cfg", {}))
    if "hf_model_name" not in text_cfg:
        if embed_twice:
            raise CalbenchError(f"{name}: embedding prompts twice applies to BERT text towers only")
        return OpenClipBackend.from_config(name, config, device, weights=weights, config_id=config_id)
    hub_name = text_cfg["hf_model_name"]
    text_cfg["hf_model_name"] = text_config_folder(hub_name, folder)
    text_cfg["hf_model_pretrained"] = False  # the checkpoint holds the text tower's weights
    context_length = int(text_cfg.get("context_length", 77))
    for key in ("hf_tokenizer_name", "tokenizer_kwargs"):
        text_cfg.pop(key, None)
    config["text_cfg"] = text_cfg
    sources = [folder or path.parent, raw["model_cfg"]["text_cfg"].get("hf_tokenizer_name", hub_name)]
    tokenizer = bert_tokenizer(sources)
    return OpenClipBertBackend.from_config(
        name,
        config,
        device,
        weights=weights,
        config_id=config_id,
        tokenizer=tokenizer,
        context_length=context_length,
        embed_twice=embed_twice,
    )
