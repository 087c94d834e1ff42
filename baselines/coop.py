"""CoOp baselines: the same prompt learner and trainer as CalibPrompt, other losses.

Defaults, with their sources:
- coop-ls: alpha 0.05, the label-smoothing weight CalibPrompt's configs use.
- coop-mbls: margin 10, alpha 0.1 (Liu et al., CVPR 2022, their default).
"""
from __future__ import annotations

from typing import Any

from calbench.errors import CalbenchError
from calbench.losses import Objective, Term
from calbench.methods import Method, PromptMethod, register_method, split_train_params


def _coop(loss: str, defaults: dict[str, Any], params: dict[str, Any], method: str) -> Method:
    cfg, rest = split_train_params(params)
    unknown = set(rest) - set(defaults)
    if unknown:
        raise CalbenchError(f"{method}: unknown parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(defaults) or 'none'} and training options")
    return PromptMethod(Objective({loss: Term(loss, 1.0, {**defaults, **rest})}), cfg)


@register_method("coop-ce", "CoOp with cross-entropy (Zhou et al., IJCV 2022)")
def coop_ce(**params: Any) -> Method:
    return _coop("cross_entropy", {}, params, "coop-ce")


@register_method("coop-ls", "CoOp with label smoothing")
def coop_ls(**params: Any) -> Method:
    return _coop("label_smoothing", {"alpha": 0.05}, params, "coop-ls")


@register_method("coop-mbls", "CoOp with margin-based label smoothing (Liu et al., CVPR 2022)")
def coop_mbls(**params: Any) -> Method:
    return _coop("mbls", {"margin": 10.0, "alpha": 0.1}, params, "coop-mbls")
