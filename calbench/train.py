"""One prompt-learning trainer for every backend, over cached image features.

The image encoder never runs here: each epoch reads one cached augmented view of
the few-shot images (epoch e uses view e mod V), so training sees CoOp's
augmentation distribution at the cost of a matrix product per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch
from torch import Tensor

from calbench.errors import CalbenchError
from calbench.losses import Objective
from calbench.prompts import PromptLearner


@dataclass(frozen=True)
class Range:
    """The values a parameter may take, declared next to its default: a run on a value outside
    it (no epochs, no context tokens, a smoothing alpha of 1.5) trains nothing useful and would
    log an ``ok`` row. ``None`` is an unbounded side; NaN and inf are never inside."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = True

    def __str__(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low is None or self.low_open else "["
        right = ")" if self.high is None or self.high_open else "]"
        return f"{left}{low}, {high}{right}"

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def check(self, what: str, value: object) -> None:
        """Refuse ``value`` with one line naming ``what`` ("coop-ls alpha"), the value and the range."""
        if value not in self:
            raise CalbenchError(f"{what}={value!r} is outside {self}; pass a value in that range")


AT_LEAST_ONE = Range(1)
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)


def _option(default: Any, allowed: Optional[Range] = None) -> Any:
    return field(default=default, metadata={"range": allowed} if allowed else {})


@dataclass
class TrainConfig:
    """CoOp/CalibPrompt defaults (the papers' configs) and the range each may take; the one place they live."""

    epochs: int = _option(50, AT_LEAST_ONE)
    batch_size: int = _option(16, AT_LEAST_ONE)
    lr: float = _option(0.002, POSITIVE)
    momentum: float = _option(0.9, Range(0, 1))  # SGD momentum 1 never forgets a gradient
    weight_decay: float = _option(5e-4, NON_NEGATIVE)
    warmup_epochs: int = _option(1, NON_NEGATIVE)
    warmup_lr: float = _option(1e-5, NON_NEGATIVE)  # constant lr during warm-up
    n_ctx: int = _option(16, AT_LEAST_ONE)
    ctx_init: Optional[str] = None
    class_specific: bool = False
    shots: int = _option(8, AT_LEAST_ONE)

    def __post_init__(self) -> None:
        check_train_options(vars(self), "training option")


#: each TrainConfig field's declared range
TRAIN_RANGES: dict[str, Range] = {f.name: f.metadata["range"] for f in fields(TrainConfig) if "range" in f.metadata}


def check_train_options(values: dict[str, Any], owner: str) -> None:
    """Refuse a training option outside its declared range, naming ``owner`` ("coop-ce", "training option")."""
    for name, value in values.items():
        if name in TRAIN_RANGES:
            TRAIN_RANGES[name].check(f"{owner} {name}", value)


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
