"""The search report: the same typed blocks as the results report (:mod:`calbench.report.blocks`),
written as report.md with PNG plots in ``plots/`` beside it and a self-contained report.html.

Plots are Optuna's matplotlib visualisations (history, importances, contour, Pareto front);
the trials themselves are a table (:mod:`calbench.tune.report_verdict`). A plot that cannot be
drawn (e.g. importances from one trial) is named in the report with the reason instead.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402
from optuna.visualization import matplotlib as ovm  # noqa: E402

from calbench.atomic import save_figure_atomic  # noqa: E402
from calbench.metrics import format_mean_std  # noqa: E402
from calbench.report.blocks import Block, Heading, Image, Table, Text, write_report  # noqa: E402
from calbench.results import Row  # noqa: E402
from calbench.tune.config import is_feasible  # noqa: E402
from calbench.tune.report_verdict import generalisation, helped, top_trials  # noqa: E402
from calbench.tune.space import pair_key, reference_params  # noqa: E402
from calbench.tune.study import SearchResult  # noqa: E402

TEST_COLUMNS = [
    ("accuracy", "Acc %", 100.0),
    ("ece", "ECE %", 100.0),
    ("adaptive_ece", "AdaECE %", 100.0),
    ("nll", "NLL", 1.0),
    ("brier", "Brier", 1.0),
    ("aurc", "AURC %", 100.0),
    ("lac_size", "set size", 1.0),
]


def _wanted_plots(result: SearchResult) -> list[tuple[str, str, Callable[[], Any]]]:
    """(title, file stem, draw) for every plot this study supports."""
    study, config = result.study, result.config
    single = config.objective != "pareto"
    params = list(config.space)
    wanted: list[tuple[str, str, Callable[[], Any]]] = []
    if single:
        wanted.append(("Optimisation history", "history", lambda: ovm.plot_optimization_history(study)))
    else:
        wanted.append(
            (
                "Optimisation history (ECE)",
                "history",
                lambda: ovm.plot_optimization_history(study, target=lambda t: t.values[0], target_name="val ECE"),
            )
        )
        wanted.append(
            (
                "Pareto front (validation ECE vs accuracy)",
                "pareto",
                lambda: ovm.plot_pareto_front(study, target_names=["val ECE", "val accuracy"]),
            )
        )
    target = None if single else (lambda t: t.values[0])
    wanted.append(("Parameter importances", "importances", lambda: ovm.plot_param_importances(study, target=target)))
    # no parallel-coordinates plot: its axis labels overlap at any readable size; the top-trials table shows the same
    if {"alpha", "w_as"} <= set(params):
        wanted.append(
            (
                "alpha × w_AS contour",
                "contour",
                lambda: ovm.plot_contour(study, params=["alpha", "w_as"], target=target),
            )
        )
    return wanted


def _plots(result: SearchResult, folder: Path) -> list[Block]:
    """A heading per plot, then its PNG, or why it is missing."""
    complete = [t for t in result.trials if t.state == TrialState.COMPLETE]
    blocks: list[Block] = []
    for title, stem, draw in _wanted_plots(result):
        blocks.append(Heading(title, 3))
        if len(complete) < 2:
            blocks.append(Text(f"needs at least 2 completed trials, has {len(complete)}"))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                drawn = draw()
            axes = drawn.flat[0] if isinstance(drawn, np.ndarray) else drawn
            save_figure_atomic(folder / f"{stem}.png", axes.get_figure(), dpi=100, bbox_inches="tight")
            blocks.append(Image(folder / f"{stem}.png", title, width=None))
        except Exception as exc:  # a plot the data cannot support stays out, with its reason
            plt.close("all")
            blocks.append(Text(f"not drawn: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"))
    return blocks


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    return Table(list(header), [[_fmt(c) for c in row] for row in rows])


def trial_counts(trials: Sequence[FrozenTrial]) -> dict[str, Any]:
    """How the study's trials ended, with the reasons for pruned and failed ones."""
    states = Counter(t.state.name.lower() for t in trials)
    killed = [t for t in trials if t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs]
    reasons = Counter(
        t.user_attrs["fail_reason"].split(":")[0]
        for t in trials
        if t.state == TrialState.FAIL and "fail_reason" in t.user_attrs
    )
    if killed:
        reasons[
            "worker died or was interrupted, or the objective was not a number "
            f"(re-queued: {sum(1 for t in trials if 'failed_trial' in t.system_attrs)})"
        ] += len(killed)
    pruned = Counter(
        t.user_attrs.get("pruned_at", "").split(" (")[0].split(" of ")[0]
        for t in trials
        if t.state == TrialState.PRUNED
    )
    return {"states": dict(states), "fail_reasons": dict(reasons), "pruned_at": dict(pruned)}


def _overview(result: SearchResult) -> list[Block]:
    c, trials = result.config, result.trials
    counts = trial_counts(trials)
    seconds = [t.user_attrs["seconds"] for t in trials if "seconds" in t.user_attrs]
    ended = ", ".join(f"{n} {state}" for state, n in sorted(counts["states"].items())) + f" ({len(trials)} in all)"
    ended += (f"; {np.mean(seconds):.2f} s per completed trial on average" if seconds else "") + "."
    blocks: list[Block] = [
        Heading(
            f"Hyper-parameter search: {c.method} · {c.modality + ' (modality)' if c.modality else pair_key(c.pairs[0])}",
            1,
        ),
        Text(
            f"Study {result.study.study_name} · objective {c.objective} on the validation split "
            f"(accuracy not below CoOp-CE's by more than {c.acc_tolerance:g} point(s) beyond the noise) · {c.shots} "
            f"shots, {c.val_shots or c.shots} validation shots per class · split seeds "
            f"{', '.join(map(str, c.split_seeds))} x {c.folds} fold(s) · "
            + (
                f"shifted validation copies {', '.join(c.conditions[1:])} ({c.shift_objective}) · "
                if c.val_shift
                else ""
            )
            + f"{c.train_epochs} epochs · pruner {c.pruner if c.objective != 'pareto' else 'none (multi-objective)'}."
        ),
        Text(f"Pairs: {', '.join(pair_key(p) for p in c.pairs)}. The test split was not loaded during the search."),
        Heading("Trials"),
        Text(ended),
    ]
    if counts["pruned_at"]:
        blocks.append(
            Text("Pruned at: " + ", ".join(f"{where} ({n})" for where, n in sorted(counts["pruned_at"].items())) + ".")
        )
    if counts["fail_reasons"]:
        blocks.append(
            Text("Failed: " + "; ".join(f"{why} ({n})" for why, n in sorted(counts["fail_reasons"].items())) + ".")
        )
    if result.surplus:
        blocks.append(Text(surplus_line(result) + "."))
    return blocks


def surplus_line(result: SearchResult) -> str:
    """Why a study holds more scored trials than --trials (several workers; at most one each)."""
    return (
        f"{result.surplus} scored trial(s) beyond --trials {result.n_trials}: other workers' trials "
        "were still running when the total was reached (at most one per worker)"
    )


def _best(result: SearchResult, best: Mapping[str, Any]) -> list[Block]:
    val = best.get("val", {})
    feasible = best.get("feasible", True)
    rows: list[list[Any]] = [
        [
            f"tuned (trial {best['trial']})",
            100 * val.get("accuracy", float("nan")),
            100 * val.get("ece", float("nan")),
            val.get("nll", float("nan")),
            100 * val.get("aurc", float("nan")),
            val.get("conformal-size", float("nan")),
            "yes" if feasible else "no",
        ]
    ]
    for t in [t for t in result.trials if "enqueued" in t.user_attrs and t.state == TrialState.COMPLETE]:
        v = t.user_attrs["val"]
        rows.append(
            [
                f"{t.user_attrs['enqueued']} (trial {t.number})",
                100 * v["accuracy"],
                100 * v["ece"],
                v["nll"],
                100 * v.get("aurc", float("nan")),
                v.get("conformal-size", float("nan")),
                "yes" if is_feasible(t) else "no",
            ]
        )
    reference = best.get("reference_accuracy", {})
    if reference:
        rows.append(["coop-ce (reference)", 100 * float(np.mean(list(reference.values()))), "", "", "", "", ""])
    return [
        Heading("Best setting"),
        Text(
            f"Trial {best['trial']}"
            + ("" if feasible else " (no trial met the accuracy constraint: smallest violation)")
            + ":"
        ),
        _table(["parameter", "value"], list(best["params"].items())),
        Text("Validation (mean over pairs and split seeds):"),
        _table(
            ["setting", "val Acc %", "val ECE %", "val NLL", "val AURC %", "val set size", "meets accuracy constraint"],
            rows,
        ),
    ]


def _fronts_and_pairs(result: SearchResult, best: Mapping[str, Any]) -> list[Block]:
    c = result.config
    blocks: list[Block] = []
    if best.get("pareto_front"):
        rows = [
            (f["trial"], 100 * f["ece"], 100 * f["accuracy"], *[f["params"].get(k, "") for k in c.space])
            for f in best["pareto_front"]
        ]
        blocks += [Heading("Pareto front (validation)"), _table(["trial", "val ECE %", "val Acc %", *c.space], rows)]
    if len(c.pairs) > 1:
        rows = []
        for key, info in best["per_pair"].items():
            shared, own = info["shared_val"][c.metric], info["val"][c.metric]
            rows.append((key, shared, f"{own:.4g} (trial {info['trial']})", shared - own))
        blocks += [
            Heading("Shared setting against each pair's own optimum"),
            Text(
                f"Validation {c.metric} per pair: the shared best, and the best trial of this search for that pair alone."
            ),
            _table(["pair", f"shared {c.metric}", f"per-pair best {c.metric}", "gap"], rows),
        ]
    return blocks


def _test(result: SearchResult, test_rows: Sequence[Row]) -> list[Block]:
    if not test_rows:
        return []
    c = result.config
    keys = list(dict.fromkeys((str(r["model"]), str(r["dataset"]), str(r["method"])) for r in test_rows))
    table = []
    for model, dataset, method in keys:
        mine = [
            r for r in test_rows if (str(r["model"]), str(r["dataset"]), str(r["method"])) == (model, dataset, method)
        ]
        table.append(
            [
                f"{model}/{dataset}",
                method,
                len(mine),
                *[format_mean_std([float(r[k]) for r in mine], s) for k, _, s in TEST_COLUMNS],
            ]
        )
    label = reference_params(c.method, c.pairs[0], c.space)[0]
    return [
        Heading("Test split (evaluated once, after the search)"),
        _table(["pair", "method", "seeds", *[h for _, h, _ in TEST_COLUMNS]], table),
        Text(
            f"{c.method}:tuned is the best setting above; {c.method}:{label} the hand-set one; mean ± std over seeds."
        ),
    ]


def write_tune_report(
    result: SearchResult, best: Mapping[str, Any], test_rows: Sequence[Row], out: Path
) -> tuple[Path, Path]:
    """Write ``out``/report.md (plots in ``out``/plots/) and a self-contained ``out``/report.html."""
    out = Path(out)
    blocks = _overview(result) + _best(result, best) + helped(result) + top_trials(result)
    blocks += _fronts_and_pairs(result, best) + _test(result, test_rows) + generalisation(result, best, test_rows)
    blocks += [Heading("Plots"), *_plots(result, out / "plots")]
    return write_report(blocks, out, f"tune {result.study.study_name}")
