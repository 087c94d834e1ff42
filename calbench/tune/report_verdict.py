"""The search report's answer to "did the search help?": the rule and its verdict with intervals, the
top trials as a table (settings, clean and shifted validation metrics), and, after the final test, each
setting's validation-to-test gap with a warning when the tuned setting calibrates worse on test."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
from optuna.trial import FrozenTrial

from calbench.report.blocks import Block, Heading, Table, Text
from calbench.results import Row
from calbench.tune.selection import CLEAN, Summary
from calbench.tune.space import method_params, reference_params
from calbench.tune.study import SearchResult

#: calbench: rows of the top-trials table
TOP = 10
#: calbench: shifted conditions shown one column each; more are summarised as their mean and worst
SHIFT_COLUMNS = 3


def rule_text(result: SearchResult) -> str:
    c = result.config
    shift = (
        f" The objective is the {c.shift_objective} validation {c.metric} over the clean images and "
        f"{', '.join(c.conditions[1:])} copies."
        if c.val_shift
        else ""
    )
    return (
        f"Rule: each trial trains on {c.folds} fold(s) of split seed(s) {', '.join(map(str, c.split_seeds))} and is "
        f"judged on every held-out image ({len(c.splits())} trainings per trial).{shift} A trial meets the accuracy "
        f"constraint unless it is below CoOp-CE on the same images by more than {c.acc_tolerance:g} point(s) with "
        f"paired bootstrap confidence of at least {c.confidence:.0%}. The best trial meeting it replaces the "
        f"hand-set setting only if it beats that setting's objective with one-sided paired bootstrap confidence "
        f"of at least {c.confidence:.0%} ({c.resamples} resamples of split seeds, then images); otherwise the "
        "hand-set setting is kept."
    )


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _range(bounds: tuple[float, float]) -> str:
    return f"[{100 * bounds[0]:.2f}, {100 * bounds[1]:.2f}]"


def _summary_row(label: str, s: Summary, reference: Optional[int]) -> list[str]:
    beats = "" if np.isnan(s.beats_reference) or s.number == reference else f"{s.beats_reference:.0%}"
    return [
        label,
        _pct(s.objective),
        _range(s.objective_interval),
        f"{100 * s.gap:+.2f}",
        _range(s.gap_interval),
        "yes" if s.feasible else "no",
        beats,
    ]


SUMMARY_HEADER = [
    "setting",
    "val objective",
    "90% interval",
    "Acc - CoOp-CE",
    "90% interval",
    "meets constraint",
    "P(beats hand-set)",
]


def helped(result: SearchResult) -> list[Block]:
    """Chosen vs hand-set (and the best trial, when the rule kept the hand-set one) on validation, and the verdict."""
    judged = result.judged
    if judged is None:
        return []
    v = judged.verdict
    rows = []
    if v.reference is not None:
        rows.append(_summary_row(f"hand-set (trial {v.reference})", judged.summaries[v.reference], v.reference))
    if v.best != v.reference:
        rows.append(_summary_row(f"best trial ({v.best})", judged.summaries[v.best], v.reference))
    metric = result.config.metric.upper()
    chosen = "the hand-set setting" if v.kept else f"trial {v.chosen}"
    return [
        Heading("Did the search help?"),
        Text(rule_text(result)),
        Table(SUMMARY_HEADER, rows),
        Text(f"Objective: validation {metric} (x100 in these tables). Verdict: {chosen}, because {v.reason()}."),
    ]


def _condition_cells(trial: FrozenTrial, conditions: Sequence[str]) -> list[str]:
    values = trial.user_attrs.get("conditions", {})
    shifted = [values[c]["ece"] for c in conditions[1:] if c in values]
    if len(conditions) - 1 <= SHIFT_COLUMNS:
        return [_pct(values[c]["ece"]) if c in values else "" for c in conditions]
    clean = values.get(CLEAN, {}).get("ece", float("nan"))
    return [_pct(clean), _pct(float(np.mean(shifted))), _pct(max(shifted))]


def top_trials(result: SearchResult) -> list[Block]:
    """The trials with the lowest validation objective: their settings and validation metrics, one row each."""
    judged = result.judged
    if judged is None:
        return []
    c = result.config
    trials = {t.number: t for t in result.trials}
    ranked = sorted(judged.summaries.values(), key=lambda s: (s.objective, s.number))[:TOP]
    shown = c.conditions if len(c.conditions) - 1 <= SHIFT_COLUMNS else ["clean", "mean shifted", "worst shifted"]
    header = ["trial", *c.space, *[f"val ECE % {name}" for name in shown], "val Acc %", *SUMMARY_HEADER[1:3]]
    header += ["meets constraint", "P(beats hand-set)"]
    rows = []
    for s in ranked:
        t = trials[s.number]
        params = method_params(t.params, None)
        label = f"{s.number}" + (" (hand-set)" if s.number == judged.verdict.reference else "")
        label += " ← chosen" if s.number == judged.verdict.chosen else ""
        summary = _summary_row(label, s, judged.verdict.reference)
        rows.append(
            [
                label,
                *[_param(params.get(k, "")) for k in c.space],
                *_condition_cells(t, c.conditions),
                _pct(t.user_attrs["val"]["accuracy"]),
                *summary[1:3],
                *summary[5:7],
            ]
        )
    return [
        Heading(f"Top {len(rows)} trials (validation)"),
        Text("Lowest validation objective first; ECE on the clean held-out images and on each corrupted copy."),
        Table(header, rows),
    ]


def _param(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def test_ece(rows: Sequence[Row], method: str) -> Optional[float]:
    values = [float(r["ece"]) for r in rows if r["method"] == method]
    return float(np.mean(values)) if values else None


def generalisation(result: SearchResult, best: Mapping[str, Any], test_rows: Sequence[Row]) -> list[Block]:
    """Validation-to-test gap of the tuned and hand-set settings (the test informs; it never selects)."""
    judged = result.judged
    if judged is None or not test_rows:
        return []
    c, v = result.config, judged.verdict
    hand_label = f"{c.method}:{reference_params(c.method, c.pairs[0], c.space)[0]}"
    trials = {t.number: t for t in result.trials}
    rows, tested = [], {}
    settings = [(f"tuned (trial {v.chosen})", f"{c.method}:tuned", v.chosen)]
    if v.reference is not None:
        settings.append((f"hand-set (trial {v.reference})", hand_label, v.reference))
    for label, method, number in settings:
        val = trials[number].user_attrs["val"]["ece"]
        tested[label] = test_ece(test_rows, method)
        if tested[label] is not None:
            rows.append([label, _pct(val), _pct(tested[label]), f"{100 * (tested[label] - val):+.2f}"])
    blocks: list[Block] = [
        Heading("Validation to test"),
        Table(["setting", "val ECE % (clean)", "test ECE % (mean over seeds)", "test - val"], rows),
    ]
    warning = worse_on_test(test_rows, c.method, hand_label)
    if warning:
        blocks.append(Text(f"Warning: {warning}."))
    return blocks


def worse_on_test(test_rows: Sequence[Row], method: str, hand_label: str) -> Optional[str]:
    """A plain warning when the tuned setting's mean test ECE is above the hand-set one's; None otherwise."""
    tuned, hand = test_ece(test_rows, f"{method}:tuned"), test_ece(test_rows, hand_label)
    if tuned is None or hand is None or tuned <= hand:
        return None
    return (
        f"the tuned setting calibrates worse on the test split than the hand-set one (test ECE "
        f"{100 * tuned:.2f}% vs {100 * hand:.2f}%): its validation gain did not carry over; prefer {hand_label}"
    )
