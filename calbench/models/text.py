"""Tokenisation shared by the backends, cut to the longest real prompt.

Two kinds of text tower:

- CLIP-style (causal, pooled at EOT): a token can only see tokens before it, so the
  tokens after the EOT token cannot change the pooled feature;
- BERT-style (bidirectional, padding masked out of attention, pooled at [CLS] or by
  a masked mean): masked padding cannot change any real token's state.

Either way running the tower on ``max(real length)`` tokens instead of the context
length (77, 256) is exact, and much cheaper. The one exception is MedCLIP as the published
CalibPrompt code runs it: its mean over all positions counts the padding, so its prompts
keep their full padded length (``cut=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from calbench.errors import CalbenchError
from calbench.models.base import TokenBatch


def clip_tokens(tokenizer: Any, texts: Sequence[str], device: torch.device) -> tuple[Tensor, TokenBatch]:
    """(full ids, TokenBatch cut after the longest prompt's EOT) for CLIP's BPE tokenizer."""
    full = tokenizer(list(texts))
    eot = full.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
    return full, TokenBatch(full[:, : int(eot.max()) + 1].to(device), eot.to(device))


def bert_tokens(
    tokenizer: Any, texts: Sequence[str], context_length: int, device: torch.device, cut: bool = True
) -> tuple[Tensor, TokenBatch]:
    """(full ids padded to ``context_length``, TokenBatch cut to the longest prompt, or not cut).

    ``eot`` is the [SEP] index, so a prompt's real tokens are [CLS] .. [SEP] and the
    prompt learner's context sits between them.
    """
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(dim=1)
    keep = int(lengths.max()) if cut else ids.shape[1]
    batch = TokenBatch(ids[:, :keep].to(device), (lengths - 1).to(device), mask[:, :keep].to(device))
    return ids, batch


def bert_tokenizer(sources: Sequence[Union[str, Path]]) -> Any:
    """A WordPiece tokenizer from the first source that has one: a folder with vocab.txt, or a hub id (HF cache)."""
    from transformers import BertTokenizerFast

    from calbench.models.weights import offline

    def usable(tokenizer: Any) -> bool:
        # without vocabulary files, recent transformers build a tokenizer of special tokens only
        return len(tokenizer.get_vocab()) > len(tokenizer.all_special_tokens)

    tried = []
    for source in sources:
        if isinstance(source, Path):
            if (source / "vocab.txt").is_file() or (source / "tokenizer.json").is_file():
                tokenizer = BertTokenizerFast.from_pretrained(str(source))
                if usable(tokenizer):
                    return tokenizer
            tried.append(str(source))
            continue
        try:
            tokenizer = BertTokenizerFast.from_pretrained(source, local_files_only=offline())
            if usable(tokenizer):
                return tokenizer
        except Exception:
            pass
        tried.append(f"hf-hub:{source}")
    raise CalbenchError(
        f"no tokenizer found (looked in {', '.join(tried)}); put the model's vocab.txt next to its weights "
        f"or download it once with internet"
    )
