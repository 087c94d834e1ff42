"""One worker of a study: the objective every trial runs, on validation data only.

A :class:`Worker` opens one :class:`~calbench.session.Session` per searched pair and
reuses it for every trial this process runs; a trial trains the suggested setting on each
fold of each pair's few-shot splits and is scored on the held-out images (the test split is
never read), with pruning at epoch checkpoints and an accuracy constraint against CoOp-CE
(:mod:`calbench.tune.evidence`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, Optional, Union

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from calbench.base import FitData, Method
from calbench.batched import fit_together
from calbench.calibprompt import PromptMethod
from calbench.methods import make_method, pair_defaults
from calbench.session import RunContext, Session
from calbench.train import TrainingDiverged, logits_for
from calbench.tune.config import ACCURACY, SURPLUS, Split, TuneConfig, counts_toward_total
from calbench.tune.evidence import RunScore, ShiftedViews, conclude, score_run, val_metrics
from calbench.tune.selection import Predictions, group_key
from calbench.tune.space import method_params, pair_key
from calbench.tune.storage import MAX_RETRY


class Surplus(Exception):
    """Two workers started the last missing trial at once; the later one steps back untrained."""


class Worker:
    """One process's share of a study: models, few-shot features and CoOp-CE's validation accuracy,
    loaded once and reused by every trial this process runs."""

    def __init__(self, config: TuneConfig, n_trials: int, context: RunContext = RunContext()) -> None:
        self.config = config
        self.n_trials = n_trials
        single = context if len(config.pairs) == 1 else replace(context, weights=None)  # --weights belongs to one model
        self.sessions = {pair: Session(pair[0], pair[1], single) for pair in config.pairs}
        self.reference: dict[str, float] = {}
        self.reference_hits: dict[str, list[int]] = {}  # CoOp-CE per validation item, per group (pair, split seed)
        self.shifted = ShiftedViews(self.sessions, config)
        self.host = f"{socket.gethostname()}:{os.getpid()}"

    def fit_data(self, pair: tuple[str, str], split: Union[int, Split], method: Optional[Method] = None) -> FitData:
        """Few-shot train + validation features (and what ``method`` declares) of one split seed's fold (an int:
        fold 0): the only data a trial sees."""
        seed, fold = (split, 0) if isinstance(split, int) else (split.seed, split.fold)
        return self.sessions[pair].fit_data(seed, self.config.fewshot_for(fold), method, score_val=True)

    def load_reference(self, study: optuna.Study) -> dict[str, float]:
        """CoOp-CE's validation accuracy per pair (mean over its runs) and whether it is right on each
        validation item (for the paired accuracy constraint); computed once per study."""
        stored, hits = study.user_attrs.get("reference_accuracy", {}), study.user_attrs.get("reference_hits", {})
        if all(pair_key(p) in stored for p in self.config.pairs) and hits:
            self.reference, self.reference_hits = {k: float(v) for k, v in stored.items()}, hits
            return self.reference
        epochs = method_params({}, self.config.epochs)
        for pair in self.config.pairs:
            for split in self.config.splits():
                fit = self.fit_data(pair, split)
                coop = make_method("coop-ce", **{**pair_defaults("coop-ce", *pair), **epochs}).fit(fit)
                with torch.no_grad():
                    right = coop.predict_proba(fit.val_features).argmax(dim=1) == fit.val_labels
                self.reference_hits.setdefault(group_key(pair_key(pair), split.seed), []).extend(right.int().tolist())
            groups = [group_key(pair_key(pair), seed) for seed in self.config.split_seeds]
            self.reference[pair_key(pair)] = float(np.mean([np.mean(self.reference_hits[g]) for g in groups]))
        study.set_user_attr("reference_accuracy", self.reference)
        study.set_user_attr("reference_hits", self.reference_hits)
        return self.reference

    def _is_surplus(self, trial: optuna.Trial) -> bool:
        """A freshly sampled trial numbered beyond the total, or a second retry of one failed trial; queued ones
        (defaults, a first retry) were counted already. Two retries of one trial come from two workers failing
        it as stale at once, which SQLite, without row locks, does not prevent."""
        trials = trial.study.get_trials(deepcopy=False)
        own = next(t for t in trials if t.number == trial.number).system_attrs
        if "failed_trial" in own:
            source = own["failed_trial"]
            return any(t.number < trial.number and t.system_attrs.get("failed_trial") == source for t in trials)
        if "fixed_params" in own:
            return False
        return len(_slots_before(trial.number, trials)) >= self.n_trials

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        outcome = self.run_trials([trial])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def run_trials(self, trials: Sequence[optuna.Trial]) -> list[Union[float, tuple[float, float], Exception]]:
        """Each trial's objective value, or the exception that ended it (pruned, diverged, surplus).

        Several trials (``tune --batch-trials``) run together: on each (pair, split seed) every live
        trial's setting trains in shared text-tower passes (:mod:`calbench.batched`), then each is
        scored, reported and judged by the pruner exactly as when it runs alone. ``seconds`` is the
        time the trials took together."""
        c = self.config
        started = time.perf_counter()
        outcomes: dict[int, Union[float, tuple[float, float], Exception]] = {}
        params: dict[int, dict[str, Any]] = {}
        for i, trial in enumerate(trials):
            trial.set_user_attr("worker", self.host)
            if self._is_surplus(trial):
                trial.set_user_attr(SURPLUS, True)
                outcomes[i] = Surplus(f"trial {trial.number} is beyond the {self.n_trials} requested")
            else:
                params[i] = {name: p.suggest(trial, name) for name, p in c.space.items()}
        collected: dict[int, dict[str, list[tuple[np.ndarray, dict[str, np.ndarray]]]]] = {i: {} for i in params}
        runs = [(pair, split) for pair in c.pairs for split in c.splits()]
        for index, (pair, split) in enumerate(runs):
            live = [i for i in params if i not in outcomes]
            for i, result in zip(
                live, self._run([trials[i] for i in live], [params[i] for i in live], pair, split, index)
            ):
                if isinstance(result, Exception):
                    outcomes[i] = result
                    continue
                group = collected[i].setdefault(group_key(pair_key(pair), split.seed), [])
                group.append((result.labels, result.probs))
                if c.objective != "pareto":
                    trials[i].report(result.metrics[c.metric], (index + 1) * c.train_epochs)
                    if index + 1 < len(runs) and trials[i].should_prune():
                        where = f"after {split} of {pair_key(pair)}"
                        self._record_prune(trials[i], where, result.metrics["accuracy"], pair)
                        outcomes[i] = optuna.TrialPruned()
        for i in params:
            if i not in outcomes:
                outcomes[i] = self._conclude(trials[i], Predictions.from_runs(collected[i]), started)
        return [outcomes[i] for i in range(len(trials))]

    def _conclude(self, trial: optuna.Trial, predictions: Predictions, started: float) -> float | tuple[float, float]:
        """A finished trial's value from its validation predictions (every fold, every condition), with the
        noise-aware accuracy constraint and the user attributes the report reads."""
        value, violation, attrs = conclude(self.config, predictions, self.reference_hits)
        for key, attr in attrs.items():
            trial.set_user_attr(key, attr)
        trial.set_constraint(ACCURACY, violation)
        trial.set_user_attr("seconds", time.perf_counter() - started)
        return value

    def _run(
        self,
        trials: Sequence[optuna.Trial],
        params: Sequence[dict[str, Any]],
        pair: tuple[str, str],
        split: Split,
        index: int,
    ) -> list[Union[RunScore, Exception]]:
        """Train each trial's setting on one split (seed and fold) of one pair, together, and score each on
        that split's validation images, clean and shifted; a trial whose training stopped (diverged, pruned)
        gets its exception."""
        c = self.config
        methods, data = [], []
        for trial, chosen in zip(trials, params):
            method = make_method(c.method, **{**pair_defaults(c.method, *pair), **method_params(chosen, c.epochs)})
            fit = self.fit_data(pair, split, method)
            if c.objective != "pareto" and isinstance(method, PromptMethod):
                method.on_epoch = self._checkpoint(trial, method, fit, pair, c.metric, index * c.train_epochs)
            methods.append(method)
            data.append(fit)
        results: list[Union[RunScore, Exception]] = []
        for trial, fit, fitted in zip(trials, data, fit_together(methods, data)):
            if isinstance(fitted, TrainingDiverged):
                trial.set_user_attr("fail_reason", f"diverged ({split}, {pair_key(pair)}): {fitted}")
            if isinstance(fitted, Exception):
                results.append(fitted)
                continue
            results.append(score_run(fitted, fit, self.shifted.inputs(pair, split, fitted)))
        return results

    def _checkpoint(
        self, trial: optuna.Trial, method: PromptMethod, fit: FitData, pair: tuple[str, str], metric: str, step0: int
    ) -> Callable[[int, dict[str, float]], None]:
        """Report the validation objective every tenth of training, and stop the trial if the pruner says so."""
        epochs = method.config.epochs
        every = max(1, epochs // 10)

        def on_epoch(epoch: int, losses: dict[str, float]) -> None:
            if (epoch + 1) % every or epoch + 1 == epochs:
                return
            with torch.no_grad():
                logits = logits_for(fit.val_features, method.learner.text_features(), fit.vlm.logit_scale)
                metrics = val_metrics(F.softmax(logits, dim=1), fit.val_labels)
            trial.report(metrics[metric], step0 + epoch + 1)
            if trial.should_prune():
                self._record_prune(
                    trial,
                    f"epoch {epoch + 1} of {epochs} (split seed {fit.seed}, {pair_key(pair)})",
                    metrics["accuracy"],
                    pair,
                )
                raise optuna.TrialPruned()

        return on_epoch

    def _record_prune(self, trial: optuna.Trial, where: str, acc: float, pair: tuple[str, str]) -> None:
        trial.set_user_attr("pruned_at", where)
        trial.set_constraint(ACCURACY, self.reference[pair_key(pair)] - self.config.acc_tolerance / 100.0 - acc)


def _awaiting_retry(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Trials whose worker died (failed as stale) or crashed (an error no trial catches), whose retry is not queued
    yet and may still be (retries left): failed with no reason of calbench's, and not surplus."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}

    def awaits(t: FrozenTrial) -> bool:
        killed = t.state == TrialState.FAIL and not counts_toward_total(t) and not t.user_attrs.get(SURPLUS)
        return killed and t.number not in retried and len(t.system_attrs.get("retry_history", ())) < MAX_RETRY

    return [t for t in trials if awaits(t)]


def places_taken(trials: Sequence[FrozenTrial]) -> set[int]:
    """The study's places taken, each named by the trial that first held it: a retry holds its failed trial's
    place, wherever it is numbered, and a trial a dead worker held keeps its place until its retry is queued
    (Optuna fails it first, then queues the retry: another worker may look between)."""
    waiting = {t.number for t in _awaiting_retry(trials)}
    return {
        t.system_attrs.get("failed_trial", t.number) for t in trials if counts_toward_total(t) or t.number in waiting
    }


def _slots_before(number: int, trials: Sequence[FrozenTrial]) -> set[int]:
    """The places (:func:`places_taken`) taken before trial ``number``."""
    return {place for place in places_taken(trials) if place < number}


def queue_lost_retries(
    study: optuna.Study, trials: Sequence[FrozenTrial], after_s: float, now: Optional[datetime] = None
) -> list[int]:
    """Queue the retry of each trial of ``trials`` (the study's) still :func:`_awaiting_retry` ``after_s`` seconds
    after it failed, and return their numbers. Optuna queues a retry right after failing the trial; a worker that
    died in between leaves none, and the trial would hold its place for ever. A retry that another worker queues
    too is a second retry and steps back (:meth:`Worker._is_surplus`)."""
    now = now or datetime.now()  # Optuna stamps datetime_complete with the local datetime.now()
    lost = [
        t
        for t in _awaiting_retry(trials)
        if t.datetime_complete is not None and (now - t.datetime_complete).total_seconds() >= after_s
    ]
    for trial in lost:
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)
    return [t.number for t in lost]
