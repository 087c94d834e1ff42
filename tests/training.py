"""One prompt learner trained alone: what the library's trainer does for a single run, raising its error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, Union

from torch import Tensor

from calbench.losses import Objective
from calbench.prompts import PromptLearner
from calbench.train import TrainConfig, TrainRun, TrainViews, train_together


def train_prompt_learner(
    learner: PromptLearner,
    objective: Objective,
    train_features: Union[Tensor, TrainViews],
    train_labels: Tensor,
    cfg: TrainConfig,
    seed: int,
    zs_text_features: Optional[Tensor] = None,
    on_epoch: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> list[dict[str, float]]:
    """Train ``learner.ctx`` on (V, N, D) normalised features (or views); returns per-epoch mean losses."""
    run = TrainRun(learner, objective, train_features, train_labels, cfg, seed, zs_text_features, on_epoch)
    outcome = train_together([run])[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome
