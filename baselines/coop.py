"""CoOp baselines and CalibPrompt ablations: the same prompt learner and trainer, other objectives.

Each method is one row of :data:`LOSS_METHODS`: its loss terms, and the term fields each of
its parameters sets ("term.weight" or "term.<kwarg>"), so a shared hyper-parameter
(CalibPrompt's alpha for LS and SMAC) is one knob. Their defaults, with sources, are the
method's section of the one table (:mod:`calbench.published`). Training options (lr, n_ctx,
epochs, ...) are accepted by every method.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from calbench.base import Method, as_number, check_known, register_method, split_train_params
from calbench.calibprompt import RANGES as CALIBPROMPT_RANGES
from calbench.calibprompt import PromptMethod
from calbench.losses import Objective, Term
from calbench.published import section
from calbench.train import NON_NEGATIVE, POSITIVE, Range


@dataclass(frozen=True)
class Param:
    """A method parameter: the term fields it sets and its range (its default is in the table)."""

    sets: tuple[str, ...]
    allowed: Range = NON_NEGATIVE  # loss weights and most loss parameters: >= 0


#: label smoothing's alpha (1 - alpha on the true class): alpha 1 puts no mass on the true class
SMOOTHING = CALIBPROMPT_RANGES["alpha"]


@dataclass(frozen=True)
class LossMethod:
    description: str
    terms: Mapping[str, str]  # term name -> loss name (weights default to 1)
    params: Mapping[str, Param] = field(default_factory=dict)

    def objective(self, values: Mapping[str, float]) -> Objective:
        weights = {term: 1.0 for term in self.terms}
        kwargs: dict[str, dict[str, float]] = {term: {} for term in self.terms}
        for name, param in self.params.items():
            for target in param.sets:
                term, attribute = target.split(".")
                if attribute == "weight":
                    weights[term] = values[name]
                else:
                    kwargs[term][attribute] = values[name]
        return Objective({term: Term(loss, weights[term], kwargs[term]) for term, loss in self.terms.items()})


LOSS_METHODS: dict[str, LossMethod] = {
    "coop-ce": LossMethod("CoOp with cross-entropy (Zhou et al., IJCV 2022)", {"ce": "cross_entropy"}),
    "coop-ls": LossMethod(
        "CoOp with label smoothing",
        {"ls": "label_smoothing"},
        {"alpha": Param(("ls.alpha",), SMOOTHING)},
    ),
    "coop-mbls": LossMethod(
        "CoOp with margin-based label smoothing (Liu et al., CVPR 2022)",
        {"mbls": "mbls"},
        {
            "margin": Param(("mbls.margin",), POSITIVE),
            "alpha": Param(("mbls.alpha",)),
        },
    ),
    "coop-focal": LossMethod(
        "CoOp with focal loss (Lin et al., 2017; for calibration Mukhoti et al., NeurIPS 2020)",
        {"focal": "focal"},
        {"gamma": Param(("focal.gamma",))},
    ),
    "coop-mdca": LossMethod(
        "CoOp with CE + MDCA (Hebbalaguppe et al., CVPR 2022)",
        {"ce": "cross_entropy", "mdca": "mdca"},
        {"beta": Param(("mdca.weight",))},
    ),
    "coop-dca": LossMethod(
        "CoOp with CE + DCA (Liang et al., 2020)",
        {"ce": "cross_entropy", "dca": "dca"},
        {"beta": Param(("dca.weight",))},
    ),
    "coop-mmce": LossMethod(
        "CoOp with CE + weighted MMCE (Kumar et al., ICML 2018)",
        {"ce": "cross_entropy", "mmce": "mmce"},
        {"weight": Param(("mmce.weight",))},
    ),
    "coop-logitnorm": LossMethod(
        "CoOp with LogitNorm (Wei et al., ICML 2022)",
        {"logitnorm": "logit_norm"},
        {"temperature": Param(("logitnorm.temperature",), POSITIVE)},
    ),
    "coop-zsnorm": LossMethod(
        "CoOp with ZS-Norm: CE on logits rescaled to the zero-shot range (Murugesan et al., ECCV 2024)",
        {"zsnorm": "zs_norm"},
    ),
    "coop-penalty": LossMethod(
        "CoOp with CE + zero-shot range penalty (Murugesan et al., ECCV 2024)",
        {"ce": "cross_entropy", "penalty": "zs_penalty"},
        {"weight": Param(("penalty.weight",))},
    ),
    "coop-mmv": LossMethod(
        "CoOp with CE + margin mean-variance regulariser",
        {"ce": "cross_entropy", "mmv": "margin_mean_var"},
        {
            "alpha": Param(("mmv.alpha",)),
            "beta": Param(("mmv.beta",)),
        },
    ),
    "coop-tmm": LossMethod(
        "CoOp with CE + text moment matching to the zero-shot class features",
        {"ce": "cross_entropy", "tmm": "text_moment_matching"},
        {"weight": Param(("tmm.weight",))},
    ),
    "ls+smac": LossMethod(
        "CalibPrompt ablation: label smoothing + SMAC, no AS",
        {"ls": "label_smoothing", "smac": "smac"},
        {
            "alpha": Param(("ls.alpha", "smac.alpha"), SMOOTHING),
            "w_smac": Param(("smac.weight",)),
        },
    ),
    "ls+as": LossMethod(
        "CalibPrompt ablation: label smoothing + AS, no SMAC",
        {"ls": "label_smoothing", "as": "angular_separation"},
        {
            "alpha": Param(("ls.alpha",), SMOOTHING),
            "w_as": Param(("as.weight",)),
        },
    ),
    "calibprompt-focal": LossMethod(
        "CalibPrompt with focal loss as the task loss: focal + SMAC + AS",
        {"focal": "focal", "smac": "smac", "as": "angular_separation"},
        {
            "gamma": Param(("focal.gamma",)),
            "alpha": Param(("smac.alpha",), SMOOTHING),
            "w_smac": Param(("smac.weight",)),
            "w_as": Param(("as.weight",)),
        },
    ),
}


def _factory(name: str, spec: LossMethod):
    def build(**params: Any) -> Method:
        cfg, rest = split_train_params(params, method=name)
        check_known(name, rest, spec.params)
        defaults = section(name)
        values = {
            p: as_number(rest.get(p, defaults[p].value), f"{name} {p}", param.allowed)
            for p, param in spec.params.items()
        }
        return PromptMethod(spec.objective(values), cfg)

    return build


for _name, _spec in LOSS_METHODS.items():
    register_method(
        _name, _spec.description, params={p: param.allowed for p, param in _spec.params.items()}, learns_prompt=True
    )(_factory(_name, _spec))
