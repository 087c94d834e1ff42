"""One shared prompt prefix per run through a causal text tower, instead of one copy per class.

CoOp prompts with one context for every class, ``[SOS] ctx_1 .. ctx_M <class name> . [EOT]``, agree
on their first ``P = 1 + M`` tokens. In a causal (CLIP-style) tower the state at position ``i``
depends only on positions ``0 .. i`` (the causal mask of Radford et al. 2021, Sec. 2.4), so those
``P`` states agree in every layer for all C prompts. Here they are computed once, and each prompt's
remaining tokens attend to the keys and values of [shared prefix ; its own tokens] (scaled
dot-product attention, Vaswani et al. 2017 eq. 1, with the causal mask over the joined sequence).
That is the same function as the full pass; the prefix's gradient is the sum of what the C prompts
send it, as through C copies. For the same reason a prompt's tokens after its EOT (the padding of
shorter class names) cannot reach its feature, so they are dropped: the tower processes ``P`` plus
each prompt's own ``EOT - P + 1`` tokens instead of ``C L``.

A batch may hold the prompts of several runs (R prefixes, each with its own suffixes): ``owner``
says which prefix each suffix continues, and a suffix attends to that prefix only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Block:
    """One pre-LN residual block of a text tower: ``x + out(attn(norm1(x)))``, then ``x + mlp(norm2(x))``."""

    norm1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]  # (B, L, W) -> queries, keys, values, each (B, L, W)
    out: Callable[[Tensor], Tensor]  # the attention's output projection, with any layer scale
    norm2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]  # the MLP, with any layer scale
    heads: int
    scale: Optional[float] = None  # None: 1 / sqrt(head width)


def _split(x: Tensor, heads: int) -> Tensor:
    """(B, L, W) -> (B, heads, L, W / heads)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """(B, heads, L, head width) -> (B, L, W)."""
    return x.transpose(1, 2).flatten(2)


def suffix_mask(prefix_len: int, suffix_len: int, device: torch.device) -> Tensor:
    """(S, P + S) boolean mask, True where attending is allowed: suffix token ``i`` (position ``P + i``)
    sees the whole prefix and suffix tokens ``0 .. i``, as the causal mask lets it in the full prompt."""
    own = torch.ones(suffix_len, suffix_len, dtype=torch.bool, device=device).tril()
    return torch.cat([own.new_ones(suffix_len, prefix_len), own], dim=1)


@dataclass(frozen=True)
class Layout:
    """Where the tokens of R prefixes (P tokens each) and N suffixes lie in a pass's rows.

    The rows hold the R P prefix tokens, then each suffix's tokens up to and including its EOT only:
    a causal tower's later (padding) tokens cannot reach any EOT state, so their rows are never
    computed. Attention alone needs the suffixes as an (N, S) grid; ``keep`` places the packed rows in it.
    """

    prefixes: int
    prefix_len: int
    owner: Tensor  # (N,) the prefix each suffix continues
    ends: Tensor  # (N,) each suffix's EOT offset within the suffix
    suffix_len: int  # S: the grid's width (the longest suffix)
    keep: Tensor  # (K,) the grid cells (n S + i, i <= ends[n]) of the packed suffix rows, in order

    @classmethod
    def of(cls, prefixes: int, prefix_len: int, owner: Tensor, ends: Tensor, suffix_len: int) -> Layout:
        cells = torch.arange(suffix_len, device=owner.device)
        keep = (cells <= ends.unsqueeze(1)).flatten().nonzero().squeeze(1)
        return cls(prefixes, prefix_len, owner, ends, suffix_len, keep)

    @property
    def cut(self) -> int:
        """The number of prefix rows, which come first."""
        return self.prefixes * self.prefix_len

    @property
    def last(self) -> Tensor:
        """(N,) each suffix's EOT row among all rows."""
        starts = torch.cumsum(self.ends + 1, 0) - (self.ends + 1)
        return self.cut + starts + self.ends

    def grid(self, rows: Tensor) -> Tensor:
        """Packed suffix rows (K, W) as the (N, S, W) grid, zero past each EOT (cells no real query sees)."""
        n = self.owner.shape[0]
        full = rows.new_zeros(n * self.suffix_len, rows.shape[-1]).index_copy(0, self.keep, rows)
        return full.unflatten(0, (n, self.suffix_len))


def block_step(block: Block, x: Tensor, layout: Layout) -> Tensor:
    """One block on the token states ``x`` (rows as :class:`Layout` says). Every per-token operation
    (norms, projections, MLP) runs once on all rows together: one matrix product per weight, and each
    row's rounding the same whether a pass holds one run or many."""
    cut, heads = layout.cut, block.heads
    q, k, v = block.qkv(block.norm1(x))
    qp, kp, vp = (_split(t[:cut].unflatten(0, (layout.prefixes, -1)), heads) for t in (q, k, v))
    ks, vs = (_split(layout.grid(t[cut:]), heads) for t in (k, v))
    # index_select, not kp[owner]: its backward is an index_add, not a sorting index_put (5% of a 12-run step)
    keys = torch.cat([kp.index_select(0, layout.owner), ks], dim=2)
    values = torch.cat([vp.index_select(0, layout.owner), vs], dim=2)
    prefix = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=block.scale)
    mask = suffix_mask(layout.prefix_len, layout.suffix_len, x.device)
    suffix = F.scaled_dot_product_attention(
        _split(layout.grid(q[cut:]), heads), keys, values, attn_mask=mask, scale=block.scale
    )
    x = x + block.out(
        torch.cat([_merge(prefix).flatten(0, 1), _merge(suffix).flatten(0, 1).index_select(0, layout.keep)])
    )
    return x + block.mlp(block.norm2(x))


def run_blocks(blocks: Sequence[Block], prefix: Tensor, suffix: Tensor, owner: Tensor, ends: Tensor) -> Tensor:
    """Each suffix's (N, W) output state at its EOT after ``blocks``, from input states (positions added)
    of R prefixes (R, P, W) and N suffixes (N, S, W), suffix ``n`` continuing prefix ``owner[n]`` and
    ending (EOT) at offset ``ends[n]``; tokens past an EOT are not computed."""
    layout = Layout.of(prefix.shape[0], prefix.shape[1], owner, ends, suffix.shape[1])
    x = torch.cat([prefix.flatten(0, 1), suffix.flatten(0, 1).index_select(0, layout.keep)])
    for block in blocks:
        x = block_step(block, x, layout)
    return x.index_select(0, layout.last)


def open_clip_blocks(resblocks: Sequence[nn.Module]) -> Optional[list[Block]]:
    """open_clip ``ResidualAttentionBlock``s (ln_1, nn.MultiheadAttention with packed in-projection,
    ls_1, ln_2, mlp, ls_2; transformer.py) as :class:`Block`; None for any other block type."""
    blocks = []
    for b in resblocks:
        attn = getattr(b, "attn", None)
        plain = isinstance(attn, nn.MultiheadAttention) and attn.in_proj_weight is not None
        if not plain or attn.bias_k is not None or attn.add_zero_attn or hasattr(b, "ln_1_kv"):
            return None
        if not all(hasattr(b, name) for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")):
            return None
        blocks.append(
            Block(
                norm1=b.ln_1,
                qkv=_packed_qkv(attn),
                out=_then(attn.out_proj, b.ls_1),
                norm2=b.ln_2,
                mlp=_then(b.mlp, b.ls_2),
                heads=attn.num_heads,
            )
        )
    return blocks


def hf_clip_blocks(layers: Sequence[nn.Module]) -> Optional[list[Block]]:
    """transformers ``CLIPEncoderLayer``s (layer_norm1, CLIPAttention with q/k/v/out projections and
    ``scale``, layer_norm2, mlp; modeling_clip.py) as :class:`Block`; None for any other layer type."""
    blocks = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        parts = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "scale")
        if attn is None or not all(hasattr(attn, name) for name in parts):
            return None
        if not all(hasattr(layer, name) for name in ("layer_norm1", "layer_norm2", "mlp")):
            return None
        blocks.append(
            Block(
                norm1=layer.layer_norm1,
                qkv=_separate_qkv(attn),
                out=attn.out_proj,
                norm2=layer.layer_norm2,
                mlp=layer.mlp,
                heads=int(attn.num_heads),
                scale=float(attn.scale),
            )
        )
    return blocks


def _packed_qkv(attn: nn.MultiheadAttention) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        return q, k, v

    return qkv


def _separate_qkv(attn: Any) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)

    return qkv


def _then(first: Callable[[Tensor], Tensor], second: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda x: second(first(x))
