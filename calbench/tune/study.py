"""A study: created or joined in any Optuna storage, searched until it holds the requested
number of scored trials (by any number of worker processes at once), and summarised as best_params.json."""

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
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from calbench.errors import CalbenchError, check_seed
from calbench.methods import make_method
from calbench.session import RunContext
from calbench.train import TrainingDiverged
from calbench.tune.batch import run_batch
from calbench.tune.config import COUNTED, OBJECTIVES, PRUNERS, TuneConfig, is_feasible, select_best
from calbench.tune.limits import FailureStreak, check_objective
from calbench.tune.selection import Judged, judge, reference_trial
from calbench.tune.space import check_space, first_trials, method_params, pair_key
from calbench.tune.storage import has_heartbeats, open_storage, retry_callback
from calbench.tune.worker import Worker

#: trial failures that end the trial, not the search
CAUGHT = (TrainingDiverged,)


@dataclass
class SearchResult:
    study: optuna.Study
    config: TuneConfig
    storage: str
    ran: int  # trials this process trained (complete, pruned or failed)
    seconds: float
    n_trials: int  # the total asked for (--trials)

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

    @property
    def surplus(self) -> int:
        """Scored trials beyond the total: other workers' trials still running when it was reached."""
        return max(0, sum(t.state in COUNTED for t in self.trials) - self.n_trials)


class OrderedTPE(optuna.samplers.TPESampler):
    """TPE whose seeded draws stay in trial order under ``--batch-trials``: Optuna reseeds a sampler at random
    in each thread of ``optimize(n_jobs=k)``, but one thread draws every setting of a batch, in trial order
    (:mod:`calbench.tune.batch`), so the shared generator needs no reseeding and a seed gives the same trials."""

    def reseed_rng(self) -> None:
        """Keep the seeded generator (see the class)."""


def open_study(
    config: TuneConfig, storage: str, name: str, heartbeat: int = 10, sampler_seed: Optional[int] = None
) -> optuna.Study:
    """Create the study (and enqueue its first trials) or join it, refusing a different search under the same name.

    ``sampler_seed`` seeds TPE: one worker then samples the same trials on any storage; several
    workers interleave in their own order, which no seed fixes."""
    backend = open_storage(storage, heartbeat)
    sampler = OrderedTPE(seed=sampler_seed)  # reads the constraint each trial sets
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
    """Run trials until the study holds ``n_trials`` scored ones (complete or pruned; a failed trial is
    replaced); any number of processes may run this on the same study at once. ``config.batch_trials`` > 1
    runs that many trials at a time, trained together (:mod:`calbench.tune.batch`).

    Each worker stops at the total (Optuna's ``MaxTrialsCallback``), so the trials other workers are running
    then still finish: at most one surplus trial per worker (one batch with ``batch_trials``). With a
    database, a worker returns only when no trial is left running elsewhere: another worker's last trial
    either finishes or, if that worker died, goes stale (no heartbeat for 3 x ``heartbeat`` s) and is
    retried here with the same parameters."""
    started = time.perf_counter()
    study = prepare(config, n_trials, study_name, storage, heartbeat, sampler_seed)
    with _quiet():
        worker = Worker(config, context)
        check_objective(config, worker)
        worker.load_reference(study)
        streak = FailureStreak()
        ran: set[int] = set()  # a set: a trial two threads popped at once (SQLite) may be told twice
        with _progress(context.progress, n_trials) as bar, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, fail_stale_trials

            def after(study: optuna.Study, trial: FrozenTrial) -> None:
                ran.add(trial.number)
                trials = study.get_trials(deepcopy=False)
                bar(trials, select_best(trials, config.objective))

            callbacks = [MaxTrialsCallback(n_trials, states=COUNTED), streak, after]
            while (count := _to_run(study, n_trials, config.batch_trials, has_heartbeats(storage))) is not None:
                if count == 0:  # another worker's trial: it finishes there, or is retried here if that worker died
                    time.sleep(heartbeat)
                    continue
                _run(study, worker, count, config.batch_trials, callbacks)
                streak.check()
    return SearchResult(study, config, storage, len(ran), time.perf_counter() - started, n_trials)


def _to_run(study: optuna.Study, n_trials: int, batch: int, heartbeats: bool) -> Optional[int]:
    """How many trials to run now: the missing and the queued ones (retries, a re-run's defaults), at most
    ``batch``; 0 to wait for trials running elsewhere (with heartbeats); None when the search is over."""
    if heartbeats:
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial is failed and queued again
    trials = study.get_trials(deepcopy=False)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    missing = n_trials - sum(t.state in COUNTED for t in trials)
    if waiting or missing > 0:
        return min(batch, waiting + max(missing, 0))
    return 0 if heartbeats and any(t.state == TrialState.RUNNING for t in trials) else None


def _run(study: optuna.Study, worker: Worker, count: int, batch: int, callbacks: list[Any]) -> None:
    """``count`` trials together (``batch`` > 1), or one after another until the total (MaxTrialsCallback)."""
    try:
        if batch > 1:
            run_batch(study, worker, count, CAUGHT, callbacks)
        else:
            study.optimize(worker, n_trials=None, catch=CAUGHT, callbacks=callbacks)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as error:
        if not finished_elsewhere(error):
            raise


def finished_elsewhere(error: Exception) -> bool:
    """Whether Optuna refused to record a trial's outcome because the trial is already finished. On
    SQLite two workers (or two threads of a batch) can take the same waiting trial: Optuna pops it with
    SELECT ... FOR UPDATE, which SQLite ignores. The first to finish records it; the other's outcome of
    the same setting is dropped, and nothing is lost."""
    if isinstance(error, optuna.exceptions.UpdateFinishedTrialError):
        return True
    return isinstance(error, ValueError) and str(error).startswith("Cannot tell a ")


def requeue_orphans(study: optuna.Study) -> list[int]:
    """Fail the trials left running when every worker has ended, and queue each again with its parameters
    (Optuna's retry callback): what heartbeats do on a database, for journal files, which have none."""
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    retry = retry_callback()
    for trial in orphans:
        study.tell(trial.number, state=TrialState.FAIL)
        retry(study, study.get_trials(deepcopy=False)[trial.number])
    return [t.number for t in orphans]


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
