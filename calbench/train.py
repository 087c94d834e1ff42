"""One prompt-learning trainer for every backend, over cached image features.

The image encoder never runs here: each epoch reads one cached augmented view of
the few-shot images (epoch e uses view e mod V), so training sees CoOp's
augmentation distribution at the cost of a matrix product per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from calbench.errors import CalbenchError
from calbench.losses import Objective
from calbench.prompts import PromptLearner


@dataclass
class TrainConfig:
    """CoOp/CalibPrompt defaults (the papers' configs); the one place they live."""

    epochs: int = 50
    batch_size: int = 16
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5  # constant lr during warm-up
    n_ctx: int = 16
    ctx_init: Optional[str] = None
    class_specific: bool = False
    shots: int = 8


def learning_rate(epoch: int, cfg: TrainConfig) -> float:
    """Constant ``warmup_lr`` for the warm-up epochs, then cosine from ``lr`` with period ``epochs``.

    As Dassl's ConstantWarmupScheduler: the cosine scheduler (T_max = epochs) takes its
    first step only after warm-up, so the first epoch after warm-up runs at the full ``lr``.
    """
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))


class TrainingDiverged(CalbenchError):
    """The loss stopped being finite; the method's row reports it as failed."""


def logits_for(image_features: Tensor, text_features: Tensor, logit_scale: float) -> Tensor:
    """CLIP logits: exp(logit_scale) is passed in already; both sides L2-normalised."""
    return logit_scale * image_features @ text_features.T


def train_prompt_learner(
    learner: PromptLearner,
    objective: Objective,
    train_features: Tensor,
    train_labels: Tensor,
    cfg: TrainConfig,
    seed: int,
    zs_text_features: Optional[Tensor] = None,
    on_epoch: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> list[dict[str, float]]:
    """Train ``learner.ctx`` on (V, N, D) normalised features; returns per-epoch mean losses.

    ``zs_text_features`` feeds objectives that anchor to the zero-shot model
    (``zs_logits``, ``zs_text_features``). ``on_epoch`` may raise to stop early.
    """
    device = learner.ctx.device
    scale = learner.vlm.logit_scale
    features = train_features.to(device)
    labels = train_labels.to(device)
    needs = objective.inputs
    optimizer = torch.optim.SGD([learner.ctx], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    n = labels.shape[0]
    for epoch in range(cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(epoch, cfg)
        view = features[epoch % features.shape[0]]
        order = torch.randperm(n, generator=generator).to(device)
        sums: dict[str, float] = {}
        for start in range(0, n, cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            text = learner.text_features()
            logits = logits_for(view[batch], text, scale)
            inputs: dict[str, Any] = {"logits": logits, "labels": labels[batch], "text_features": text}
            if "zs_logits" in needs:
                inputs["zs_logits"] = logits_for(view[batch], zs_text_features, scale)
            if "zs_text_features" in needs:
                inputs["zs_text_features"] = zs_text_features
            loss, parts = objective(**inputs)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {float(loss.detach())} at epoch {epoch + 1}; lower the learning rate or loss weights"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, value in {"loss": float(loss.detach()), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value * len(batch)
        record = {key: value / n for key, value in sums.items()}
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
    return history
