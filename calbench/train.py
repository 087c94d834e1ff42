"""One prompt-learning trainer for every backend, over cached image features.

The image encoder never runs here: each epoch reads one cached augmented view of
the few-shot images (epoch e uses view e mod V), so training sees CoOp's
augmentation distribution at the cost of a matrix product per step (or, with
``--online-encoding``, encodes each batch's fresh view in the loop, as the published code does).
Runs that share a model train together (:func:`train_together`): one text-tower pass per step
for all their prompts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Protocol, Union

import torch
from torch import Tensor

from calbench import streams
from calbench.errors import CalbenchError
from calbench.losses import Objective
from calbench.prompts import PromptLearner, text_features_together
from calbench.published import default


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
#: calbench: 50 times the longest published schedule (CoOp's 200 epochs, KaiyangZhou/CoOp
#: configs/trainers/CoOp/rn50.yaml:17); finite, as a run caches one augmented view per epoch by default
MAX_EPOCHS = 10_000
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)


def _table(name: str) -> Any:
    """A trainer default from the one table (``configs/published.yaml``, section ``train``)."""
    return default("train", name)


def _option(value: Any, allowed: Optional[Range] = None) -> Any:
    return field(default=value, metadata={"range": allowed} if allowed else {})


@dataclass
class TrainConfig:
    """The trainer's options and the range each may take; their defaults (the papers' configs, with
    sources) live in the one table, :mod:`calbench.published`."""

    epochs: int = _option(_table("epochs"), Range(1, MAX_EPOCHS, high_open=False))
    batch_size: int = _option(_table("batch_size"), AT_LEAST_ONE)
    lr: float = _option(_table("lr"), POSITIVE)
    momentum: float = _option(_table("momentum"), Range(0, 1))  # SGD momentum 1 never forgets a gradient
    weight_decay: float = _option(_table("weight_decay"), NON_NEGATIVE)
    warmup_epochs: int = _option(_table("warmup_epochs"), NON_NEGATIVE)
    warmup_lr: float = _option(_table("warmup_lr"), NON_NEGATIVE)  # constant lr during warm-up
    n_ctx: int = _option(_table("n_ctx"), AT_LEAST_ONE)
    ctx_init: Optional[str] = _table("ctx_init")
    class_specific: bool = _table("class_specific")
    shots: int = _option(_table("shots"), AT_LEAST_ONE)

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


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps per epoch over ``n`` images: full batches only, as Dassl's train loader
    (``drop_last`` when the split holds at least one full batch, else one batch of all ``n``).

    Kather at 8 shots (72 images, batch 16) takes 4 steps, not 5, and SMAC never sees a stub
    batch of 8 (Dassl.pytorch dassl/data/data_manager.py, ``build_data_loader``)."""
    return max(1, n // batch_size)


class TrainingDiverged(CalbenchError):
    """The loss stopped being finite; the method's row reports it as failed."""


def logits_for(image_features: Tensor, text_features: Tensor, logit_scale: float) -> Tensor:
    """CLIP logits: exp(logit_scale) is passed in already; both sides L2-normalised."""
    return logit_scale * image_features @ text_features.T


class TrainViews(Protocol):
    """Where a run's training images come from, epoch by epoch: cached views (:class:`CachedViews`) or
    the image encoder in the loop (:class:`calbench.online_encoding.OnlineViews`, ``--online-encoding``)."""

    def batch(self, epoch: int, indices: Tensor) -> Tensor:
        """(B, D) L2-normalised features of training images ``indices`` as epoch ``epoch`` sees them."""
        ...


class CachedViews:
    """(V, N, D) cached augmented views: epoch e reads view e mod V."""

    def __init__(self, features: Tensor, device: torch.device) -> None:
        self.features = features.to(device)

    def batch(self, epoch: int, indices: Tensor) -> Tensor:
        return self.features[epoch % self.features.shape[0]][indices]


@dataclass
class TrainRun:
    """One prompt learner's training: its objective, data, schedule, seed and epoch callback.

    ``train_features`` is (V, N, D) cached views or a :class:`TrainViews`; ``zs_text_features`` feeds
    objectives that anchor to the zero-shot model (``zs_logits``, ``zs_text_features``); ``on_epoch``
    may raise to stop this run (its error is the run's outcome)."""

    learner: PromptLearner
    objective: Objective
    train_features: Union[Tensor, TrainViews]
    train_labels: Tensor
    cfg: TrainConfig
    seed: int
    zs_text_features: Optional[Tensor] = None
    on_epoch: Optional[Callable[[int, dict[str, float]], None]] = None


class _Progress:
    """A run's place in its own schedule (epoch, step, batch order, learning rate) and its history or error."""

    def __init__(self, run: TrainRun) -> None:
        self.run = run
        device = run.learner.ctx.device
        features = run.train_features
        self.views = CachedViews(features, device) if isinstance(features, Tensor) else features
        self.labels = run.train_labels.to(device)
        cfg = run.cfg
        self.optimizer = torch.optim.SGD(
            [run.learner.ctx], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.generator = torch.Generator().manual_seed(streams.torch_seed("batch-order", run.seed))
        self.steps = steps_per_epoch(self.labels.shape[0], cfg.batch_size)
        self.epoch, self.step, self.seen = 0, 0, 0
        self.order = self.labels.new_zeros(0)
        self.sums: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.error: Optional[Exception] = None

    @property
    def active(self) -> bool:
        return self.error is None and self.epoch < self.run.cfg.epochs

    def loss(self, text: Tensor) -> Optional[Tensor]:
        """This step's loss given the run's (C, D) text features; None, and the run failed, when not finite."""
        run, cfg = self.run, self.run.cfg
        if self.step == 0:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.epoch, cfg)
            self.order = torch.randperm(self.labels.shape[0], generator=self.generator).to(self.labels.device)
            self.sums, self.seen = {}, 0
        batch = self.order[self.step * cfg.batch_size : (self.step + 1) * cfg.batch_size]
        features, scale, needs = self.views.batch(self.epoch, batch), run.learner.vlm.logit_scale, run.objective.inputs
        inputs: dict[str, Any] = {"logits": logits_for(features, text, scale), "labels": self.labels[batch]}
        inputs["text_features"] = text
        if "zs_logits" in needs:
            inputs["zs_logits"] = logits_for(features, run.zs_text_features, scale)
        if "zs_text_features" in needs:
            inputs["zs_text_features"] = run.zs_text_features
        loss, parts = run.objective(**inputs)
        if not torch.isfinite(loss):
            self.error = TrainingDiverged(
                f"loss became {float(loss.detach())} at epoch {self.epoch + 1}; lower the learning rate or loss weights"
            )
            return None
        for key, value in {"loss": float(loss.detach()), **parts}.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * len(batch)
        self.seen += len(batch)
        return loss

    def advance(self) -> None:
        """After the optimizer step: close the epoch after its last step (history, ``on_epoch``)."""
        self.step += 1
        if self.step < self.steps:
            return
        record = {key: value / self.seen for key, value in self.sums.items()}
        self.history.append(record)
        self.step, self.epoch = 0, self.epoch + 1
        if self.run.on_epoch is not None:
            try:
                self.run.on_epoch(self.epoch - 1, record)
            except Exception as exc:  # noqa: BLE001 - it stops this run only (a pruned trial); the caller re-raises it
                self.error = exc


def train_together(runs: Sequence[TrainRun]) -> list[Union[list[dict[str, float]], Exception]]:
    """Train several prompt learners in lockstep, their prompts in one text-tower pass per step.

    Each step stacks the R active runs' C-class prompts into one batch
    (:func:`calbench.prompts.text_features_together`), computes each run's loss on its own slice and
    back-propagates the sum: the runs share no parameter, so each context gets exactly its own loss's
    gradient. Schedules, batch orders and seeds stay per run; a run that ends (its epochs done, a
    non-finite loss, ``on_epoch`` raising) leaves the batch. Returns each run's per-epoch mean losses,
    or the exception that stopped it.
    """
    progress = [_Progress(run) for run in runs]
    while active := [p for p in progress if p.active]:
        texts = text_features_together([p.run.learner for p in active])
        losses = [loss for p, text in zip(active, texts) if (loss := p.loss(text)) is not None]
        if not losses:
            continue
        stepping = [p for p in active if p.error is None]
        for p in stepping:
            p.optimizer.zero_grad(set_to_none=True)
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        total.backward()
        for p in stepping:
            p.optimizer.step()
            p.advance()
    return [p.history if p.error is None else p.error for p in progress]
