"""Options and console tables of the deferral and shift measures (`compare`, `evaluate`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import typer
from rich.table import Table

from calbench.deferral import DeferralSettings

AlphaOpt = typer.Option(
    DeferralSettings.alpha,
    "--conformal-alpha",
    help="Miscoverage of the conformal prediction sets (0.1: sets hold the true label 90% of the time).",
)
TargetErrorOpt = typer.Option(
    DeferralSettings.target_error,
    "--target-error",
    help="Error rate the automated cases may have; the confidence threshold for it is chosen on validation.",
)
ShiftOpt = typer.Option(
    False, "--shift", help="Also score every run on corrupted test copies (noise, blur, JPEG, brightness, ...)."
)
SmoothDiagramsOpt = typer.Option(
    False, "--smooth-diagrams", help="Also draw a smoothed reliability diagram (relplot) per method."
)


def extras(alpha: float, target_error: float, shift: bool, smooth_diagrams: bool) -> Any:
    """The grid's :class:`~calbench.compare.deferral_shift.DeferralShiftOptions` from the options above."""
    from calbench.compare.deferral_shift import DeferralShiftOptions

    return DeferralShiftOptions(DeferralSettings(alpha, target_error), shift, smooth_diagrams)


#: (column, header, scale): percentages for rates, set sizes as they are
DEFERRAL = [
    ("smooth_ece", "smECE %", 100),
    ("aurc", "AURC %", 100),
    ("eaurc", "E-AURC %", 100),
    ("acc_at_90", "Acc@90% cov", 100),
    ("sel_coverage", "cov@target %", 100),
    ("sel_error", "its test err %", 100),
    ("lac_coverage", "LAC cov %", 100),
    ("lac_size", "LAC size", 1),
    ("aps_coverage", "APS cov %", 100),
    ("aps_size", "APS size", 1),
    ("raps_coverage", "RAPS cov %", 100),
    ("raps_size", "RAPS size", 1),
]


def _mean(values: Sequence[float], scale: float) -> str:
    kept = [v for v in values if not math.isnan(v)]
    return f"{scale * sum(kept) / len(kept):.2f}" if kept else "–"


def deferral_table(rows: Sequence[Mapping[str, Any]], title: str) -> Table:
    """Mean over seeds per method of the deferral columns: thresholds and sets fitted on validation."""
    from calbench.results import SCORED

    table = Table(title=title)
    table.add_column("method", no_wrap=True)
    for _, header, _ in DEFERRAL:
        table.add_column(header, justify="right")
    for method in dict.fromkeys(row["method"] for row in rows):
        ok = [row for row in rows if row["method"] == method and row["status"] in SCORED]
        table.add_row(method, *(_mean([float(row.get(k, math.nan)) for row in ok], s) for k, _, s in DEFERRAL))
    return table


def shift_table(rows: Sequence[Mapping[str, Any]], shifted: Sequence[Mapping[str, Any]], title: str) -> Table:
    """Accuracy / ECE (%) per method by severity, means over corruptions and seeds (severity 0: clean)."""
    from calbench.results import SCORED, ResultsStore

    of = {ResultsStore.key(row): row for row in rows if row["status"] in SCORED}
    table = Table(title=title)
    table.add_column("method", no_wrap=True)
    for severity in range(6):
        table.add_column("clean" if severity == 0 else f"severity {severity}", justify="right")
    for method in dict.fromkeys(row["method"] for row in of.values()):
        by: dict[int, list[tuple[float, float]]] = {0: []}
        for row in of.values():
            if row["method"] == method:
                by[0].append((float(row["accuracy"]), float(row["ece"])))
        for row in shifted:
            run = of.get(ResultsStore.key(row))
            if run is not None and run["method"] == method:
                by.setdefault(int(row["severity"]), []).append((float(row["accuracy"]), float(row["ece"])))
        cells = []
        for severity in range(6):
            pairs = by.get(severity, [])
            accs, eces = [a for a, _ in pairs], [e for _, e in pairs]
            cells.append(f"{_mean(accs, 100)} / {_mean(eces, 100)}" if pairs else "–")
        table.add_row(method, *cells)
    return table


def evaluation_table(metrics: Mapping[str, float], title: str) -> Table:
    """One scored prompt's deferral measures (`evaluate`): those fitted on validation only where present."""
    table = Table(title=title)
    shown = [(k, header, s) for k, header, s in DEFERRAL if k in metrics]
    for _, header, _ in shown:
        table.add_column(header, justify="right")
    table.add_row(*(_mean([float(metrics[k])], s) for k, _, s in shown))
    return table
