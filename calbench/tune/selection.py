"""Which setting `tune` hands back: the hand-set one, unless a trial beats it beyond the noise.

A few-shot validation split is small (48 images on the demo: one image moves accuracy by two
points and ECE by several), so a trial's objective and its accuracy against CoOp-CE are judged
with their bootstrap distributions, not as points. Each trial keeps its validation predictions
(:class:`Predictions`); one :class:`Plan` of resamples (of split seeds, then of the items of each
seed) is drawn per study and applied to every trial, so two trials are compared on the same
resampled images (a paired bootstrap).

The rule (``confidence`` c, 0.9 by default):

1. A trial meets the accuracy constraint unless its accuracy on the same images falls below
   CoOp-CE's by more than the tolerance with bootstrap confidence of at least c.
2. The best trial has the lowest validation objective among those meeting it.
3. It replaces the hand-set setting only if it beats that setting's objective with one-sided paired
   bootstrap confidence of at least c; otherwise the hand-set setting is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from calbench.deferral import DeferralSettings
from calbench.deferral.conformal import halves_set_size
from calbench.deferral.selective import aurc
from calbench.metrics import ece_weighted

CLEAN = "clean"
#: calbench: decimals kept of each stored probability: the study stays small, metrics move by < 1e-5
DECIMALS = 6


def group_key(pair: str, seed: int) -> str:
    """The validation items of one (pair, split seed): every fold's held-out images together."""
    return f"{pair}#{seed}"


def pair_of(group: str) -> str:
    return group.rsplit("#", 1)[0]


@dataclass(frozen=True)
class Predictions:
    """One trial's validation predictions: per group, the labels and, per condition (clean, or a
    corrupted copy such as ``stain-3``), the (N, C) probabilities of the same N items."""

    labels: Mapping[str, np.ndarray]
    probs: Mapping[str, Mapping[str, np.ndarray]]

    @classmethod
    def from_runs(cls, runs: Mapping[str, Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]]]) -> Predictions:
        """From each group's runs (one per fold): (labels, {condition: probs}), concatenated in run order."""
        labels = {g: np.concatenate([y for y, _ in parts]).astype(np.int64) for g, parts in runs.items()}
        probs = {
            g: {
                cond: np.round(np.concatenate([p[cond] for _, p in parts]).astype(np.float64), DECIMALS)
                for cond in parts[0][1]
            }
            for g, parts in runs.items()
        }
        return cls(labels, probs)

    def to_json(self) -> dict[str, Any]:
        return {
            g: {"labels": self.labels[g].tolist(), "probs": {c: p.tolist() for c, p in self.probs[g].items()}}
            for g in self.labels
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Predictions:
        labels = {g: np.asarray(v["labels"], dtype=np.int64) for g, v in data.items()}
        probs = {g: {c: np.asarray(p, dtype=np.float64) for c, p in v["probs"].items()} for g, v in data.items()}
        return cls(labels, probs)

    @property
    def conditions(self) -> list[str]:
        return list(next(iter(self.probs.values())))


@dataclass(frozen=True)
class Plan:
    """Bootstrap resamples shared by every trial of a study: per group, how often each item is drawn
    (R, N); per pair, how often each of its split seeds' groups is drawn (R, S). A plan of one row of
    ones (:func:`unit_plan`) gives the plain, unresampled value."""

    items: Mapping[str, np.ndarray]
    seeds: Mapping[str, np.ndarray]
    groups: Mapping[str, list[str]]  # pair -> its groups, in the order of ``seeds``' columns

    @property
    def resamples(self) -> int:
        return next(iter(self.items.values())).shape[0]


def _by_pair(layout: Mapping[str, int]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for g in layout:
        groups.setdefault(pair_of(g), []).append(g)
    return groups


def make_plan(layout: Mapping[str, int], resamples: int, seed: int = 0) -> Plan:
    """Resamples of a study whose groups hold ``layout[group]`` items: split seeds are drawn with
    replacement within each pair when there are several, then items with replacement within each seed."""
    rng = np.random.default_rng(seed)
    groups = _by_pair(layout)
    items = {g: rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64) for g, n in layout.items()}
    seeds = {
        pair: rng.multinomial(len(gs), np.full(len(gs), 1.0 / len(gs)), size=resamples).astype(np.float64)
        if len(gs) > 1
        else np.ones((resamples, 1))
        for pair, gs in groups.items()
    }
    return Plan(items, seeds, groups)


def unit_plan(layout: Mapping[str, int]) -> Plan:
    groups = _by_pair(layout)
    return Plan(
        {g: np.ones((1, n)) for g, n in layout.items()}, {p: np.ones((1, len(gs))) for p, gs in groups.items()}, groups
    )


def _looped(
    metric: Callable[[np.ndarray, np.ndarray], float],
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """A metric without a weighted form, evaluated on each resample's items."""

    def draws(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        index = np.arange(len(y))
        return np.array([metric(p[rows], y[rows]) for rows in (np.repeat(index, row.astype(int)) for row in w)])

    return draws


def _true_class(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return p[np.arange(len(y)), y]


#: metric -> (probs (N, C), labels (N,), counts (R, N)) -> (R,): as calbench.metrics and tune.worker.val_metrics define them
WEIGHTED: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "ece": ece_weighted,
    "accuracy": lambda p, y, w: w @ (p.argmax(axis=1) == y) / w.sum(axis=1),
    "nll": lambda p, y, w: w @ -np.log(np.clip(_true_class(p, y), 1e-12, 1.0)) / w.sum(axis=1),
    "aurc": _looped(aurc),
    "conformal-size": _looped(lambda p, y: halves_set_size(p, y, DeferralSettings.alpha)),
}


def per_pair(
    plan: Plan, value: Callable[[str, np.ndarray], np.ndarray], pairs: Optional[Sequence[str]] = None
) -> dict[str, np.ndarray]:
    """Each pair's (R,) draws: ``value(group, counts)`` per split seed, averaged over the drawn seeds."""
    out = {}
    for pair in pairs or plan.groups:
        groups = plan.groups[pair]
        per_seed = np.stack([value(g, plan.items[g]) for g in groups], axis=1)  # (R, S)
        weights = plan.seeds[pair]
        out[pair] = (per_seed * weights).sum(axis=1) / weights.sum(axis=1)
    return out


def condition_draws(predictions: Predictions, plan: Plan, metric: str) -> dict[str, np.ndarray]:
    """(R,) draws of ``metric`` per condition: per pair as :func:`per_pair`, then the mean over pairs."""
    return {
        cond: np.mean(list(per_pair(plan, scorer(predictions, cond, metric)).values()), axis=0)
        for cond in predictions.conditions
    }


def scorer(predictions: Predictions, cond: str, metric: str) -> Callable[[str, np.ndarray], np.ndarray]:
    fn = WEIGHTED[metric]
    return lambda g, w: fn(predictions.probs[g][cond], predictions.labels[g], w)


def objective_draws(predictions: Predictions, plan: Plan, metric: str, combine: str = "mean") -> np.ndarray:
    """(R,) draws of the objective: ``metric`` on clean and shifted copies, their mean or their worst (max)."""
    draws = np.stack(list(condition_draws(predictions, plan, metric).values()))
    return draws.mean(axis=0) if combine == "mean" else draws.max(axis=0)


def accuracy_gap_draws(
    predictions: Predictions, reference_hits: Mapping[str, np.ndarray], plan: Plan
) -> dict[str, np.ndarray]:
    """Per pair, (R,) draws of the trial's clean accuracy minus CoOp-CE's on the same resampled items."""

    def gap(g: str, w: np.ndarray) -> np.ndarray:
        hits = predictions.probs[g][CLEAN].argmax(axis=1) == predictions.labels[g]
        return (w @ hits - w @ np.asarray(reference_hits[g], dtype=np.float64)) / w.sum(axis=1)

    return per_pair(plan, gap)


def accuracy_violation(gaps: Mapping[str, np.ndarray], tolerance: float, confidence: float) -> float:
    """How far the trial is, at worst over pairs, from meeting the constraint (<= 0: it meets it).

    A trial breaks it when even the ``confidence`` quantile of its accuracy gap (the optimistic end
    of a one-sided interval) is below -``tolerance``: it is then below CoOp-CE by more than the
    tolerance with that confidence. One image cannot break it; a clear loss does."""
    return max(-tolerance - float(np.quantile(d, confidence)) for d in gaps.values())


def confidence_better(candidate: np.ndarray, reference: np.ndarray) -> float:
    """One-sided paired bootstrap confidence that ``candidate``'s objective is below ``reference``'s
    (ties count half, so two identical settings give 0.5)."""
    return float(np.mean(candidate < reference) + 0.5 * np.mean(candidate == reference))


def interval(draws: np.ndarray, level: float = 0.9) -> tuple[float, float]:
    """Central percentile interval of bootstrap draws (90%: the 5th and 95th percentiles)."""
    tail = (1.0 - level) / 2.0
    return float(np.quantile(draws, tail)), float(np.quantile(draws, 1.0 - tail))


@dataclass(frozen=True)
class Verdict:
    """What the rule chose, and why."""

    chosen: int  # trial handed back
    best: int  # lowest validation objective among trials meeting the constraint
    reference: Optional[int]  # the hand-set setting's trial (None: it did not complete)
    confidence: float  # P(best beats the hand-set setting) over paired resamples; nan when they are one trial
    threshold: float

    @property
    def kept(self) -> bool:
        return self.reference is not None and self.chosen == self.reference

    def reason(self) -> str:
        if self.reference is None:
            return f"the hand-set setting did not complete; trial {self.best} is the best meeting the constraint"
        if self.best == self.reference:
            return "the hand-set setting has the best validation objective itself"
        if self.kept:
            return (
                f"trial {self.best} beats the hand-set setting with confidence {self.confidence:.0%} only, "
                f"below the {self.threshold:.0%} required: within the noise, the hand-set setting is kept"
            )
        return f"trial {self.best} beats the hand-set setting with confidence {self.confidence:.0%} (>= {self.threshold:.0%})"


def decide(
    points: Mapping[int, float],
    draws: Mapping[int, np.ndarray],
    feasible: Mapping[int, bool],
    reference: Optional[int],
    threshold: float,
) -> Verdict:
    """The rule of this module on trials' point objectives, paired draws and feasibility (lower is better).

    With no trial meeting the constraint the hand-set setting is kept (or, without it, the lowest objective)."""
    eligible = [n for n in points if feasible[n]]
    if not eligible:
        fallback = reference if reference is not None else min(points, key=lambda n: (points[n], n))
        return Verdict(fallback, fallback, reference, float("nan"), threshold)
    best = min(eligible, key=lambda n: (points[n], n))
    if reference is None:
        return Verdict(best, best, None, float("nan"), threshold)
    if best == reference:
        return Verdict(reference, best, reference, float("nan"), threshold)
    confidence = confidence_better(draws[best], draws[reference])
    return Verdict(best if confidence >= threshold else reference, best, reference, confidence, threshold)


# --------------------------------------------------------------------------- a study's trials judged


@dataclass(frozen=True)
class Summary:
    """A completed trial as the rule sees it: objective and accuracy gap to CoOp-CE, each with a
    90% central bootstrap interval, whether it meets the constraint, and its confidence of beating
    the hand-set setting."""

    number: int
    objective: float
    objective_interval: tuple[float, float]
    gap: float
    gap_interval: tuple[float, float]
    feasible: bool
    beats_reference: float


@dataclass(frozen=True)
class Judged:
    verdict: Verdict
    summaries: dict[int, Summary]


def judge(
    trials: Sequence[Any], config: Any, reference_hits: Mapping[str, Any], reference: Optional[int]
) -> Optional[Judged]:
    """The rule applied to a study's completed trials (those that kept their validation predictions)."""
    done = [t for t in trials if t.state.name == "COMPLETE" and "predictions" in t.user_attrs]
    if not done:
        return None
    predictions = {t.number: Predictions.from_json(t.user_attrs["predictions"]) for t in done}
    first = next(iter(predictions.values()))
    plan = make_plan(_sizes(first), config.resamples, seed=0)
    draws = {n: objective_draws(p, plan, config.metric, config.shift_objective) for n, p in predictions.items()}
    points = {t.number: float(t.user_attrs["objective"]) for t in done}
    gaps = {n: accuracy_gap_draws(p, reference_hits, plan) for n, p in predictions.items()}
    tolerance = config.acc_tolerance / 100.0
    feasible = {n: accuracy_violation(g, tolerance, config.confidence) <= 0 for n, g in gaps.items()}
    reference = reference if reference in points else None
    verdict = decide(points, draws, feasible, reference, config.confidence)
    summaries = {}
    for n in points:
        gap = np.mean(list(gaps[n].values()), axis=0)
        unit_gap = np.mean(list(accuracy_gap_draws(predictions[n], reference_hits, unit_plan(_sizes(first))).values()))
        summaries[n] = Summary(
            n,
            points[n],
            interval(draws[n]),
            float(unit_gap),
            interval(gap),
            feasible[n],
            confidence_better(draws[n], draws[reference]) if reference is not None else float("nan"),
        )
    return Judged(verdict, summaries)


def _sizes(predictions: Predictions) -> dict[str, int]:
    return {g: len(y) for g, y in predictions.labels.items()}


def reference_trial(trials: Sequence[Any], config: Any) -> Optional[int]:
    """The hand-set setting's completed trial: the first setting enqueued for one pair (its published
    setting, else the defaults), the defaults (enqueued last) for several pairs; None if it did not complete."""
    from calbench.tune.space import first_trials

    labels = [label for label, _ in first_trials(config.method, config.pairs, config.space)]
    if not labels:
        return None
    wanted = labels[0] if len(config.pairs) == 1 else labels[-1]
    done = [t for t in trials if t.state.name == "COMPLETE" and t.user_attrs.get("enqueued") == wanted]
    return done[0].number if done else None
