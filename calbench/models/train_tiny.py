"""Pre-train the ``tiny`` demo model: a small open_clip CLIP learned contrastively on synthetic
H&E-like tiles and their captions (:mod:`calbench.tissue`), with CLIP's loss and a learnable
logit scale (Radford et al., ICML 2021, Fig. 3; clamped at 100 as open_clip's trainer does).

Run once by calbench's developers (about 10 minutes on one CPU thread); the package ships the result::

    python -m calbench.models.train_tiny            # writes calbench/models/pretrained/tiny.safetensors

The corpus is drawn from its own seeds (never the demo dataset's): each tile's attributes are
independent, so the model learns the words one by one, not the demo's classes. Training is seeded
and deterministic for a given torch version, machine and thread count; the file's metadata holds
:func:`config_hash` of the architecture and :class:`PretrainConfig` (seed included).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode

from calbench.atomic import save_safetensors_atomic
from calbench.models.open_clip_backend import shipped_config
from calbench.models.tiny import EMBEDDING, ROW_IDS, ROWS, pack, shipped_weights, unpack
from calbench.tissue import ATTRIBUTES, FAT, FRAMES, LEVELS, Stain, caption, mentions, render

#: first entry of every corpus tile's seed, so corpus and demo dataset never share a generator
CORPUS_STREAM = 7
BICUBIC = InterpolationMode.BICUBIC


@dataclass(frozen=True)
class PretrainConfig:
    """How ``tiny`` is pre-trained: calbench's choices, for a few CPU minutes of training on words it can learn."""

    seed: int = 0
    images: int = 12000  # corpus tiles
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3  # AdamW, linear warm-up then cosine to 0
    scale_lr: float = (
        10.0  # the logit scale's learning rate as a multiple of lr: a few thousand steps, not CLIP's 100k+
    )
    warmup_steps: int = 50
    weight_decay: float = 0.1  # on matrices only, as open_clip's trainer (gains, biases, logit scale excluded)
    tile_size: int = 64  # rendered side, as the demo's tiles
    crop_scale: float = 0.5  # random resized crops of at least this share of a tile, so crops of a tile agree
    stain_jitter: float = 0.05  # per-tile stain and scanner variation
    fat_share: float = 0.3  # share of tiles with fat spaces
    attribute_jitter: float = 0.04  # described attributes sit this close to the middle of their word's range
    caption_keep: float = 0.9  # chance that a caption names each attribute
    framed: bool = True  # captions open with one of tissue.FRAMES (False: all with the first)
    #: the logit scale the shipped model runs at: CLIP's clamp (Radford et al., ICML 2021, Sec. 2.5), where
    #: the released CLIP checkpoints that PLIP and QuiltNet are fine-tuned from sit; the scale learned here
    #: (about 24 after these steps) is kept in the file's metadata. See docs/demo.md for why.
    shipped_scale: float = 100.0
    threads: int = 1  # CPU threads: float sums, and so the weights, depend on how work is split


def config_hash(cfg: PretrainConfig, model_config: Optional[dict] = None) -> str:
    """SHA-256 of the architecture and the pre-training settings (seed included): the shipped file's identity."""
    payload = {"model": model_config or shipped_config("tiny"), "pretrain": asdict(cfg)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def corpus_tile(cfg: PretrainConfig, i: int) -> tuple[np.ndarray, str]:
    """Corpus item ``i``: a tile and its caption, from the item's own seed."""
    rng = np.random.default_rng([CORPUS_STREAM, cfg.seed, i])
    attributes = rng.uniform(0.0, 1.0, len(ATTRIBUTES))  # what captions leave unsaid varies freely
    for attribute, levels in LEVELS.items():
        attributes[attribute] = levels[rng.integers(len(levels))] + rng.uniform(-1, 1) * cfg.attribute_jitter
    attributes[FAT] = rng.uniform(0.5, 0.9) if rng.random() < cfg.fat_share else 0.0
    pixels = render(attributes, Stain().jittered(rng, cfg.stain_jitter), cfg.tile_size, rng)
    frame = FRAMES[rng.integers(len(FRAMES))] if cfg.framed else FRAMES[0]
    return pixels, caption(attributes, mentions(attributes, rng, cfg.caption_keep), frame)


def corpus(cfg: PretrainConfig) -> tuple[Tensor, list[str]]:
    """(N, 3, H, W) uint8 tiles and their captions."""
    items = [corpus_tile(cfg, i) for i in range(cfg.images)]
    tiles = torch.from_numpy(np.stack([pixels for pixels, _ in items])).permute(0, 3, 1, 2).contiguous()
    return tiles, [text for _, text in items]


def crops(tiles: Tensor, size: int, cfg: PretrainConfig, generator: torch.Generator) -> Tensor:
    """A random resized crop of each tile (area share in [crop_scale, 1], aspect in [3/4, 4/3], CoOp's
    sampling), resized to ``size`` (bicubic, antialiased, as the eval transform), flipped half the time; in [0, 1]."""
    n, _, height, width = tiles.shape
    draws = torch.rand(n, 5, generator=generator, dtype=torch.float64).tolist()
    out = []
    for tile, (a, r, y, x, flip) in zip(tiles, draws):
        area = height * width * (cfg.crop_scale + (1.0 - cfg.crop_scale) * a)
        ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * r)
        w = min(width, round(math.sqrt(area * ratio)))
        h = min(height, round(math.sqrt(area / ratio)))
        top, left = int(y * (height - h + 1)), int(x * (width - w + 1))
        view = TF.resized_crop(tile, top, left, h, w, [size, size], interpolation=BICUBIC, antialias=True)
        out.append(view.flip(-1) if flip < 0.5 else view)
    return torch.stack(out).float() / 255.0


def tokenize(captions: list[str], context_length: int) -> tuple[Tensor, Tensor]:
    """(token ids of every caption in a compact vocabulary, the CLIP token id of each compact id).

    Only the corpus's own tokens get embedding rows while training; ids keep CLIP's order, so
    the end-of-text token stays the largest id and marks where each caption is pooled.
    """
    unique = sorted(set(captions))
    ids = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)(unique)
    vocab = torch.unique(ids)
    compact = torch.searchsorted(vocab, ids)
    index = {text: row for row, text in enumerate(unique)}
    return compact[[index[text] for text in captions]], vocab


def encode_text(model: open_clip.CLIP, ids: Tensor) -> Tensor:
    """open_clip's ``encode_text`` on ids cut after the longest caption (exact: causal, pooled at EOT)."""
    eot = ids.argmax(dim=-1)
    length = int(eot.max()) + 1
    x = model.token_embedding(ids[:, :length]) + model.positional_embedding[:length]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    return x[torch.arange(x.shape[0]), eot] @ model.text_projection


def build(cfg: PretrainConfig, model_config: dict, vocab: Tensor) -> open_clip.CLIP:
    """The model at its seeded initialisation, with an embedding row for each corpus token only."""
    arch = {k: v for k, v in model_config.items() if k != "preprocess_cfg"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = open_clip.CLIP(**arch)
    compact = nn.Embedding(len(vocab), model.token_embedding.embedding_dim)
    compact.weight.data.copy_(model.token_embedding.weight.data[vocab])
    model.token_embedding = compact
    return model


def optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (open_clip's exclusion of gains, biases and the logit scale),
    and the logit scale at ``scale_lr`` times the learning rate."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 and n != "logit_scale"]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": rest, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": [model.logit_scale], "weight_decay": 0.0, "lr_scale": cfg.scale_lr},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def learning_rate(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * progress))


def clip_loss(model: open_clip.CLIP, pixels: Tensor, ids: Tensor) -> Tensor:
    """Symmetric cross-entropy over the batch's image-caption similarities (CLIP's loss), every tile whose
    caption is the same text counting as a match (multi-positive targets, as UniCL, Yang et al., CVPR 2022):
    a few dozen words make repeated captions common, and they are not negatives."""
    image = F.normalize(model.encode_image(pixels), dim=-1)
    text = F.normalize(encode_text(model, ids), dim=-1)
    logits = model.logit_scale.exp() * image @ text.T
    same = (ids[:, None, :] == ids[None, :, :]).all(dim=-1).float()
    target = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train(
    cfg: PretrainConfig, log_every: int = 0, monitor: Optional[Callable[[int, open_clip.CLIP, Tensor], str]] = None
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Pre-train; returns the full state dict (unseen tokens' rows zero) and the last step's numbers.

    Every ``log_every`` steps a line is printed, with ``monitor(step, model, vocab)`` appended (e.g. a
    zero-shot check while developing the world).
    """
    model_config = shipped_config("tiny")
    pp = model_config["preprocess_cfg"]
    tiles, captions = corpus(cfg)
    ids, vocab = tokenize(captions, model_config["text_cfg"]["context_length"])
    model = build(cfg, model_config, vocab).train()
    opt = optimizer(model, cfg)
    mean, std = (torch.tensor(pp[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    generator = torch.Generator().manual_seed(cfg.seed)
    order, start, last = torch.randperm(cfg.images, generator=generator), time.time(), {}
    for step in range(cfg.steps):
        offset = (step * cfg.batch_size) % cfg.images
        if offset + cfg.batch_size > cfg.images:  # a new pass over the corpus
            order, offset = torch.randperm(cfg.images, generator=generator), 0
        batch = order[offset : offset + cfg.batch_size]
        pixels = (crops(tiles[batch], pp["size"], cfg, generator) - mean) / std
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg) * group["lr_scale"]
        loss = clip_loss(model, pixels, ids[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        last = {"step": step + 1, "loss": float(loss.detach()), "logit_scale": float(model.logit_scale.detach().exp())}
        if log_every and (step + 1) % log_every == 0:
            extra = monitor(step + 1, model, vocab) if monitor is not None else ""
            print(
                f"step {step + 1}/{cfg.steps}  loss {last['loss']:.3f}  scale {last['logit_scale']:.1f}  "
                f"{time.time() - start:.0f} s  {extra}",
                flush=True,
            )
    return _full_state(model, vocab, model_config["text_cfg"]["vocab_size"]), last


def _full_state(model: open_clip.CLIP, vocab: Tensor, vocab_size: int) -> dict[str, Tensor]:
    """The state dict of the full-vocabulary model: corpus tokens' rows trained, every other row zero."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = state.pop(EMBEDDING)  # one row per corpus token, in ``vocab`` order
    return unpack({**state, ROW_IDS: vocab, ROWS: rows}, vocab_size)


def shipped(state: dict[str, Tensor], cfg: PretrainConfig) -> dict[str, Tensor]:
    """The trained state as it ships: its logit scale set to ``cfg.shipped_scale``, every other weight as learned."""
    scale = torch.full_like(state["logit_scale"], math.log(cfg.shipped_scale))
    return {**state, "logit_scale": scale}


def metadata(cfg: PretrainConfig, last: dict[str, float], seconds: float) -> dict[str, str]:
    return {
        "config_hash": config_hash(cfg),
        "seed": str(cfg.seed),
        "pretrain_config": json.dumps(asdict(cfg), sort_keys=True),
        "final_loss": f"{last['loss']:.6f}",
        "learned_logit_scale": f"{last['logit_scale']:.6f}",
        "logit_scale": f"{cfg.shipped_scale:.6f}",
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "threads": str(torch.get_num_threads()),
        "seconds": f"{seconds:.0f}",
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=shipped_weights(), help="where to write the weights")
    args = parser.parse_args(argv)
    cfg = PretrainConfig()
    torch.set_num_threads(cfg.threads)
    start = time.time()
    state, last = train(cfg, log_every=100)
    save_safetensors_atomic(args.out, pack(shipped(state, cfg)), metadata(cfg, last, time.time() - start))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
