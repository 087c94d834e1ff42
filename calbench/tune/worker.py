"""One worker of a study: the objective every trial runs, on validation data only.

A :class:`Worker` opens one :class:`~calbench.session.Session` per searched pair and
reuses it for every trial this process runs; a trial trains the suggested setting on each
pair's few-shot splits and is scored on their validation images (the test split is never
read), with pruning at epoch checkpoints and an accuracy constraint against CoOp-CE.
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
from calbench.deferral import DeferralSettings
from calbench.deferral.conformal import halves_set_size
from calbench.deferral.selective import aurc
from calbench.methods import resolve
from calbench.metrics import accuracy, ece, nll
from calbench.session import RunContext, Session
from calbench.train import TrainingDiverged, logits_for
from calbench.tune.config import ACCURACY, TuneConfig
from calbench.tune.space import method_params, pair_key


def val_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Every metric a trial may be judged on, from validation only. ``conformal-size``: the mean LAC set
    size at 1 - alpha, calibrated on one half of the validation images and measured on the other, both ways."""
    p, y = probs.double().cpu().numpy(), labels.cpu().numpy()
    size = halves_set_size(p, y, DeferralSettings.alpha)
    return {"ece": ece(p, y), "accuracy": accuracy(p, y), "nll": nll(p, y), "aurc": aurc(p, y), "conformal-size": size}


class Worker:
    """One process's share of a study: models, few-shot features and CoOp-CE's validation accuracy,
    loaded once and reused by every trial this process runs."""

    def __init__(self, config: TuneConfig, context: RunContext = RunContext()) -> None:
        self.config = config
        single = context if len(config.pairs) == 1 else replace(context, weights=None)  # --weights belongs to one model
        self.sessions = {pair: Session(pair[0], pair[1], single) for pair in config.pairs}
        self.reference: dict[str, float] = {}
        self.host = f"{socket.gethostname()}:{os.getpid()}"

    def fit_data(self, pair: tuple[str, str], seed: int, method: Optional[Method] = None) -> FitData:
        """Few-shot train + validation features (and what ``method`` declares): the only data a trial sees."""
        return self.sessions[pair].fit_data(seed, self.config.fewshot, method, score_val=True)

    def load_reference(self, study: optuna.Study) -> dict[str, float]:
        """CoOp-CE's validation accuracy per pair (mean over split seeds); computed once per study."""
        stored = study.user_attrs.get("reference_accuracy", {})
        if all(pair_key(p) in stored for p in self.config.pairs):
            self.reference = {k: float(v) for k, v in stored.items()}
            return self.reference
        epochs = method_params({}, self.config.epochs)
        for pair in self.config.pairs:
            accs = []
            for seed in self.config.split_seeds:
                fit = self.fit_data(pair, seed)
                coop = resolve("coop-ce", *pair, epochs).build().fit(fit)
                with torch.no_grad():
                    accs.append(val_metrics(coop.predict_proba(fit.val_features), fit.val_labels)["accuracy"])
            self.reference[pair_key(pair)] = float(np.mean(accs))
        study.set_user_attr("reference_accuracy", self.reference)
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
        per_pair: dict[int, dict[str, dict[str, float]]] = {i: {} for i in params}
        runs = [(pair, seed) for pair in c.pairs for seed in c.split_seeds]
        for index, (pair, seed) in enumerate(runs):
            live = [i for i in params if i not in outcomes]
            for i, result in zip(
                live, self._run([trials[i] for i in live], [params[i] for i in live], pair, seed, index)
            ):
                if isinstance(result, Exception):
                    outcomes[i] = result
                    continue
                sums = per_pair[i].setdefault(pair_key(pair), {k: 0.0 for k in result})
                for k, v in result.items():
                    sums[k] += v / len(c.split_seeds)
                if c.objective != "pareto":
                    trials[i].report(result[c.metric], (index + 1) * c.train_epochs)
                    if index + 1 < len(runs) and trials[i].should_prune():
                        where = f"after split seed {seed} of {pair_key(pair)}"
                        self._record_prune(trials[i], where, result["accuracy"], pair)
                        outcomes[i] = optuna.TrialPruned()
        for i in params:
            if i not in outcomes:
                outcomes[i] = self._conclude(trials[i], per_pair[i], started)
        return [outcomes[i] for i in range(len(trials))]

    def _conclude(
        self, trial: optuna.Trial, per_pair: dict[str, dict[str, float]], started: float
    ) -> float | tuple[float, float]:
        """A finished trial's value from its per-pair means, with the accuracy constraint and its user attributes."""
        c = self.config
        tolerance = c.acc_tolerance / 100.0
        for key, m in per_pair.items():
            m["constraint"] = self.reference[key] - tolerance - m["accuracy"]
        mean = {
            k: float(np.mean([m[k] for m in per_pair.values()]))
            for k in next(iter(per_pair.values()))
            if k != "constraint"
        }
        trial.set_user_attr("pairs", per_pair)
        trial.set_user_attr("val", mean)
        trial.set_constraint(ACCURACY, max(m["constraint"] for m in per_pair.values()))
        trial.set_user_attr("seconds", time.perf_counter() - started)
        return (mean["ece"], mean["accuracy"]) if c.objective == "pareto" else mean[c.objective]

    def _run(
        self,
        trials: Sequence[optuna.Trial],
        params: Sequence[dict[str, Any]],
        pair: tuple[str, str],
        seed: int,
        index: int,
    ) -> list[Union[dict[str, float], Exception]]:
        """Train each trial's setting on one split of one pair, together, and score each on that split's
        validation images; a trial whose training stopped (diverged, pruned) gets its exception."""
        c = self.config
        methods, data = [], []
        for trial, chosen in zip(trials, params):
            method = resolve(c.method, *pair, method_params(chosen, c.epochs)).build()
            fit = self.fit_data(pair, seed, method)
            if c.objective != "pareto" and isinstance(method, PromptMethod):
                method.on_epoch = self._checkpoint(trial, method, fit, pair, c.metric, index * c.train_epochs)
            methods.append(method)
            data.append(fit)
        results: list[Union[dict[str, float], Exception]] = []
        for trial, fit, outcome in zip(trials, data, fit_together(methods, data)):
            if isinstance(outcome.error, TrainingDiverged):
                trial.set_user_attr("fail_reason", f"diverged (split seed {seed}, {pair_key(pair)}): {outcome.error}")
            if outcome.error is not None:
                results.append(outcome.error)
                continue
            fitted = outcome.fitted()
            with (
                torch.no_grad()
            ):  # smoothed methods are scored on noisy validation copies, as compare scores them on test
                results.append(val_metrics(fitted.predict_proba(fit.val_inputs(fitted)), fit.val_labels))
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
