"""The built-in demo models: ``tiny``, a small CLIP pre-trained on synthetic H&E-like tiles
(:mod:`calbench.models.train_tiny`) whose weights ship with calbench, and ``tiny-random``, a smaller
architecture of the same family with random weights from a seed, for fast tests of the machinery.

The pre-trained text tower only ever saw the 84 tokens of its captions; every other row of
its 49,408-token embedding is zero. The shipped file keeps the trained rows and their token ids
(:func:`pack`), which keeps it small; :func:`unpack` restores the full state dict.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from calbench.errors import CalbenchError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from calbench.models.base import VLMBackend

#: the shipped weights, inside the calbench.models package
SHIPPED = ("pretrained", "tiny.safetensors")
ROW_IDS = "token_embedding.row_ids"
ROWS = "token_embedding.rows"
EMBEDDING = "token_embedding.weight"


def shipped_weights() -> Path:
    """Path of the shipped ``tiny`` weights file."""
    return Path(str(resources.files("calbench.models").joinpath(*SHIPPED)))


def pack(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with the token embedding reduced to its non-zero rows and their token ids."""
    import torch

    table = state[EMBEDDING]
    ids = torch.nonzero(table.abs().sum(dim=1) > 0).flatten()
    packed = {k: v for k, v in state.items() if k != EMBEDDING}
    packed[ROW_IDS] = ids.to(torch.int64)
    packed[ROWS] = table[ids].clone()
    return packed


def unpack(tensors: dict[str, Tensor], vocab_size: int) -> dict[str, Tensor]:
    """The full state dict of a :func:`pack`-ed one (zero rows for the tokens it left out); others as they are."""
    import torch

    if ROW_IDS not in tensors:
        return tensors
    rows, ids = tensors[ROWS], tensors[ROW_IDS]
    table = torch.zeros(vocab_size, rows.shape[1], dtype=rows.dtype)
    table[ids] = rows
    state = {k: v for k, v in tensors.items() if k not in (ROW_IDS, ROWS)}
    state[EMBEDDING] = table
    return state


def build_tiny(path: Optional[Path], device: torch.device) -> VLMBackend:
    """``tiny`` from ``path`` (a full or packed state dict) or, by default, from the shipped file."""
    from calbench.models.open_clip_backend import OpenClipBackend, shipped_config
    from calbench.models.weights import load_state_dict_file

    config = shipped_config("tiny")
    file = shipped_weights() if path is None else Path(path)
    if path is None and not file.is_file():
        raise CalbenchError(f"the shipped tiny weights {file} are missing; reinstall calbench")
    state = unpack(load_state_dict_file(file), config["text_cfg"]["vocab_size"])
    return OpenClipBackend.from_config("tiny", config, device, weights=state)


def build_tiny_random(path: Optional[Path], device: torch.device) -> VLMBackend:
    """``tiny-random``: random weights from seed 0 (or weights from ``path``), for fast tests of the machinery."""
    from calbench.models.open_clip_backend import OpenClipBackend, shipped_config

    return OpenClipBackend.from_config("tiny-random", shipped_config("tiny-random"), device, seed=0, weights=path)
