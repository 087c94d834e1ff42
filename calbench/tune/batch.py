"""`tune --batch-trials k`: ask Optuna for k trials at once and train them together.

The k settings train in shared text-tower passes (:mod:`calbench.batched`); each trial keeps its
own heartbeat, pruning checkpoints and final state, exactly as Optuna's ``optimize`` would give it
(complete, pruned, or failed with its reason). The sampler draws the k settings without the
others' results, as any k workers running at once would.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState

from calbench.tune.config import counts_toward_total
from calbench.tune.worker import Worker, places_taken


def trials_to_ask(trials: Sequence[FrozenTrial], n_trials: int, batch: int) -> int:
    """How many trials to ask for now: ``batch``, but no more than the queued ones plus the places the study
    still lacks (a surplus trial would be failed unused), and at least one."""
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    missing = n_trials - max(sum(counts_toward_total(t) for t in trials), len(places_taken(trials)))
    return max(1, min(batch, waiting + missing))


def finished_elsewhere(error: ValueError) -> bool:
    """Whether Optuna refused to record a trial's outcome because the trial is already finished. On
    SQLite two workers can take the same waiting trial: Optuna pops it with SELECT ... FOR UPDATE
    (``RDBStorage.set_trial_state_values``), which SQLite ignores. The first to finish records it; the
    other's outcome of the same setting is dropped, and nothing is lost."""
    return str(error).startswith("Cannot tell a ")


def tell(study: optuna.Study, trial: optuna.Trial, *args: Any, **kwargs: Any) -> None:
    """``study.tell``, except for a trial that another worker has finished (:func:`finished_elsewhere`)."""
    try:
        study.tell(trial, *args, **kwargs)
    except ValueError as error:
        if not finished_elsewhere(error):
            raise


def run_batch(study: optuna.Study, worker: Worker, count: int, catch: tuple[type[Exception], ...]) -> int:
    """Ask ``count`` trials, run them together, tell each its outcome; returns how many ran.

    As ``optimize`` does, an exception outside ``catch`` (and outside pruning) fails its trial and
    is raised once every trial of the batch is told."""
    with warnings.catch_warnings():  # Optuna warns that heartbeats expect ``optimize``; they are kept below
        warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
        trials = [study.ask() for _ in range(count)]
    with ExitStack() as beats:
        for trial in trials:
            beats.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
        try:
            outcomes = worker.run_trials(trials)
        except BaseException:
            for trial in trials:
                tell(study, trial, state=TrialState.FAIL)
            raise
    escaped = None
    for trial, outcome in zip(trials, outcomes):
        if isinstance(outcome, optuna.TrialPruned):
            tell(study, trial, state=TrialState.PRUNED)
        elif isinstance(outcome, Exception):
            tell(study, trial, state=TrialState.FAIL)
            if not isinstance(outcome, catch) and escaped is None:
                escaped = outcome
        else:
            tell(study, trial, outcome)
    if escaped is not None:
        raise escaped
    return len(trials)
