"""What defines a study (:class:`TuneConfig`: with its folds, split seeds and shifted validation
copies) and how its trials are judged: objectives, pruners, the accuracy constraint against CoOp-CE.
Which setting is handed back is :mod:`calbench.tune.selection`'s rule."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from calbench.data import fold_count
from calbench.data.corruptions import CORRUPTIONS, SEVERITIES
from calbench.errors import CalbenchError, check_seeds
from calbench.published import default
from calbench.session import FewShot
from calbench.train import TrainConfig
from calbench.tune.space import Param, base_space


class Split(NamedTuple):
    """One training run of a trial: split seed ``seed``'s few-shot images, turned to ``fold``."""

    seed: int
    fold: int
    folds: int

    def __str__(self) -> str:
        return f"split seed {self.seed}" + (f" fold {self.fold + 1}/{self.folds}" if self.folds > 1 else "")


def parse_val_shift(text: str) -> list[tuple[str, int]]:
    """``--val-shift CORRUPTIONS[:SEVERITIES]`` ("stain", "stain,gaussian_blur:1,3", "all:3"; "" for none)
    as (corruption, severity) pairs; a corruption named without severities takes the table's default."""
    text = text.strip()
    if not text or text == "none":
        return []
    names, _, levels = text.partition(":")
    corruptions = list(CORRUPTIONS) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in corruptions if n not in CORRUPTIONS]
    if unknown or not corruptions:
        raise CalbenchError(
            f"--val-shift {text!r}: unknown corruption(s) {', '.join(unknown) or '(none named)'}; "
            f"choose from {', '.join(CORRUPTIONS)} or all, e.g. stain:3"
        )
    try:
        severities = [int(v) for v in levels.split(",")] if levels.strip() else [default("tune", "shift_severity")]
    except ValueError:
        severities = []
    if not severities or any(v not in SEVERITIES for v in severities):
        raise CalbenchError(f"--val-shift {text!r}: severities are integers 1-5 after the colon, e.g. stain:1,3")
    return [(c, v) for c in corruptions for v in severities]


def auto_split_seeds(val_shots: int, folds: int) -> list[int]:
    """The data-size rule: at least ``tune.min_split_seeds`` split seeds, so that a trial's noise includes
    another draw of shots and another training; more where that is short of ``tune.val_per_class``
    validation predictions per class (val shots x folds per seed); at most ``tune.max_split_seeds``."""
    wanted = math.ceil(default("tune", "val_per_class") / (val_shots * folds))
    count = min(default("tune", "max_split_seeds"), max(default("tune", "min_split_seeds"), wanted))
    return list(range(1, count + 1))


@dataclass
class TuneConfig:
    """Everything that defines a study; stored in it so that every worker searches the same thing."""

    method: str = "calibprompt"
    pairs: list[tuple[str, str]] = field(default_factory=lambda: [("tiny", "synthetic")])
    modality: Optional[str] = None
    objective: str = "ece"  # a key of OBJECTIVES
    acc_tolerance: float = 1.0  # accuracy points below CoOp-CE's
    shots: int = TrainConfig.shots
    val_shots: Optional[int] = None
    views: Optional[int] = FewShot.views
    split_seeds: list[int] = field(default_factory=list)  # empty: the data-size rule (auto_split_seeds)
    epochs: Optional[int] = None  # None: the method's (the paper's 50)
    pruner: str = "median"
    space: dict[str, Param] = field(default_factory=dict)
    #: trials a worker asks for at once and trains together (calbench.tune.batch); how, not what, it searches
    batch_trials: int = 1
    #: folds of each split seed a trial trains and validates on (few_shot_split); None: every drawn image once
    folds: Optional[int] = None
    #: corrupted validation copies each trial is also scored on: (corruption, severity)
    val_shift: list[tuple[str, int]] = field(default_factory=lambda: parse_val_shift(default("tune", "val_shift")))
    shift_objective: str = default("tune", "shift_objective")  # mean or worst over clean and shifted copies
    confidence: float = default("tune", "confidence")
    resamples: int = default("tune", "resamples")

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise CalbenchError(f"--objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.pruner not in PRUNERS:
            raise CalbenchError(f"--pruner {self.pruner!r}: choose one of {', '.join(PRUNERS)}")
        FewShot(self.shots, self.val_shots, self.views)  # the same checks and messages as every command
        most = fold_count(self.shots, self.fewshot.val)
        if self.folds is not None and not 1 <= self.folds <= most:
            raise CalbenchError(
                f"--folds must be 1 to {most} ({self.shots} shots + {self.fewshot.val} validation shots hold "
                f"{most} validation block(s) per class), got {self.folds}"
            )
        self.folds = self.folds or most
        self.split_seeds = list(self.split_seeds) or auto_split_seeds(self.fewshot.val, self.folds)
        check_seeds(self.split_seeds, "--split-seeds")
        if self.shift_objective not in ("mean", "worst"):
            raise CalbenchError(f"--shift-objective {self.shift_objective!r}: choose mean or worst")
        if not 0.5 <= self.confidence < 1:
            raise CalbenchError(f"--confidence is a probability from 0.5 to below 1, got {self.confidence}")
        if not 0 <= self.acc_tolerance <= 100:  # NaN fails too, so it never reaches a stored study
            raise CalbenchError(
                f"--acc-tolerance is accuracy points a trial may lose, from 0 to 100; got {self.acc_tolerance}"
            )
        if self.epochs is not None and self.epochs < 1:
            raise CalbenchError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_trials < 1:
            raise CalbenchError(f"--batch-trials must be at least 1, got {self.batch_trials}")
        self.space = self.space or dict(base_space(self.method))

    @property
    def fewshot(self) -> FewShot:
        return FewShot(self.shots, self.val_shots, self.views)

    def fewshot_for(self, fold: int) -> FewShot:
        return FewShot(self.shots, self.val_shots, self.views, fold)

    def splits(self) -> list[Split]:
        """Every training run of a trial on one pair: each split seed's folds."""
        return [Split(seed, fold, self.folds) for seed in self.split_seeds for fold in range(self.folds)]

    @property
    def conditions(self) -> list[str]:
        """What a trial is scored on: the clean validation images, then each corrupted copy."""
        return ["clean", *(f"{c}-{s}" for c, s in self.val_shift)]

    @property
    def metric(self) -> str:
        """The validation metric trials are compared and pruned on (pareto: ECE, next to accuracy)."""
        return "ece" if self.objective == "pareto" else self.objective

    @property
    def train_epochs(self) -> int:
        return self.epochs or TrainConfig.epochs

    def fingerprint(self) -> dict[str, Any]:
        """What must match between workers of one study (not pruner or storage details)."""
        keep = (
            "method",
            "modality",
            "objective",
            "acc_tolerance",
            "shots",
            "val_shots",
            "views",
            "split_seeds",
            "epochs",
            "folds",
            "val_shift",
            "shift_objective",
            "confidence",
            "resamples",
        )
        return {
            **{k: getattr(self, k) for k in keep},
            "pairs": [list(p) for p in self.pairs],
            "space": {name: p.to_json() for name, p in sorted(self.space.items())},
        }


#: validation ECE, NLL, AURC (calbench.deferral.selective) or conformal set size (tune.worker.val_metrics),
#: each under the accuracy constraint; or the (ECE, accuracy) Pareto front
OBJECTIVES = {
    "ece": ["minimize"],
    "nll": ["minimize"],
    "aurc": ["minimize"],
    "conformal-size": ["minimize"],
    "pareto": ["minimize", "maximize"],
}
#: (epochs per run, steps per trial) -> pruner; a step is an epoch, counted on over a trial's (pair, split seed) runs.
#: The first half of training is never judged: early-epoch ECE says little about the end (warm-up at lr 1e-5).
PRUNERS: dict[str, Callable[[int, int], optuna.pruners.BasePruner]] = {
    "median": lambda epochs, steps: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, epochs // 2)),
    "hyperband": lambda epochs, steps: optuna.pruners.HyperbandPruner(
        min_resource=max(1, epochs // 2), max_resource=steps, reduction_factor=3
    ),
    "none": lambda epochs, steps: optuna.pruners.NopPruner(),
}
#: the trials --trials counts (Optuna's MaxTrialsCallback states): scored ones; a failed trial is replaced
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
#: the constraint's name: CoOp-CE's validation accuracy - tolerance - the trial's (feasible when <= 0)
ACCURACY = "accuracy_below_coop_ce"


def violation(trial: FrozenTrial) -> float:
    """How far validation accuracy falls below CoOp-CE's minus the tolerance (<= 0: feasible)."""
    return max(trial.constraints.values(), default=0.0)


def is_feasible(trial: FrozenTrial) -> bool:
    return violation(trial) <= 0.0


def select_best(trials: Sequence[FrozenTrial], objective: str) -> Optional[FrozenTrial]:
    """Lowest validation objective among trials meeting the accuracy constraint (pareto: lowest ECE
    there, which is the front's low-ECE end); if none meets it, the smallest violation. The leader the
    progress bar shows while trials run; the setting handed back is the rule's (:mod:`calbench.tune.selection`)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        return None
    feasible = [t for t in done if is_feasible(t)]
    if not feasible:
        return min(done, key=lambda t: (violation(t), t.values[0], t.number))
    return min(feasible, key=lambda t: (t.values[0], t.number))
