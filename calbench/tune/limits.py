"""Searches that cannot give an answer: refused before the first trial, or stopped with the reason.

Only scored trials count toward ``--trials`` (:data:`calbench.tune.config.COUNTED`), so a failed
trial is replaced: a search whose every trial fails would never end, and one whose objective is
the same for every trial would pick its "best" setting at random.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from calbench.deferral import DeferralSettings
from calbench.deferral.conformal import min_calibration_size
from calbench.errors import CalbenchError
from calbench.tune.config import TuneConfig
from calbench.tune.space import pair_key
from calbench.tune.worker import Worker

#: calbench: a worker stops the search after this many of its own trials failed in a row. Failed trials are
#: replaced, so a space or objective where every trial fails (a diverging learning rate, a NaN objective)
#: would search for ever (78 failed trials for --trials 2 in 14 minutes, before this limit); a space where
#: half the trials fail reaches it by chance with probability 0.5**20, about 1e-6, at each trial
MAX_FAILED_IN_A_ROW = 20


class FailureStreak:
    """An Optuna callback that stops this worker's search after ``limit`` (:data:`MAX_FAILED_IN_A_ROW`) of its
    trials failed in a row."""

    def __init__(self, limit: Optional[int] = None) -> None:
        self.limit, self.count = MAX_FAILED_IN_A_ROW if limit is None else limit, 0
        self.last: Optional[FrozenTrial] = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.count = self.count + 1 if trial.state == TrialState.FAIL else 0
        self.last = trial
        if self.count >= self.limit:
            study.stop()

    def check(self) -> None:
        """One line saying why, once the streak stopped the search."""
        if self.count < self.limit or self.last is None:
            return
        # a trial failed without calbench's reason here was given a value Optuna refuses (an exception would
        # have ended the search instead)
        why = self.last.user_attrs.get("fail_reason", "its objective was not a number")
        raise CalbenchError(
            f"the search stopped: {self.count} trials in a row failed (the last, trial {self.last.number}: {why}); "
            "narrow the search space (--space) or choose another --objective"
        )


def check_objective(config: TuneConfig, worker: Worker) -> None:
    """Refuse ``conformal-size`` where a validation half is too small for a finite conformal threshold at
    alpha: every set would hold every class, and the objective would be one number (or NaN) for every trial."""
    if config.objective != "conformal-size":
        return
    alpha = DeferralSettings.alpha
    need = min_calibration_size(alpha)  # calibration images in the smaller half (halves are class-stratified)
    for pair in config.pairs:
        for seed in config.split_seeds:
            counts = np.bincount(worker.fit_data(pair, seed).val_labels.cpu().numpy())
            counts = counts[counts > 0]
            if sum(counts // 2) < need:
                per_class = 2 * math.ceil(need / len(counts))
                raise CalbenchError(
                    f"--objective conformal-size at alpha {alpha:g} needs {per_class} validation images per class "
                    f"on {pair_key(pair)} ({len(counts)} classes; each half of them calibrates the other and needs "
                    f"{need}), but split seed {seed} has {counts.min()}; use --val-shots {per_class} or more"
                )
