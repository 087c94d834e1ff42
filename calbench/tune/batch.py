"""`tune --batch-trials k`: k trials at once, trained together.

Optuna runs the k trials in k threads (``optimize(n_jobs=k)``), so each trial keeps Optuna's own
heartbeat, stale check, pruning and final state (complete, pruned, or failed with its reason).
Each thread hands its trial in and waits; once all k are in, one of them trains the k settings in
shared text-tower passes (:mod:`calbench.batched`) and each thread returns its own trial's outcome.
The sampler draws the k settings without the others' results, as any k workers running at once would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Union

import optuna
from optuna.trial import FrozenTrial

from calbench.tune.worker import Worker

Outcome = Union[float, tuple[float, float], BaseException]


class Together:
    """The objective of ``count`` trials Optuna runs at once: the last to arrive trains them all."""

    def __init__(self, worker: Worker, count: int) -> None:
        self.worker = worker
        self.trials: list[optuna.Trial] = []
        self.outcomes: dict[int, Outcome] = {}
        self.lock = threading.Lock()
        self.arrived = threading.Barrier(count, action=self._train)

    def _train(self) -> None:
        """Runs once, in the thread that arrives last, before any thread goes on."""
        # the sampler draws in trial order, as one at a time; on SQLite two threads may have popped the same
        # waiting trial (calbench.tune.study.finished_elsewhere): it trains once
        trials = sorted({t.number: t for t in self.trials}.values(), key=lambda t: t.number)
        try:
            outcomes: Sequence[Outcome] = self.worker.run_trials(trials)
        except BaseException as error:  # noqa: BLE001 - it fails every trial of the batch, and optimize raises it
            outcomes = [error] * len(trials)
        self.outcomes = {t.number: o for t, o in zip(trials, outcomes)}

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        with self.lock:
            self.trials.append(trial)
        self.arrived.wait()
        outcome = self.outcomes[trial.number]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def run_batch(
    study: optuna.Study,
    worker: Worker,
    count: int,
    catch: tuple[type[Exception], ...],
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]],
) -> None:
    """Run ``count`` trials together, each in Optuna's ``optimize`` with its heartbeat and callbacks."""
    study.optimize(Together(worker, count), n_trials=count, n_jobs=count, catch=catch, callbacks=list(callbacks))
