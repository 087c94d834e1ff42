"""CoOp baselines and CalibPrompt ablations: the same prompt learner and trainer, other objectives.

Each method is one row of :data:`LOSS_METHODS`: its loss terms, and its parameters with
their defaults and sources. A parameter sets one or more term fields ("term.weight" or
"term.<kwarg>"), so a shared hyper-parameter (CalibPrompt's alpha for LS and SMAC) is one
knob. Training options (lr, n_ctx, epochs, ...) are accepted by every method.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from calbench.base import Method, as_number, check_known, register_method, split_train_params
from calbench.calibprompt import RANGES as CALIBPROMPT_RANGES
from calbench.calibprompt import PromptMethod
from calbench.losses import Objective, Term
from calbench.train import NON_NEGATIVE, POSITIVE, Range


@dataclass(frozen=True)
class Param:
    """A method parameter: default value, the term fields it sets, where the default comes from, and its range."""

    default: float
    sets: tuple[str, ...]
    source: str
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


CALIBPROMPT = "Basu et al., BMVC 2025 (CalibPrompt defaults)"
LOSS_METHODS: dict[str, LossMethod] = {
    "coop-ce": LossMethod("CoOp with cross-entropy (Zhou et al., IJCV 2022)", {"ce": "cross_entropy"}),
    "coop-ls": LossMethod(
        "CoOp with label smoothing",
        {"ls": "label_smoothing"},
        {"alpha": Param(0.05, ("ls.alpha",), CALIBPROMPT, SMOOTHING)},
    ),
    "coop-mbls": LossMethod(
        "CoOp with margin-based label smoothing (Liu et al., CVPR 2022)",
        {"mbls": "mbls"},
        {
            "margin": Param(10.0, ("mbls.margin",), "Liu et al., CVPR 2022", POSITIVE),
            "alpha": Param(0.1, ("mbls.alpha",), "Liu et al., CVPR 2022"),
        },
    ),
    "coop-focal": LossMethod(
        "CoOp with focal loss (Lin et al., 2017; for calibration Mukhoti et al., NeurIPS 2020)",
        {"focal": "focal"},
        {"gamma": Param(3.0, ("focal.gamma",), "Mukhoti et al., NeurIPS 2020 (fixed gamma 3)")},
    ),
    "coop-mdca": LossMethod(
        "CoOp with CE + MDCA (Hebbalaguppe et al., CVPR 2022)",
        {"ce": "cross_entropy", "mdca": "mdca"},
        {"beta": Param(1.0, ("mdca.weight",), "Hebbalaguppe et al., CVPR 2022 (beta 1 with NLL)")},
    ),
    "coop-dca": LossMethod(
        "CoOp with CE + DCA (Liang et al., 2020)",
        {"ce": "cross_entropy", "dca": "dca"},
        {"beta": Param(1.0, ("dca.weight",), "calbench default; tune with `calbench tune`")},
    ),
    "coop-mmce": LossMethod(
        "CoOp with CE + weighted MMCE (Kumar et al., ICML 2018)",
        {"ce": "cross_entropy", "mmce": "mmce"},
        {"weight": Param(1.0, ("mmce.weight",), "calbench default; tune with `calbench tune`")},
    ),
    "coop-logitnorm": LossMethod(
        "CoOp with LogitNorm (Wei et al., ICML 2022)",
        {"logitnorm": "logit_norm"},
        {"temperature": Param(0.04, ("logitnorm.temperature",), "Wei et al., ICML 2022 (CIFAR-10 setting)", POSITIVE)},
    ),
    "coop-zsnorm": LossMethod(
        "CoOp with ZS-Norm: CE on logits rescaled to the zero-shot range (Murugesan et al., ECCV 2024)",
        {"zsnorm": "zs_norm"},
    ),
    "coop-penalty": LossMethod(
        "CoOp with CE + zero-shot range penalty (Murugesan et al., ECCV 2024)",
        {"ce": "cross_entropy", "penalty": "zs_penalty"},
        {"weight": Param(1.0, ("penalty.weight",), "calbench default; tune with `calbench tune`")},
    ),
    "coop-mmv": LossMethod(
        "CoOp with CE + margin mean-variance regulariser",
        {"ce": "cross_entropy", "mmv": "margin_mean_var"},
        {
            "alpha": Param(0.1, ("mmv.alpha",), "calbench default"),
            "beta": Param(0.01, ("mmv.beta",), "calbench default"),
        },
    ),
    "coop-tmm": LossMethod(
        "CoOp with CE + text moment matching to the zero-shot class features",
        {"ce": "cross_entropy", "tmm": "text_moment_matching"},
        {"weight": Param(1.0, ("tmm.weight",), "calbench default; tune with `calbench tune`")},
    ),
    "ls+smac": LossMethod(
        "CalibPrompt ablation: label smoothing + SMAC, no AS",
        {"ls": "label_smoothing", "smac": "smac"},
        {
            "alpha": Param(0.05, ("ls.alpha", "smac.alpha"), CALIBPROMPT, SMOOTHING),
            "w_smac": Param(1.0, ("smac.weight",), CALIBPROMPT),
        },
    ),
    "ls+as": LossMethod(
        "CalibPrompt ablation: label smoothing + AS, no SMAC",
        {"ls": "label_smoothing", "as": "angular_separation"},
        {
            "alpha": Param(0.05, ("ls.alpha",), CALIBPROMPT, SMOOTHING),
            "w_as": Param(0.01, ("as.weight",), CALIBPROMPT),
        },
    ),
    "calibprompt-focal": LossMethod(
        "CalibPrompt with focal loss as the task loss: focal + SMAC + AS",
        {"focal": "focal", "smac": "smac", "as": "angular_separation"},
        {
            "gamma": Param(3.0, ("focal.gamma",), "Mukhoti et al., NeurIPS 2020"),
            "alpha": Param(0.05, ("smac.alpha",), CALIBPROMPT, SMOOTHING),
            "w_smac": Param(1.0, ("smac.weight",), CALIBPROMPT),
            "w_as": Param(0.01, ("as.weight",), CALIBPROMPT),
        },
    ),
}


def _factory(name: str, spec: LossMethod):
    def build(**params: Any) -> Method:
        cfg, rest = split_train_params(params, method=name)
        check_known(name, rest, spec.params)
        values = {
            p: as_number(rest.get(p, param.default), f"{name} {p}", param.allowed) for p, param in spec.params.items()
        }
        return PromptMethod(spec.objective(values), cfg)

    return build


for _name, _spec in LOSS_METHODS.items():
    register_method(_name, _spec.description)(_factory(_name, _spec))
