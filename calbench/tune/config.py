"""What defines a study (:class:`TuneConfig`) and how its trials are judged: objectives,
pruners, the accuracy constraint against CoOp-CE, and the choice of the best trial."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from calbench.errors import CalbenchError, check_seeds
from calbench.session import FewShot
from calbench.train import TrainConfig
from calbench.tune.space import Param, base_space


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
    split_seeds: list[int] = field(default_factory=lambda: [1])
    epochs: Optional[int] = None  # None: the method's (the paper's 50)
    pruner: str = "median"
    space: dict[str, Param] = field(default_factory=dict)
    #: trials a worker asks for at once and trains together (calbench.tune.batch); how, not what, it searches
    batch_trials: int = 1

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise CalbenchError(f"--objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.pruner not in PRUNERS:
            raise CalbenchError(f"--pruner {self.pruner!r}: choose one of {', '.join(PRUNERS)}")
        if not self.split_seeds:
            raise CalbenchError("--split-seeds needs at least one seed")
        check_seeds(self.split_seeds, "--split-seeds")
        if not 0 <= self.acc_tolerance <= 100:  # NaN fails too, so it never reaches a stored study
            raise CalbenchError(
                f"--acc-tolerance is accuracy points a trial may lose, from 0 to 100; got {self.acc_tolerance}"
            )
        FewShot(self.shots, self.val_shots, self.views)  # the same checks and messages as every command
        if self.epochs is not None and self.epochs < 1:
            raise CalbenchError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_trials < 1:
            raise CalbenchError(f"--batch-trials must be at least 1, got {self.batch_trials}")
        self.space = self.space or dict(base_space(self.method))

    @property
    def fewshot(self) -> FewShot:
        return FewShot(self.shots, self.val_shots, self.views)

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
    there, which is the front's low-ECE end); if none meets it, the smallest violation."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        return None
    feasible = [t for t in done if is_feasible(t)]
    if not feasible:
        return min(done, key=lambda t: (violation(t), t.values[0], t.number))
    return min(feasible, key=lambda t: (t.values[0], t.number))
