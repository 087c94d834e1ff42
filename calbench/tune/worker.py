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
from typing import Any, Optional, Union

import numpy as np
import optuna
import torch
import torch.nn.functional as F

from calbench.base import FitData, Method
from calbench.batched import fit_together
from calbench.calibprompt import PromptMethod
from calbench.methods import resolve
from calbench.session import RunContext, Session
from calbench.train import TrainingDiverged, logits_for
from calbench.tune.config import ACCURACY, Split, TuneConfig
from calbench.tune.evidence import RunScore, ShiftedViews, conclude, score_run, val_metrics
from calbench.tune.selection import Predictions, group_key
from calbench.tune.space import method_params, pair_key


class Worker:
    """One process's share of a study: models, few-shot features and CoOp-CE's validation accuracy,
    loaded once and reused by every trial this process runs."""

    def __init__(self, config: TuneConfig, context: RunContext = RunContext()) -> None:
        self.config = config
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
                coop = resolve("coop-ce", *pair, epochs).build().fit(fit)
                with torch.no_grad():
                    right = coop.predict_proba(fit.val_features).argmax(dim=1) == fit.val_labels
                self.reference_hits.setdefault(group_key(pair_key(pair), split.seed), []).extend(right.int().tolist())
            groups = [group_key(pair_key(pair), seed) for seed in self.config.split_seeds]
            self.reference[pair_key(pair)] = float(np.mean([np.mean(self.reference_hits[g]) for g in groups]))
        study.set_user_attr("reference_accuracy", self.reference)
        study.set_user_attr("reference_hits", self.reference_hits)
        return self.reference

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        outcome = self.run_trials([trial])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def run_trials(self, trials: Sequence[optuna.Trial]) -> list[Union[float, tuple[float, float], Exception]]:
        """Each trial's objective value, or the exception that ended it (pruned, diverged).

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
            method = resolve(c.method, *pair, method_params(chosen, c.epochs)).build()
            fit = self.fit_data(pair, split, method)
            if c.objective != "pareto" and isinstance(method, PromptMethod):
                method.on_epoch = self.checkpoint(trial, method, fit, pair, c.metric, index * c.train_epochs)
            methods.append(method)
            data.append(fit)
        results: list[Union[RunScore, Exception]] = []
        for trial, fit, outcome in zip(trials, data, fit_together(methods, data)):
            if isinstance(outcome.error, TrainingDiverged):
                trial.set_user_attr("fail_reason", f"diverged ({split}, {pair_key(pair)}): {outcome.error}")
            if outcome.error is not None:
                results.append(outcome.error)
                continue
            fitted = outcome.fitted()
            results.append(score_run(fitted, fit, self.shifted.inputs(pair, split, fitted)))
        return results

    def checkpoint(
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
