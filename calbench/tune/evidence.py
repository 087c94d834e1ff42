"""What a trial is judged on: its validation predictions on every fold of every split seed, on the
clean images and on corrupted copies (``--val-shift``), and the values Optuna and the report read from
them (the objective, the accuracy constraint with its noise, per-pair and per-condition metrics).

Corrupted validation copies are transform kinds like every other view (:mod:`calbench.data.corruptions`),
so the feature cache encodes each (image, corruption, severity) once; a worker also keeps them in
memory, read once per (pair, split, kind). They are only ever scored: no method fits on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from calbench.base import FitData, Method
from calbench.data.corruptions import shift_kind
from calbench.deferral import DeferralSettings
from calbench.deferral.conformal import halves_set_size
from calbench.deferral.selective import aurc
from calbench.metrics import accuracy, ece, nll
from calbench.session import Session
from calbench.tune.config import Split, TuneConfig
from calbench.tune.selection import (
    CLEAN,
    WEIGHTED,
    Plan,
    Predictions,
    accuracy_gap_draws,
    accuracy_violation,
    condition_draws,
    make_plan,
    objective_draws,
    per_pair,
    scorer,
    unit_plan,
)


def val_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Every metric a trial may be judged on, from validation only. ``conformal-size``: the mean LAC set
    size at 1 - alpha, calibrated on one half of the validation images and measured on the other, both ways."""
    p, y = probs.double().cpu().numpy(), labels.cpu().numpy()
    size = halves_set_size(p, y, DeferralSettings.alpha)
    return {"ece": ece(p, y), "accuracy": accuracy(p, y), "nll": nll(p, y), "aurc": aurc(p, y), "conformal-size": size}


@dataclass(frozen=True)
class RunScore:
    """One trained run's validation predictions: clean metrics (what the pruner sees), labels, and the
    probabilities per condition (clean first, then each corrupted copy)."""

    metrics: dict[str, float]
    labels: np.ndarray
    probs: dict[str, np.ndarray]


class ShiftedViews:
    """The corrupted validation copies of ``--val-shift``, as each method predicts from them."""

    def __init__(self, sessions: Mapping[tuple[str, str], Session], config: TuneConfig) -> None:
        self.sessions, self.config = sessions, config
        self._memo: dict[tuple[tuple[str, str], Split, str, int], Tensor] = {}
        self.reads = 0  # feature-cache reads, for tests: one per (pair, split, kind)

    def _views(self, pair: tuple[str, str], split: Split, kind: str, views: int) -> Tensor:
        key = (pair, split, kind, views)
        if key not in self._memo:
            self.reads += 1
            fewshot = self.config.fewshot_for(split.fold)
            self._memo[key] = self.sessions[pair].val_views(split.seed, fewshot, kind, range(views))
        return self._memo[key]

    def inputs(self, pair: tuple[str, str], split: Split, method: Method) -> dict[str, Tensor]:
        """Per condition name (``stain-3``), the split's validation images corrupted, in the form
        ``method`` predicts from (noisy copies of the corrupted image for a smoothed method)."""
        out = {}
        caps = method.capabilities
        for corruption, severity in self.config.val_shift:
            if caps.test_copies is None:
                inputs = self._views(pair, split, shift_kind(corruption, severity), 1)[0]
            else:
                requests = [r for r in (caps.adapt_copies, caps.test_copies) if r is not None]
                inputs = torch.cat(
                    [self._views(pair, split, shift_kind(corruption, severity, r.kind), r.views) for r in requests]
                )
            out[f"{corruption}-{severity}"] = inputs
        return out


def score_run(fitted: Method, fit: FitData, shifted: Mapping[str, Tensor]) -> RunScore:
    """A fitted method's validation predictions, clean and under each shift (smoothed methods on their
    noisy validation copies, as compare scores them on test)."""
    with torch.no_grad():
        probs = {CLEAN: fitted.predict_proba(fit.val_inputs(fitted))}
        probs.update({cond: fitted.predict_proba(inputs) for cond, inputs in shifted.items()})
    return RunScore(
        val_metrics(probs[CLEAN], fit.val_labels),
        fit.val_labels.cpu().numpy(),
        {cond: p.double().cpu().numpy() for cond, p in probs.items()},
    )


def study_plan(predictions: Predictions, config: TuneConfig) -> Plan:
    """The study's resamples: a function of its groups' sizes and a fixed seed, so every worker draws the same."""
    return make_plan({g: len(y) for g, y in predictions.labels.items()}, config.resamples, seed=0)


def conclude(
    config: TuneConfig, predictions: Predictions, reference_hits: Mapping[str, Any]
) -> tuple[Union[float, tuple[float, float]], float, dict[str, Any]]:
    """A finished trial's objective value (the point estimate), its accuracy-constraint violation (noise-aware,
    <= 0 feasible) and the user attributes the report reads: per-pair and mean clean metrics, per-condition ECE
    and accuracy, and its predictions."""
    unit = unit_plan({g: len(y) for g, y in predictions.labels.items()})
    clean = {m: _clean(predictions, unit, m) for m in WEIGHTED}
    pairs = {pair: {m: float(clean[m][pair][0]) for m in WEIGHTED} for pair in unit.groups}
    gaps = accuracy_gap_draws(predictions, reference_hits, study_plan(predictions, config))
    for pair, draws in gaps.items():
        pairs[pair]["constraint"] = accuracy_violation({pair: draws}, config.acc_tolerance / 100.0, config.confidence)
    conditions = {
        cond: {"ece": float(e[0]), "accuracy": float(a[0])}
        for (cond, e), a in zip(
            condition_draws(predictions, unit, "ece").items(), condition_draws(predictions, unit, "accuracy").values()
        )
    }
    value = float(objective_draws(predictions, unit, config.metric, config.shift_objective)[0])
    attrs = {
        "pairs": pairs,
        "val": {m: float(np.mean([p[m] for p in pairs.values()])) for m in WEIGHTED},
        "conditions": conditions,
        "objective": value,
        "predictions": predictions.to_json(),
    }
    if config.objective == "pareto":
        return (value, attrs["val"]["accuracy"]), max(p["constraint"] for p in pairs.values()), attrs
    return value, max(p["constraint"] for p in pairs.values()), attrs


def _clean(predictions: Predictions, plan: Plan, metric: str) -> dict[str, np.ndarray]:
    return per_pair(plan, scorer(predictions, CLEAN, metric))
