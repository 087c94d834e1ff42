"""CoOp prompt learning with any objective (:class:`PromptMethod`), and CalibPrompt itself.

CalibPrompt (Basu et al., BMVC 2025) is a :class:`PromptMethod` whose objective is label
smoothing + SMAC + angular separation (:func:`calbench.losses.calibprompt_objective`);
the CoOp baselines in :mod:`calbench.baselines.coop` are the same class with other objectives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Union

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
from calbench.published import section
from calbench.train import NON_NEGATIVE, Range, TrainConfig, TrainRun, logits_for, train_together

#: the range of each parameter of :func:`calbench.losses.calibprompt_objective` (defaults: the one table):
#: label smoothing's alpha in [0, 1) (alpha 1 leaves no mass on the true class), weights >= 0
RANGES: dict[str, Range] = {"alpha": Range(0, 1), "w_smac": NON_NEGATIVE, "w_as": NON_NEGATIVE}


class PromptMethod(LogitMethod):
    """CoOp prompt learning with any objective: CoOp-CE, its calibration-loss variants, CalibPrompt."""

    capabilities = Capabilities(learns_prompt=True)

    def __init__(self, objective: Objective, config: Optional[TrainConfig] = None) -> None:
        self.objective = objective
        self.config = config or TrainConfig()
        # one cached augmented view per epoch unless --views says fewer (Session.fit_data)
        self.capabilities = Capabilities(epochs=self.config.epochs, learns_prompt=True)
        self.learner: Optional[PromptLearner] = None
        self.history: list[dict[str, float]] = []
        #: ``on_epoch(epoch, losses)`` after each epoch while ``self.learner`` trains (e.g. to report or prune); may raise to stop
        self.on_epoch: Optional[Callable[[int, dict[str, float]], None]] = None

    def fit(self, data: FitData) -> PromptMethod:
        return self.trained(train_together([self.training_run(data)])[0])

    def training_run(self, data: FitData) -> TrainRun:
        """This method's training on ``data`` as a :class:`TrainRun`, its learner freshly initialised, for
        :meth:`fit` or to train with others in shared text passes (:mod:`calbench.batched`)."""
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
            zs = data.hand_features()
        return TrainRun(
            learner, self.objective, data.train_features, data.train_labels, cfg, data.seed, zs, self.on_epoch
        )

    def trained(self, outcome: Union[list[dict[str, float]], Exception], text: Optional[Tensor] = None) -> PromptMethod:
        """Finish a fit from its run's outcome: the per-epoch losses, or the error that stopped it (raised).
        ``text``: the trained prompts' features, when a shared pass has computed them already."""
        if isinstance(outcome, Exception):
            raise outcome
        assert self.learner is not None, "call training_run() first"
        self.history = outcome
        return self.use_prompt(self.learner, text)

    def use_prompt(self, learner: PromptLearner, text: Optional[Tensor] = None) -> PromptMethod:
        """Predict with ``learner``'s context (a trained one, or one loaded from a prompt file); ``text``:
        its class features if already computed."""
        self.learner = learner
        if text is None:
            with torch.no_grad():
                text = learner.text_features()
        self._text = text
        self._scale = learner.vlm.logit_scale
        return self

    def predict_logits(self, inputs: Tensor) -> Tensor:
        if self.learner is None:
            raise RuntimeError("call fit() first")
        return logits_for(inputs.to(self._text.device), self._text, self._scale)


@register_method(
    "calibprompt",
    "CoOp + label smoothing + SMAC + angular separation (Basu et al., BMVC 2025)",
    params=RANGES,
    learns_prompt=True,
)
def calibprompt(**params: Any) -> Method:
    """Parameters: alpha, w_smac, w_as (defaults: the table's ``calibprompt`` section) and TrainConfig fields."""
    cfg, rest = split_train_params(params, method="calibprompt")
    check_known("calibprompt", rest, RANGES)
    defaults = section("calibprompt")
    values = {
        k: as_number(rest.get(k, defaults[k].value), f"calibprompt {k}", allowed) for k, allowed in RANGES.items()
    }
    return PromptMethod(calibprompt_objective(**values), cfg)
