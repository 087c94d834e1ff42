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
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Optional

import numpy as np
import optuna
import torch
import torch.nn.functional as F

from calbench.base import FitData, Method
from calbench.calibprompt import PromptMethod
from calbench.methods import make_method
from calbench.metrics import accuracy, ece, nll
from calbench.session import RunContext, Session
from calbench.train import TrainingDiverged, logits_for
from calbench.tune.config import ACCURACY, SURPLUS, TuneConfig, counts_toward_total
from calbench.tune.space import method_params, pair_key


class Surplus(Exception):
    """Two workers started the last missing trial at once; the later one steps back untrained."""


def val_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    p, y = probs.double().cpu().numpy(), labels.cpu().numpy()
    return {"ece": ece(p, y), "accuracy": accuracy(p, y), "nll": nll(p, y)}


class Worker:
    """One process's share of a study: models, few-shot features and CoOp-CE's validation accuracy,
    loaded once and reused by every trial this process runs."""

    def __init__(self, config: TuneConfig, n_trials: int, context: RunContext = RunContext()) -> None:
        self.config = config
        self.n_trials = n_trials
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
                coop = make_method("coop-ce", **epochs).fit(fit)
                with torch.no_grad():
                    accs.append(val_metrics(coop.predict_proba(fit.val_features), fit.val_labels)["accuracy"])
            self.reference[pair_key(pair)] = float(np.mean(accs))
        study.set_user_attr("reference_accuracy", self.reference)
        return self.reference

    def _is_surplus(self, trial: optuna.Trial) -> bool:
        """A freshly sampled trial numbered beyond the total; queued ones (defaults, retries) were counted already."""
        trials = trial.study.get_trials(deepcopy=False)
        own = next(t for t in trials if t.number == trial.number).system_attrs
        if "fixed_params" in own or "failed_trial" in own:
            return False
        return sum(t.number < trial.number and counts_toward_total(t) for t in trials) >= self.n_trials

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        c = self.config
        trial.set_user_attr("worker", self.host)
        if self._is_surplus(trial):
            trial.set_user_attr(SURPLUS, True)
            raise Surplus(f"trial {trial.number} is beyond the {self.n_trials} requested")
        started = time.perf_counter()
        params = {name: p.suggest(trial, name) for name, p in c.space.items()}
        per_pair: dict[str, dict[str, float]] = {}
        runs = [(pair, seed) for pair in c.pairs for seed in c.split_seeds]
        for index, (pair, seed) in enumerate(runs):
            metrics = self._run(trial, params, pair, seed, index)
            sums = per_pair.setdefault(pair_key(pair), {k: 0.0 for k in metrics})
            for k, v in metrics.items():
                sums[k] += v / len(c.split_seeds)
            if c.objective != "pareto":
                trial.report(metrics[c.metric], (index + 1) * c.train_epochs)
                if index + 1 < len(runs) and trial.should_prune():
                    self._record_prune(trial, f"after split seed {seed} of {pair_key(pair)}", metrics["accuracy"], pair)
                    raise optuna.TrialPruned()
        tolerance = c.acc_tolerance / 100.0
        for key, m in per_pair.items():
            m["constraint"] = self.reference[key] - tolerance - m["accuracy"]
        mean = {k: float(np.mean([m[k] for m in per_pair.values()])) for k in ("ece", "accuracy", "nll")}
        trial.set_user_attr("pairs", per_pair)
        trial.set_user_attr("val", mean)
        trial.set_constraint(ACCURACY, max(m["constraint"] for m in per_pair.values()))
        trial.set_user_attr("seconds", time.perf_counter() - started)
        return (mean["ece"], mean["accuracy"]) if c.objective == "pareto" else mean[c.objective]

    def _run(
        self, trial: optuna.Trial, params: dict[str, Any], pair: tuple[str, str], seed: int, index: int
    ) -> dict[str, float]:
        """Train the trial's setting on one split of one pair and score it on that split's validation images."""
        c = self.config
        method = make_method(c.method, **method_params(params, c.epochs))
        fit = self.fit_data(pair, seed, method)
        if c.objective != "pareto" and isinstance(method, PromptMethod):
            method.on_epoch = self._checkpoint(trial, method, fit, pair, c.metric, index * c.train_epochs)
        try:
            method.fit(fit)
        except TrainingDiverged as exc:
            trial.set_user_attr("fail_reason", f"diverged (split seed {seed}, {pair_key(pair)}): {exc}")
            raise
        with torch.no_grad():  # smoothed methods are scored on noisy validation copies, as compare scores them on test
            return val_metrics(method.predict_proba(fit.val_inputs(method)), fit.val_labels)

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
