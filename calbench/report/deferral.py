"""The report's "Deferral" and "Shift" sections: when to hand a case to a clinician, and how
calibration holds up on corrupted test images. Read from results.csv, shift.csv and the plots
`compare` drew; nothing is recomputed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from calbench.data.corruptions import CONDITIONS
from calbench.deferral import COVERAGES, SCORES
from calbench.metrics import format_mean_std
from calbench.report.blocks import Block, Heading, Image, Table, Text
from calbench.results import SCORED, Row, logged_shift

READING = (
    "How to read this section. AURC is the mean error rate among the most confident cases over every "
    "coverage (lower is better) and E-AURC its excess over a perfect ranking of the errors: both judge "
    "the ranking a confidence gives, which ECE does not. A method that lowers ECE but not AURC reports "
    "honest average confidence but does not tell its right answers from its wrong ones any better, so it "
    "would not let a clinic automate more cases at the same error. 'Coverage at target' is the share of "
    "test cases whose confidence clears a threshold chosen on the validation split for the target error, "
    "and 'its test error' is the error those cases actually had: a method whose test error exceeds the "
    "target was overconfident where it mattered. Conformal sets hold the true label with probability at "
    "least 1 - alpha on average over validation draws; smaller sets at that coverage are more useful, "
    "and the worst class shows whether the guarantee holds for every class or only on average."
)


def _key(row: Row, names: Mapping[str, str]) -> tuple[str, ...]:
    """A shown row's results key, with its dataset label turned back into the dataset's name."""
    return (row["model"], names.get(row["dataset"], row["dataset"]), row["method"], str(row["seed"]), row["config"])


def _groups(rows: Sequence[Row]) -> dict[tuple[str, str, str], list[Row]]:
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        if row["status"] in SCORED:
            groups.setdefault((str(row["model"]), str(row["dataset"]), str(row["method"])), []).append(row)
    return groups


def _cell(rows: Sequence[Row], column: str, scale: float = 100.0) -> str:
    return format_mean_std((float(r.get(column, math.nan)) for r in rows), scale)


def _threshold(rows: Sequence[Row]) -> str:
    values = [float(r.get("sel_threshold", math.nan)) for r in rows]
    if all(math.isinf(v) for v in values):
        return "defer all"
    return format_mean_std((v for v in values if not math.isinf(v)), 1.0)


def _finite_sample(groups: Mapping[tuple[str, str, str], list[Row]], alpha_of: Mapping[float, float]) -> list[Block]:
    """The calibration-conditional spread of conformal coverage for each validation size that ran."""
    from scipy.stats import beta

    lines = []
    for (n, level), alpha in sorted(alpha_of.items()):
        k = round(level * n)
        if k > n or n < 1:
            continue
        low, high = beta.ppf([0.05, 0.95], k, n + 1 - k)
        lines.append(
            f"n = {n:.0f} validation cases: the sets use score number {k} in increasing order (level {level:.3f} >= "
            f"1 - alpha = {1 - alpha:g}); the coverage of one calibrated run is Beta({k}, {n + 1 - k:.0f}) "
            f"distributed, 90% of validation draws giving between {100 * low:.1f}% and {100 * high:.1f}%."
        )
    return [Text(line) for line in lines]


def deferral_blocks(rows: Sequence[Row], results_dir: Path) -> list[Block]:
    """Selective prediction and conformal tables, the finite-sample note, risk–coverage plots and
    smoothed reliability diagrams; nothing when no shown run has deferral columns."""
    groups = {k: v for k, v in _groups(rows).items() if not math.isnan(float(v[0].get("aurc", math.nan)))}
    if not groups:
        return []
    targets = sorted({float(r["sel_target"]) for runs in groups.values() for r in runs})
    selective, conformal = [], []
    for (model, dataset, method), runs in groups.items():
        head = [f"{model} · {dataset}", method]
        selective.append(
            head
            + [_cell(runs, c) for c in ("aurc", "eaurc", *(f"acc_at_{round(100 * c)}" for c in COVERAGES))]
            + [_cell(runs, "smooth_ece"), _threshold(runs), _cell(runs, "sel_coverage"), _cell(runs, "sel_error")]
        )
        sets = [f"{_cell(runs, f'{s}_coverage')} / {_cell(runs, f'{s}_size', 1.0)}" for s in SCORES]
        worst = [_cell(runs, f"{s}_worst_class") for s in SCORES]
        conformal.append(head + [_cell(runs, "lac_singleton")] + sets + worst)
    coverage_heads = [f"Acc@{round(100 * c)}% cov" for c in COVERAGES]
    alpha_of = {
        (float(r["conformal_n"]), float(r["conformal_level"])): float(r["conformal_alpha"])
        for runs in groups.values()
        for r in runs
        if not math.isnan(float(r.get("conformal_n", math.nan))) and not math.isnan(float(r["conformal_level"]))
    }
    blocks: list[Block] = [
        Heading("Deferral: when to hand a case to a clinician"),
        Text(READING),
        Heading("Selective prediction (test split, mean ± std over seeds, %)", 3),
        Text(f"Target error of the automated cases: {', '.join(f'{100 * t:g}%' for t in targets)}."),
        Table(
            ["pair", "method", "AURC", "E-AURC", *coverage_heads, "smooth ECE"]
            + ["threshold (from validation)", "coverage at target", "its test error"],
            selective,
        ),
        Heading("Conformal prediction sets, calibrated on validation (coverage % / mean set size)", 3),
        Table(
            ["pair", "method", "LAC singletons %", *(s.upper() for s in SCORES)]
            + [f"{s.upper()} worst-class coverage %" for s in SCORES],
            conformal,
        ),
        *_finite_sample(groups, alpha_of),
    ]
    blocks += _images(results_dir / "risk_coverage", "Risk–coverage curves (test, seeds pooled)", 560)
    blocks += _images(results_dir / "reliability_smooth", "Smoothed reliability diagrams (relplot)")
    return blocks


def _images(folder: Path, title: str, width: int = 360) -> list[Block]:
    images = sorted(folder.glob("*.png"))
    if not images:
        return []
    return [Heading(title, 3), *(Image(p, p.stem.replace("_", " · ", 2), width) for p in images)]


def shift_blocks(rows: Sequence[Row], names: Mapping[str, str], results_dir: Path) -> list[Block]:
    """Accuracy and ECE by corruption severity per method, ECE per corruption, and the shift plots."""
    shown = {_key(r, names): r for r in rows if r["status"] in SCORED}
    by: dict[tuple[str, str, str], dict[tuple[str, int], list[Row]]] = {}
    for shifted in logged_shift(results_dir, CONDITIONS):
        row = shown.get(tuple(str(shifted[k]) for k in ("model", "dataset", "method", "seed", "config")))
        if row is not None:
            cell = by.setdefault((str(row["model"]), str(row["dataset"]), str(row["method"])), {})
            cell.setdefault((str(shifted["corruption"]), int(shifted["severity"])), []).append(shifted)
    if not by:
        return []
    groups = _groups(rows)
    corruptions = list(dict.fromkeys(c for cells in by.values() for c, _ in cells))
    severity_rows, corruption_rows = [], []
    for (model, dataset, method), cells in by.items():
        clean = groups.get((model, dataset, method), [])
        line = [f"{model} · {dataset}", method, f"{_cell(clean, 'accuracy')} / {_cell(clean, 'ece')}"]
        for severity in range(1, 6):
            runs = [r for (_, s), rs in cells.items() if s == severity for r in rs]
            line.append(f"{_cell(runs, 'accuracy')} / {_cell(runs, 'ece')}" if runs else "–")
        severity_rows.append(line)
        per = [[r for (c, _), rs in cells.items() if c == name for r in rs] for name in corruptions]
        corruption_rows.append([f"{model} · {dataset}", method, *(_cell(runs, "ece") for runs in per)])
    return [
        Heading("Shift: calibration on corrupted test images"),
        Text(
            "Every run is scored again on copies of its test images corrupted at five severities (ImageNet-C's "
            "noise, blur, JPEG, brightness and contrast; an H&E stain jitter), as in Ovadia et al. (NeurIPS "
            "2019). A calibrated method should lose accuracy without becoming overconfident: its ECE should "
            "grow slowly with severity."
        ),
        Table(
            ["pair", "method", "clean", *(f"severity {s}" for s in range(1, 6))],
            severity_rows,
        ),
        Text("Acc % / ECE %, mean ± std over corruptions and seeds."),
        Heading("ECE % per corruption (mean over severities 1-5 and seeds)", 3),
        Table(["pair", "method", *corruptions], corruption_rows),
        *_images(results_dir / "shift", "Accuracy and ECE by severity", 840),
    ]
