"""A study: created or joined in any Optuna storage, searched until it holds the requested
number of trials (by any number of worker processes at once), and summarised as best_params.json."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from calbench.errors import CalbenchError, check_seed
from calbench.methods import make_method
from calbench.session import RunContext
from calbench.train import TrainingDiverged
from calbench.tune.batch import finished_elsewhere, run_batch, trials_to_ask
from calbench.tune.config import OBJECTIVES, PRUNERS, TuneConfig, counts_toward_total, is_feasible, select_best
from calbench.tune.selection import Judged, judge, reference_trial
from calbench.tune.space import check_space, first_trials, method_params, pair_key
from calbench.tune.storage import open_storage, stale_after
from calbench.tune.worker import Surplus, Worker, places_taken, queue_lost_retries

#: trial failures that end the trial, not the search: a diverged loss, a surplus trial
CAUGHT = (TrainingDiverged, Surplus)


@dataclass
class SearchResult:
    study: optuna.Study
    config: TuneConfig
    storage: str
    ran: int  # trials this process trained (complete, pruned or failed)
    seconds: float

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    @cached_property
    def judged(self) -> Optional[Judged]:
        """The selection rule (:mod:`calbench.tune.selection`) on the study's completed trials."""
        trials = self.trials
        hits = self.study.user_attrs.get("reference_hits", {})
        return judge(trials, self.config, hits, reference_trial(trials, self.config))

    @property
    def best(self) -> Optional[FrozenTrial]:
        """The setting handed back: the hand-set one unless a trial beats it beyond the noise."""
        if self.judged is None:
            return select_best(self.trials, self.config.objective)
        return next(t for t in self.trials if t.number == self.judged.verdict.chosen)


def open_study(
    config: TuneConfig, storage: str, name: str, heartbeat: int = 10, sampler_seed: Optional[int] = None
) -> optuna.Study:
    """Create the study (and enqueue its first trials) or join it, refusing a different search under the same name.

    ``sampler_seed`` seeds TPE: one worker then samples the same trials on any storage; several
    workers interleave in their own order, which no seed fixes."""
    backend = open_storage(storage, heartbeat)
    sampler = optuna.samplers.TPESampler(seed=sampler_seed)  # reads the constraint each trial sets
    pruner = PRUNERS[config.pruner](config.train_epochs, config.train_epochs * len(config.pairs) * len(config.splits()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constraints_func
        try:
            study = optuna.create_study(
                storage=backend,
                study_name=name,
                directions=OBJECTIVES[config.objective],
                sampler=sampler,
                pruner=pruner,
            )
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=name, storage=backend, sampler=sampler, pruner=pruner)
            stored = study.user_attrs.get("config")
            if stored is not None and stored != json.loads(json.dumps(config.fingerprint())):
                changed = sorted(
                    k for k in stored if stored.get(k) != json.loads(json.dumps(config.fingerprint())).get(k)
                )
                raise CalbenchError(
                    f"study {name!r} was created with other settings ({', '.join(changed)} differ); use the same options or a new --study NAME"
                ) from None
            return study
    study.set_user_attr("config", config.fingerprint())
    for label, params in first_trials(config.method, config.pairs, config.space):
        study.enqueue_trial(params, user_attrs={"enqueued": label})
    return study


def prepare(
    config: TuneConfig,
    n_trials: int,
    study_name: str,
    storage: str,
    heartbeat: int = 10,
    sampler_seed: Optional[int] = None,
) -> optuna.Study:
    """Check the search and create (or join) its study, before any model is loaded: every worker
    does this first, and a launcher once before its workers start."""
    if n_trials < 1:
        raise CalbenchError(f"--trials must be at least 1, got {n_trials}")
    if sampler_seed is not None:
        check_seed(sampler_seed, "--sampler-seed")
    for _, params in first_trials(config.method, config.pairs, config.space):  # a bad name fails here, not in trial 0
        make_method(config.method, **method_params(params, config.epochs))
    check_space(config.method, config.space, config.epochs)
    with _quiet():
        return open_study(config, storage, study_name, heartbeat, sampler_seed)


@contextmanager
def _quiet() -> Iterator[None]:
    """Optuna's per-trial log lines off: the report lists failed and pruned trials with reasons."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def search(
    config: TuneConfig,
    n_trials: int,
    study_name: str,
    storage: str,
    context: RunContext = RunContext(),
    heartbeat: int = 10,
    sampler_seed: Optional[int] = None,
) -> SearchResult:
    """Run trials until the study holds ``n_trials`` (complete, pruned or failed for a reason);
    any number of processes may run this on the same study at once. ``config.batch_trials`` > 1
    asks for that many trials at a time and trains them together (:mod:`calbench.tune.batch`).

    A process returns only when no trial is left running elsewhere: another worker's last trial
    either finishes or, if that worker died, goes stale (no heartbeat for 3 x ``heartbeat`` s) and
    is retried here, so the study ends with exactly ``n_trials`` whichever worker survives."""
    started = time.perf_counter()
    study = prepare(config, n_trials, study_name, storage, heartbeat, sampler_seed)
    with _quiet():
        worker = Worker(config, n_trials, context)
        worker.load_reference(study)
        ran = 0
        with _progress(context.progress, n_trials) as bar, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            while True:
                optuna.storages.fail_stale_trials(study)  # a dead worker's trial is failed and re-queued
                trials = study.get_trials(deepcopy=False)
                # a killed trial whose retry was lost: the worker failing it died too
                if queue_lost_retries(study, trials, after_s=stale_after(heartbeat)):
                    trials = study.get_trials(deepcopy=False)
                bar(trials, select_best(trials, config.objective))
                waiting = any(t.state == TrialState.WAITING for t in trials)
                counted = sum(counts_toward_total(t) for t in trials)
                if not waiting and max(counted, len(places_taken(trials))) >= n_trials:
                    if counted >= n_trials and not any(t.state == TrialState.RUNNING for t in trials):
                        break
                    # another worker's trial: finished there, or retried here; or a killed trial's retry, queued
                    # by the worker that failed it or, if that one died too, here (a fresh trial would be surplus)
                    time.sleep(min(heartbeat, 1))
                    continue
                if config.batch_trials > 1:
                    ran += run_batch(study, worker, trials_to_ask(trials, n_trials, config.batch_trials), CAUGHT)
                    continue
                try:
                    study.optimize(worker, n_trials=1, catch=CAUGHT)
                    ran += 1
                except ValueError as error:  # its trial was also taken, and finished, by another worker
                    if not finished_elsewhere(error):
                        raise
    return SearchResult(study, config, storage, ran, time.perf_counter() - started)


class _progress:
    """rich progress while trials run: trials finished, current best, ETA (this process's pace)."""

    def __init__(self, enabled: bool, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.total = total
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[best]}"),
            disable=not enabled,
        )

    def __enter__(self) -> Callable[[list[FrozenTrial], Optional[FrozenTrial]], None]:
        self.bar.__enter__()
        self.task = self.bar.add_task("trial", total=self.total, best="")

        def update(trials: list[FrozenTrial], best: Optional[FrozenTrial]) -> None:
            done = sum(
                t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                or (t.state == TrialState.FAIL and "fail_reason" in t.user_attrs)
                for t in trials
            )
            text = (
                ""
                if best is None
                else f"best #{best.number}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in best.user_attrs.get("val", {}).items())
            )
            self.bar.update(self.task, completed=min(done, self.total), description=f"trial {len(trials)}", best=text)

        return update

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)


# --------------------------------------------------------------------------- after the search


def non_dominated(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials no other trial beats on both (lower ECE, higher accuracy)."""

    def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
        return a.values[0] <= b.values[0] and a.values[1] >= b.values[1] and tuple(a.values) != tuple(b.values)

    return [t for t in trials if not any(dominates(o, t) for o in trials)]


def _per_pair_optima(result: SearchResult, best: FrozenTrial) -> dict[str, Any]:
    """For each pair, this search's best trial on that pair alone, next to the shared best."""
    c = result.config
    per_pair = {}
    for pair in c.pairs:
        key = pair_key(pair)
        scored = [t for t in result.trials if t.state == TrialState.COMPLETE and key in t.user_attrs.get("pairs", {})]
        feasible = [t for t in scored if t.user_attrs["pairs"][key]["constraint"] <= 0] or scored
        own = min(feasible, key=lambda t: (t.user_attrs["pairs"][key][c.metric], t.number))
        per_pair[key] = {
            "trial": own.number,
            "params": method_params(own.params, c.epochs),
            "val": own.user_attrs["pairs"][key],
            "shared_val": best.user_attrs["pairs"][key],
        }
    return per_pair


def _pareto_front(result: SearchResult) -> list[dict[str, Any]]:
    """Optuna's non-dominated feasible trials (lower ECE, higher accuracy); with no feasible trial
    Optuna's front is empty, and the unconstrained front is shown instead, marked so."""
    members = result.study.best_trials or non_dominated([t for t in result.trials if t.state == TrialState.COMPLETE])
    epochs = result.config.epochs
    return [
        {
            "trial": t.number,
            "ece": t.values[0],
            "accuracy": t.values[1],
            "feasible": is_feasible(t),
            "params": method_params(t.params, epochs),
        }
        for t in sorted(members, key=lambda t: t.values[0])
    ]


def selection_document(judged: Judged) -> dict[str, Any]:
    """The rule's verdict as best_params.json and the report state it."""
    v = judged.verdict
    return {
        "chosen": v.chosen,
        "best": v.best,
        "reference": v.reference,
        "kept_reference": v.kept,
        "confidence": v.confidence,
        "threshold": v.threshold,
        "reason": v.reason(),
    }


def best_params_document(result: SearchResult) -> dict[str, Any]:
    """best_params.json: {"method", "params"} as `train --params` / `compare --params` read it, plus provenance."""
    best = result.best
    if best is None:
        raise CalbenchError(f"study {result.study.study_name!r} has no completed trial yet; run more --trials")
    c = result.config
    front = _pareto_front(result) if c.objective == "pareto" else []
    judged = result.judged
    return {
        "method": c.method,
        "params": method_params(best.params, c.epochs),
        "study": result.study.study_name,
        "trial": best.number,
        "objective": c.objective,
        "val": best.user_attrs.get("val", {}),
        "feasible": judged.summaries[best.number].feasible if judged else is_feasible(best),
        **({"selection": selection_document(judged)} if judged else {}),
        "reference_accuracy": result.study.user_attrs.get("reference_accuracy", {}),
        "per_pair": _per_pair_optima(result, best),
        **({"pareto_front": front} if front else {}),
    }
