"""CoOp prompt learning with any objective (:class:`PromptMethod`), and CalibPrompt itself.

CalibPrompt (Basu et al., BMVC 2025) is a :class:`PromptMethod` whose objective is label
smoothing + SMAC + angular separation (:func:`calbench.losses.calibprompt_objective`);
the CoOp baselines in :mod:`calbench.baselines.coop` are the same class with other objectives.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from calbench.base import (
    Capabilities,
    FitData,
    LogitMethod,
    Method,
    as_number,
    check_known,
    register_method,
    split_train_params,
)
from calbench.losses import Objective, calibprompt_objective
from calbench.prompts import PromptLearner
from calbench.train import NON_NEGATIVE, Range, TrainConfig, logits_for, train_prompt_learner

#: the range of each parameter of :func:`calbench.losses.calibprompt_objective` (where their defaults live):
#: label smoothing's alpha in [0, 1) (alpha 1 leaves no mass on the true class), weights >= 0
RANGES: dict[str, Range] = {"alpha": Range(0, 1), "w_smac": NON_NEGATIVE, "w_as": NON_NEGATIVE}


class PromptMethod(LogitMethod):
    """CoOp prompt learning with any objective: CoOp-CE, its calibration-loss variants, CalibPrompt."""

    capabilities = Capabilities(learns_prompt=True)

    def __init__(self, objective: Objective, config: Optional[TrainConfig] = None) -> None:
        self.objective = objective
        self.config = config or TrainConfig()
        self.learner: Optional[PromptLearner] = None
        self.history: list[dict[str, float]] = []
        #: ``on_epoch(epoch, losses)`` after each epoch while ``self.learner`` trains (e.g. to report or prune); may raise to stop
        self.on_epoch: Optional[Callable[[int, dict[str, float]], None]] = None

    def fit(self, data: FitData) -> PromptMethod:
        cfg = self.config
        torch.manual_seed(data.seed)
        learner = PromptLearner(
            data.vlm,
            data.classnames,
            n_ctx=cfg.n_ctx,
            ctx_init=cfg.ctx_init,
            class_specific=cfg.class_specific,
            seed=data.seed,
        )
        self.learner = learner  # on_epoch callbacks (tune's checkpoints) read the prompt as it trains
        zs = None
        if self.objective.inputs & {"zs_logits", "zs_text_features"}:
            with torch.no_grad():
                zs = data.vlm.encode_texts(data.hand_prompts())
        self.history = train_prompt_learner(
            learner,
            self.objective,
            data.train_features,
            data.train_labels,
            cfg,
            data.seed,
            zs_text_features=zs,
            on_epoch=self.on_epoch,
        )
        return self.use_prompt(learner)

    def use_prompt(self, learner: PromptLearner) -> PromptMethod:
        """Predict with ``learner``'s context (a trained one, or one loaded from a prompt file)."""
        self.learner = learner
        with torch.no_grad():
            self._text = learner.text_features()
        self._scale = learner.vlm.logit_scale
        return self

    def predict_logits(self, inputs: Tensor) -> Tensor:
        if self.learner is None:
            raise RuntimeError("call fit() first")
        return logits_for(inputs.to(self._text.device), self._text, self._scale)


@register_method("calibprompt", "CoOp + label smoothing + SMAC + angular separation (Basu et al., BMVC 2025)")
def calibprompt(**params: Any) -> Method:
    """Parameters: alpha, w_smac, w_as (defaults in :func:`calbench.losses.calibprompt_objective`) and TrainConfig fields."""
    cfg, rest = split_train_params(params, method="calibprompt")
    check_known("calibprompt", rest, inspect.signature(calibprompt_objective).parameters)
    values = {k: as_number(v, f"calibprompt {k}", RANGES[k]) for k, v in rest.items()}
    return PromptMethod(calibprompt_objective(**values), cfg)
