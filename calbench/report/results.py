"""`calbench report`: a paper-style report of a results folder.

Nothing is recomputed: the report reads ``results.csv``, the reliability diagrams and
``certification.csv`` that ``compare`` and ``certify`` wrote, and renders them as typed
blocks (:mod:`calbench.report.blocks`) into report.md and a self-contained report.html.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from calbench import published
from calbench.errors import CalbenchError
from calbench.models import published_model
from calbench.report.blocks import Block, Heading, Image, Table, Text, write_report
from calbench.report.deferral import deferral_blocks, shift_blocks
from calbench.report.jobs import failed_jobs_blocks
from calbench.report.summary import Summary, pct
from calbench.results import Row, diagram_stem, logged_rows, logged_settings, read_certification

__all__ = ["build_blocks", "write_results_report"]

REFERENCE_METHOD = "coop-ce"


def _published_note(ran: Mapping[str, Any], same: bool, unlike: str) -> str:
    """ "(published)" only for the published setting on a model run as the published code runs it."""
    if not ran:
        return ""
    if not same:
        return " (differs from the published)"
    return f" (published setting; {unlike})" if unlike else " (published)"


def _unlike_published(model: str) -> str:
    """How ``model`` runs differently from the published code ('' where it runs as published)."""
    from calbench.models import MODELS

    return MODELS.get(model).unlike_published if model in MODELS else "not a registered model"


def _modality(model: str, dataset: str) -> str:
    from calbench.data import DATASETS
    from calbench.models import MODELS

    if dataset in DATASETS:
        return DATASETS.get(dataset).modality
    return MODELS.get(model).modality if model in MODELS else "other"


def _summary(res: Summary) -> list[Block]:
    seeds = res.seeds()
    hidden = len(res.logged) - len(res.rows)
    return [
        Heading("calbench report", 1),
        Text(
            f"{len(res.rows)} runs: {len(res.pairs)} model · dataset pair(s), {len(res.methods)} method(s), seeds {', '.join(map(str, seeds))}. "
            f"Test-split metrics, mean ± std over seeds (percent). Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC."
            + (f" {hidden} older run(s) with other settings are in results.csv but not shown." if hidden else "")
        ),
    ]


def _main_table(res: Summary) -> list[Block]:
    header = ["method"] + [f"{m} · {d}" for m, d in res.pairs]
    rows = []
    for method in res.methods:
        cells = [(pair, res.cell.get((*pair, method))) for pair in res.pairs]
        rows.append(
            [method]
            + [
                "failed" if s is None else f"ECE {pct(*s['ece'])} / Acc {pct(*s['accuracy'])}{res.mark(pair, method)}"
                for pair, s in cells
            ]
        )
    best = [res.best_ece(pair) for pair in res.pairs]
    bold = {(res.methods.index(m), j) for j, m in enumerate(best, start=1) if m is not None}
    blocks: list[Block] = [Heading("Results (best ECE per column in bold)"), Table(header, rows, bold)]
    if res.degenerate:
        blocks.append(
            Text(
                "Degenerate runs predicted near-uniform probabilities (the status column of every run says why): "
                "their metrics are shown but they are never the best ECE."
            )
        )
    return blocks


def _modality_table(res: Summary) -> list[Block]:
    modalities = sorted({_modality(m, res.names[d]) for m, d in res.pairs})
    rows = []
    for method in res.methods:
        line = [method]
        for modality in modalities:
            cells = [
                res.cell[(m, d, method)]
                for m, d in res.pairs
                if _modality(m, res.names[d]) == modality and (m, d, method) in res.cell
            ]
            ece, acc = (np.mean([c[k][0] for c in cells]) for k in ("ece", "accuracy")) if cells else (None, None)
            line.append(f"ECE {100 * ece:.2f} / Acc {100 * acc:.2f}" if cells else "–")
        rows.append(line)
    return [Heading("Per-modality averages (mean over pairs)"), Table(["method", *modalities], rows)]


def _relative_table(res: Summary) -> list[Block]:
    if not any((*pair, REFERENCE_METHOD) in res.cell for pair in res.pairs):
        return []
    rows = []
    for method in res.methods:
        line = [method]
        for pair in res.pairs:
            ref, mine = res.ece(pair, REFERENCE_METHOD), res.ece(pair, method)
            line.append("–" if ref is None or mine is None or ref == 0 else f"{100 * (mine - ref) / ref:+.1f}%")
        rows.append(line)
    header = ["method"] + [f"{m} · {d}" for m, d in res.pairs]
    return [Heading(f"Relative ECE change against {REFERENCE_METHOD}"), Table(header, rows)]


def _published_table(res: Summary, settings: Mapping[str, Mapping[str, Any]]) -> list[Block]:
    """Our CoOp-CE and CalibPrompt ECE next to the published ones, with the CalibPrompt setting each ran."""
    rows = []
    for pair in res.pairs:
        row = published.pair(str(published_model(pair[0])), res.names[pair[1]])
        if row is None:
            continue
        ours = [res.ece(pair, k) for k in ("coop-ce", "calibprompt")]
        here = ["–" if e is None else f"{100 * e:.2f}" for e in ours]
        ran = settings.get(res.config_of(pair, "calibprompt") or "", {}).get("settings", {})
        same = all(ran.get(k, [None])[0] == v.value for k, v in row.settings.items())
        setting = ", ".join(f"{k} {_short(ran[k][0])}" for k in row.settings if k in ran)
        note = _published_note(ran, same, _unlike_published(pair[0]))
        rows.append(
            [
                f"{pair[0]} · {pair[1]}",
                f"{row.published_ece['coop-ce']:.2f}",
                here[0],
                f"{row.published_ece['calibprompt']:.2f}",
                here[1],
                (setting + note) if ran else "–",
            ]
        )
    if not rows:
        return []
    return [
        Heading("Next to the published numbers (ECE %)"),
        Text(
            "Published runs used the test split as validation split and seed 1 (CalibPrompt's README, which "
            "lists these numbers); ours validate on train-pool shots."
        ),
        Table(
            ["pair", "CoOp-CE published", "CoOp-CE here", "CalibPrompt published", "CalibPrompt here", "setting here"],
            rows,
        ),
    ]


def _short(value: object) -> str:
    if isinstance(value, list):
        return ",".join(_short(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _origin(source: str) -> str:
    """A setting's source in a few words: --params, calbench, or the published file and line."""
    if source == "--params" or source.startswith("calbench"):
        return source.split(":")[0]
    place = source.split(" — ")[0].split(" ", 1)[-1]
    return place.rsplit("/", 1)[-1]


def _settings_table(res: Summary, settings: Mapping[str, Mapping[str, Any]]) -> list[Block]:
    """What each shown method ran with on each pair: its own settings and what it changed of the
    trainer's defaults, each with where it comes from (settings.json, written by compare)."""
    trainer = {k: [s.value, s.source] for k, s in published.section("train").items()}
    rows = []
    for pair in res.pairs:
        for method in res.methods:
            record = settings.get(res.config_of(pair, method) or "")
            if record is None:
                continue
            shown = {k: v for k, v in record["settings"].items() if trainer.get(k) != list(v)}
            text = "; ".join(f"{k} {_short(v[0])} ({_origin(str(v[1]))})" for k, v in shown.items())
            rows.append([f"{pair[0]} · {pair[1]}", method, text or "defaults"])
    if not rows:
        return []
    base = ", ".join(f"{k} {_short(v[0])}" for k, v in trainer.items())
    return [
        Heading("Settings each method ran with"),
        Text(f"Besides these, every prompt-learning method ran with the trainer's defaults: {base}."),
        Table(["pair", "method", "settings (source)"], rows),
    ]


def _runs_table(res: Summary) -> list[Block]:
    def pct(value: object) -> str:
        return "" if math.isnan(float(value)) else f"{100 * float(value):.2f}"

    rows = []
    for r in res.rows:
        ci = f"[{pct(r['ece_ci_low'])}, {pct(r['ece_ci_high'])}]" if pct(r["ece_ci_low"]) else ""
        state = "ok" if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"
        rows.append(
            [
                str(r["model"]),
                str(r["dataset"]),
                str(r["method"]),
                str(r["seed"]),
                pct(r["accuracy"]),
                pct(r["ece"]),
                ci,
                state,
            ]
        )
    return [
        Heading("Every run (ECE with its 95% bootstrap interval over test items)"),
        Table(["model", "dataset", "method", "seed", "Acc %", "ECE %", "ECE 95% CI", "status"], rows),
    ]


def _certification(rows: Sequence[Row]) -> list[Block]:
    """PromptSmooth's table form: one row per certified setting, certified accuracy (%) per radius."""
    if not rows:
        return []
    setting = ("model", "dataset", "method", "seed", "sigma", "n0", "n", "alpha", "subset")
    radii = sorted({float(r["radius"]) for r in rows})
    grouped: dict[tuple[str, ...], dict[float, str]] = {}
    for r in rows:
        grouped.setdefault(tuple(r[k] for k in setting), {})[float(r["radius"])] = (
            f"{100 * float(r['certified_accuracy']):.1f}"
        )
    table = [[*key, *(cells.get(radius, "–") for radius in radii)] for key, cells in grouped.items()]
    return [
        Heading("Certified accuracy (%) by L2 radius"),
        Table([*setting, *(f"r={radius:g}" for radius in radii)], table),
    ]


def build_blocks(results_dir: Path) -> list[Block]:
    """Everything the report says, in order."""
    logged = logged_rows(results_dir)
    if not logged:
        raise CalbenchError(
            f"{results_dir / 'results.csv'} is missing or empty; run `calbench compare --out {results_dir}` first"
        )
    res = Summary(logged)
    settings = logged_settings(results_dir)
    blocks = (
        _summary(res)
        + _main_table(res)
        + _modality_table(res)
        + _relative_table(res)
        + _published_table(res, settings)
        + _settings_table(res, settings)
        + _runs_table(res)
    )
    blocks += _certification(read_certification(results_dir / "certification.csv"))
    blocks += deferral_blocks(res.rows, results_dir) + shift_blocks(res.rows, res.names, results_dir)
    blocks += failed_jobs_blocks(results_dir)
    images = sorted((results_dir / "reliability").glob("*.png"))
    captions = {diagram_stem(m, d, method): f"{m} · {d} · {method}" for m, d, method in res.cell}
    if images:
        blocks += [
            Heading("Reliability diagrams"),
            *(Image(p, captions.get(p.stem, p.stem.replace("_", " · ", 2))) for p in images),
        ]
    return blocks


def write_results_report(results_dir: Path) -> tuple[Path, Path]:
    """Write report.md and report.html into ``results_dir``; return their paths."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise CalbenchError(
            f"results folder {results_dir} does not exist; run `calbench compare --out {results_dir}` first"
        )
    return write_report(build_blocks(results_dir), results_dir, "calbench report")
