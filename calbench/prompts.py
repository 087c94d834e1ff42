"""CoOp prompt learner (Zhou et al., IJCV 2022): learned context vectors before each class name.

Prompt i is [prefix] ctx_1 ... ctx_M <class name i> . [EOT], where [prefix] is the
backend's start token(s) and ctx are free vectors in the token-embedding space,
shared by all classes or one set per class. Only ctx is trained. A trained context is saved
as a small safetensors file (:func:`save_prompt`) and scored later by `calbench evaluate`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calbench import streams
from calbench.atomic import save_safetensors_atomic
from calbench.errors import CalbenchError
from calbench.models.base import TokenBatch, VLMBackend, can_share_prefix
from calbench.published import default

PLACEHOLDER = "X"


class PromptLearner(nn.Module):
    """Learnable context for ``classnames`` on a frozen ``vlm``.

    ``ctx_init`` (e.g. "a photo of a") starts the context from that phrase's token
    embeddings and sets ``n_ctx`` to its token count, so before training the
    prompts are exactly the hand prompt "<ctx_init> <class name>.". With ``learned`` only
    the phrase's first ``learned`` tokens are context and the rest stays frozen text, as
    CoOp and TPT do with ``n_ctx`` = the phrase's word count (CoOp trainers/coop.py:75,79).
    """

    def __init__(
        self,
        vlm: VLMBackend,
        classnames: Sequence[str],
        n_ctx: int = default("train", "n_ctx"),
        ctx_init: Optional[str] = None,
        class_specific: bool = False,
        seed: Optional[int] = None,
        learned: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.vlm = vlm
        self.classnames = list(classnames)
        self.class_specific = class_specific
        start = vlm.prompt_prefix_len
        if ctx_init:
            ctx_init = ctx_init.strip()
            init_tokens = vlm.tokenize([ctx_init])
            n_ctx = int(init_tokens.eot[0]) - start  # tokens between the prefix and EOT
            n_ctx = n_ctx if learned is None else max(1, min(n_ctx, learned))
            with torch.no_grad():
                ctx = vlm.embed_tokens(init_tokens.ids)[0, start : start + n_ctx].float().clone()
            if class_specific:
                ctx = ctx.unsqueeze(0).repeat(len(self.classnames), 1, 1)
            prefix = ctx_init
        else:
            width = vlm.embed_tokens(vlm.tokenize([PLACEHOLDER]).ids).shape[-1]
            shape = (len(self.classnames), n_ctx, width) if class_specific else (n_ctx, width)
            # the context's own stream: not the batch order's draws of the same run seed
            generator = (
                torch.Generator().manual_seed(streams.torch_seed("context-init", seed)) if seed is not None else None
            )
            ctx = torch.randn(shape, generator=generator) * 0.02  # CoOp's N(0, 0.02^2)
            prefix = " ".join([PLACEHOLDER] * n_ctx)
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.ctx = nn.Parameter(ctx.to(vlm.device))
        self.prompts = [f"{prefix} {name}." for name in self.classnames]
        self.tokens = vlm.tokenize(self.prompts)
        with torch.no_grad():
            embeddings = vlm.embed_tokens(self.tokens.ids)
        # frozen pieces around the context: [prefix] and "<class name> . [EOT] ..."
        self.register_buffer("token_prefix", embeddings[:, :start].clone(), persistent=False)
        self.register_buffer("token_suffix", embeddings[:, start + n_ctx :].clone(), persistent=False)
        self.shared_len = self._shared_length()

    def _shared_length(self) -> Optional[int]:
        """How many leading positions all C prompts share (start tokens, the unified context and any frozen
        tokens common to every class) when the tower can run them once per pass; None otherwise (class-specific
        context, one class, a tower that is not causal)."""
        if self.class_specific or len(self.classnames) < 2 or not can_share_prefix(self.vlm):
            return None
        ids = self.tokens.ids
        common = int((ids == ids[:1]).all(dim=0).long().cumprod(dim=0).sum())
        length = min(common, int(self.tokens.eot.min()))  # every prompt keeps its EOT in its own part
        return length if length >= self.vlm.prompt_prefix_len + self.n_ctx else None

    def embeddings(self) -> Tensor:
        """(C, L, W) input embeddings of the C prompts: frozen prefix, learned context, frozen suffix."""
        ctx = self.ctx if self.class_specific else self.ctx.unsqueeze(0).expand(len(self.classnames), -1, -1)
        return torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix], dim=1)

    def text_features(self) -> Tensor:
        """(C, D) L2-normalised class text features through the frozen text tower."""
        return _encode([self], self.tokens)


def share_text_pass(a: PromptLearner, b: PromptLearner) -> bool:
    """Whether two learners' prompts can go through one text-tower pass: the same frozen model and
    prompts of the same token length (the rows of one batch share a length; every row keeps its own
    EOT position and attention mask, so stacking changes no row's result)."""
    return a.vlm is b.vlm and a.tokens.ids.shape[1] == b.tokens.ids.shape[1]


def text_features_together(learners: Sequence[PromptLearner]) -> list[Tensor]:
    """Each learner's (C, D) text features from one pass of their shared frozen text tower over the
    R x C prompts stacked (learners that :func:`share_text_pass`). The tower treats rows
    independently, so learner r's features, and the gradient its loss sends to its own context,
    are those of its own pass (up to float rounding of the larger matrix products)."""
    if len(learners) == 1:
        return [learners[0].text_features()]
    first = learners[0]
    if not all(share_text_pass(first, other) for other in learners[1:]):
        raise ValueError("prompt learners in one text pass need the same model and prompt length")
    masks = [learner.tokens.attention_mask for learner in learners]
    tokens = TokenBatch(
        torch.cat([learner.tokens.ids for learner in learners]),
        torch.cat([learner.tokens.eot for learner in learners]),
        None if masks[0] is None else torch.cat(masks),
    )
    return list(_encode(learners, tokens).split([len(learner.classnames) for learner in learners]))


def _encode(learners: Sequence[PromptLearner], tokens: TokenBatch) -> Tensor:
    """The stacked prompts' L2-normalised features in one pass. When every learner's prompts share a start
    (:attr:`PromptLearner.shared_len`), that start runs once per learner and the rest of each prompt
    attends to its own learner's (:mod:`calbench.models.shared_prefix`); otherwise the whole prompts run."""
    first = learners[0]
    shared = [learner.shared_len for learner in learners]
    if None in shared:
        embeddings = torch.cat([learner.embeddings() for learner in learners])
        return F.normalize(first.vlm.encode_embeddings(embeddings, tokens).float(), dim=-1)
    length = min(length for length in shared if length is not None)
    parts = [learner.embeddings() for learner in learners]
    prefix = torch.cat([part[:1, :length] for part in parts])
    suffix = torch.cat([part[:, length:] for part in parts])
    sizes = torch.tensor([len(learner.classnames) for learner in learners], device=prefix.device)
    owner = torch.repeat_interleave(torch.arange(len(learners), device=prefix.device), sizes)
    features = first.vlm.encode_shared_prefix(prefix, suffix, owner, tokens)  # type: ignore[attr-defined]
    return F.normalize(features.float(), dim=-1)


def save_prompt(
    path: Path, learner: PromptLearner, train_config: dict[str, Any], extra: Optional[dict[str, Any]] = None
) -> None:
    """Save the learned context (safetensors) with everything needed to rebuild the prompts.

    ``extra`` records how it was trained (method, parameters, model and dataset names, a
    fitted temperature), which `calbench evaluate` reads back.
    """
    meta = {
        "model": learner.vlm.fingerprint,
        "classnames": json.dumps(learner.classnames),
        "train_config": json.dumps(train_config),
        "n_ctx": str(learner.n_ctx),
        "class_specific": str(learner.class_specific),
        "ctx_init": learner.ctx_init or "",
        "extra": json.dumps(extra or {}),
    }
    save_safetensors_atomic(Path(path), {"ctx": learner.ctx.detach()}, meta)


def read_prompt_info(path: Path) -> dict[str, Any]:
    """A prompt file's metadata, decoded, without loading any model: what `load_prompt` needs to check."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CalbenchError(f"prompt file {path} does not exist; train one with `calbench train`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        info = {**meta, "classnames": json.loads(meta["classnames"]), "extra": json.loads(meta.get("extra", "{}"))}
    except (KeyError, ValueError, OSError, SafetensorError) as exc:
        raise CalbenchError(
            f"{path} is not a prompt file written by `calbench train` ({exc}); train one again"
        ) from None
    return info


def load_prompt(path: Path, vlm: VLMBackend) -> PromptLearner:
    """Rebuild a saved prompt learner on ``vlm`` (which must be the model it was trained on)."""
    from safetensors import safe_open

    info = read_prompt_info(path)
    if info["model"] != vlm.fingerprint:
        raise CalbenchError(f"{path} was trained on model {info['model']}, not {vlm.fingerprint}; load the same model")
    with safe_open(str(path), framework="pt") as f:
        if "ctx" not in f.keys():
            raise CalbenchError(f"{path} holds no learned context (tensor 'ctx'); train it again with `calbench train`")
        ctx = f.get_tensor("ctx")
    learner = PromptLearner(
        vlm,
        info["classnames"],
        n_ctx=int(info["n_ctx"]),
        ctx_init=info["ctx_init"] or None,
        class_specific=info["class_specific"] == "True",
        learned=int(info["n_ctx"]),  # a context of a phrase's first tokens comes back as such
    )
    _check_context(path, ctx, tuple(learner.ctx.shape))
    with torch.no_grad():
        learner.ctx.copy_(ctx.to(learner.ctx.device))
    return learner


def _check_context(path: Path, ctx: Tensor, shape: tuple[int, ...]) -> None:
    """Refuse a stored context that cannot be this file's prompts: ``copy_`` would broadcast a (W,) context
    over every token or fail deep in the text tower, and a NaN context scores every image alike."""
    if tuple(ctx.shape) != shape:
        raise CalbenchError(
            f"{path} holds a context of shape {tuple(ctx.shape)}, but its model and settings need {shape}; "
            "the file is damaged: train it again with `calbench train`"
        )
    if not ctx.is_floating_point() or not bool(torch.isfinite(ctx).all()):
        raise CalbenchError(f"{path} holds a context that is not finite numbers; train it again with `calbench train`")
