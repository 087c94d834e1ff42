"""`calbench report`: a paper-style Markdown and self-contained HTML report of a results folder.

Both files are rendered from one list of blocks (headings, text, tables, images), so
they always say the same thing. Nothing is recomputed: the report reads
``results.csv``, the reliability diagrams and the certification table
(``certification.csv``) that ``compare`` and ``certify`` wrote.
"""
from __future__ import annotations

import base64
import csv
import html
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from calbench.atomic import write_text_atomic
from calbench.errors import CalbenchError
from calbench.experiment import read_results

#: ECE (%) published for CoOp-CE and CalibPrompt (Basu et al., BMVC 2025; 8 shots, seed 1),
#: keyed by calbench's (model, dataset) ids; shown next to our numbers where the pair ran.
PUBLISHED_ECE = {
    ("plip", "kather"): (5.92, 3.11),
    ("plip", "pannuke"): (17.82, 2.19),
    ("plip", "digestpath"): (9.50, 3.08),
    ("quiltnet", "kather"): (2.49, 3.58),
    ("quiltnet", "pannuke"): (19.70, 2.47),
    ("quiltnet", "digestpath"): (11.27, 0.77),
    ("biomedclip", "covid"): (6.61, 4.69),
    ("biomedclip", "rsna18"): (7.02, 5.74),
    ("medclip", "covid"): (27.51, 27.41),
    ("medclip", "rsna18"): (17.21, 17.14),
}
REFERENCE_METHOD = "coop-ce"


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    bold: Optional[set[tuple[int, int]]] = None  # (row, column) cells to emphasise


@dataclass
class Image:
    path: Path
    caption: str


Block = Union[Heading, Text, Table, Image]


def _modality(model: str, dataset: str) -> str:
    from calbench.data import DATASETS
    from calbench.models import MODELS

    if dataset in DATASETS:
        return DATASETS.get(dataset).modality
    return MODELS.get(model).modality if model in MODELS else "other"


def _mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample std over seeds; std is None for a single seed."""
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if array.size == 0:
        return float("nan"), None
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


def _pct(mean: float, std: Optional[float]) -> str:
    if math.isnan(mean):
        return "failed"
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def build_blocks(results_dir: Path) -> list[Block]:
    """Everything the report says, in order."""
    logged = read_results(results_dir / "results.csv")
    if not logged:
        raise CalbenchError(f"{results_dir / 'results.csv'} is missing or empty; run `calbench compare --out {results_dir}` first")
    # runs with other settings (shots, parameters, weights) are not extra seeds: keep each
    # (model, dataset, method)'s most recent config only
    latest = {(r["model"], r["dataset"], r["method"]): r.get("config", "") for r in logged}
    rows = [r for r in logged if r.get("config", "") == latest[(r["model"], r["dataset"], r["method"])]]
    pairs = list(dict.fromkeys((str(r["model"]), str(r["dataset"])) for r in rows))
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    cell: dict[tuple[str, str, str], dict[str, tuple[float, Optional[float]]]] = {}
    for model, dataset in pairs:
        for method in methods:
            mine = [r for r in rows if (r["model"], r["dataset"], r["method"]) == (model, dataset, method) and r["status"] == "ok"]
            if mine:
                cell[(model, dataset, method)] = {k: _mean_std([float(r[k]) for r in mine]) for k in ("ece", "accuracy", "nll", "brier")}
    seeds = sorted({int(r["seed"]) for r in rows})
    blocks: list[Block] = [
        Heading("calbench report", 1),
        Text(
            f"{len(rows)} runs: {len(pairs)} model · dataset pair(s), {len(methods)} method(s), seeds {', '.join(map(str, seeds))}. "
            f"Test-split metrics, mean ± std over seeds (percent). Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC."
            + (f" {len(logged) - len(rows)} older run(s) with other settings are in results.csv but not shown." if len(logged) > len(rows) else "")
        ),
    ]

    header = ["method"] + [f"{m} · {d}" for m, d in pairs]
    table_rows, bold = [], set()
    for i, method in enumerate(methods):
        line = [method]
        for model, dataset in pairs:
            stats = cell.get((model, dataset, method))
            line.append("failed" if stats is None else f"ECE {_pct(*stats['ece'])} / Acc {_pct(*stats['accuracy'])}")
        table_rows.append(line)
    for j, (model, dataset) in enumerate(pairs, start=1):
        scores = {i: cell[(model, dataset, m)]["ece"][0] for i, m in enumerate(methods) if (model, dataset, m) in cell}
        if scores:
            bold.add((min(scores, key=scores.get), j))
    blocks += [Heading("Results (best ECE per column in bold)"), Table(header, table_rows, bold)]

    modalities = sorted({_modality(m, d) for m, d in pairs})
    mod_rows = []
    for method in methods:
        line = [method]
        for modality in modalities:
            cells = [cell[(m, d, method)] for m, d in pairs if _modality(m, d) == modality and (m, d, method) in cell]
            if cells:
                line.append(f"ECE {100 * np.mean([c['ece'][0] for c in cells]):.2f} / Acc {100 * np.mean([c['accuracy'][0] for c in cells]):.2f}")
            else:
                line.append("–")
        mod_rows.append(line)
    blocks += [Heading("Per-modality averages (mean over pairs)"), Table(["method", *modalities], mod_rows)]

    if any((m, d, REFERENCE_METHOD) in cell for m, d in pairs):
        rel_rows = []
        for method in methods:
            line = [method]
            for model, dataset in pairs:
                ref, mine = cell.get((model, dataset, REFERENCE_METHOD)), cell.get((model, dataset, method))
                if ref is None or mine is None or ref["ece"][0] == 0:
                    line.append("–")
                else:
                    line.append(f"{100 * (mine['ece'][0] - ref['ece'][0]) / ref['ece'][0]:+.1f}%")
            rel_rows.append(line)
        blocks += [Heading(f"Relative ECE change against {REFERENCE_METHOD}"), Table(header, rel_rows)]

    published = [(m, d) for m, d in pairs if (m, d) in PUBLISHED_ECE]
    if published:
        pub_rows = []
        for model, dataset in published:
            ce, cp = PUBLISHED_ECE[(model, dataset)]
            ours = [cell.get((model, dataset, k), {}).get("ece", (float("nan"), None))[0] for k in ("coop-ce", "calibprompt")]
            pub_rows.append([f"{model} · {dataset}", f"{ce:.2f}", f"{100 * ours[0]:.2f}", f"{cp:.2f}", f"{100 * ours[1]:.2f}"])
        blocks += [
            Heading("Next to the published numbers (ECE %)"),
            Text("Published runs used the test split as validation split and seed 1; ours validate on train-pool shots."),
            Table(["pair", "CoOp-CE published", "CoOp-CE here", "CalibPrompt published", "CalibPrompt here"], pub_rows),
        ]

    run_rows = []
    for r in rows:
        ci = "" if math.isnan(float(r["ece_ci_low"])) else f"[{100 * float(r['ece_ci_low']):.2f}, {100 * float(r['ece_ci_high']):.2f}]"
        state = "ok" if r["status"] == "ok" else f"failed: {r.get('error', '')}"
        ece = "" if math.isnan(float(r["ece"])) else f"{100 * float(r['ece']):.2f}"
        acc = "" if math.isnan(float(r["accuracy"])) else f"{100 * float(r['accuracy']):.2f}"
        run_rows.append([str(r["model"]), str(r["dataset"]), str(r["method"]), str(r["seed"]), acc, ece, ci, state])
    blocks += [
        Heading("Every run (ECE with its 95% bootstrap interval over test items)"),
        Table(["model", "dataset", "method", "seed", "Acc %", "ECE %", "ECE 95% CI", "status"], run_rows),
    ]

    blocks += _certification_blocks(results_dir / "certification.csv")

    images = sorted((results_dir / "reliability").glob("*.png"))
    if images:
        blocks.append(Heading("Reliability diagrams"))
        blocks += [Image(p, p.stem.replace("_", " · ", 2)) for p in images]
    return blocks


def _certification_blocks(path: Path) -> list[Block]:
    """PromptSmooth's table form: one row per certified setting, certified accuracy (%) per radius."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    setting = ("model", "dataset", "method", "seed", "sigma", "n0", "n", "alpha", "subset")
    radii = sorted({float(r["radius"]) for r in rows})
    grouped: dict[tuple[str, ...], dict[float, str]] = {}
    for r in rows:
        grouped.setdefault(tuple(r[k] for k in setting), {})[float(r["radius"])] = f"{100 * float(r['certified_accuracy']):.1f}"
    table = [[*key, *(cells.get(radius, "–") for radius in radii)] for key, cells in grouped.items()]
    return [Heading("Certified accuracy (%) by L2 radius"), Table([*setting, *(f"r={radius:g}" for radius in radii)], table)]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(blocks: Sequence[Block], base: Path) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}\n")
        elif isinstance(block, Text):
            out.append(block.text + "\n")
        elif isinstance(block, Table):
            bold = block.bold or set()
            out.append("| " + " | ".join(map(_md_cell, block.header)) + " |")
            out.append("|" + "---|" * len(block.header))
            for i, row in enumerate(block.rows):
                cells = [f"**{_md_cell(c)}**" if (i, j) in bold else _md_cell(c) for j, c in enumerate(row)]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        elif isinstance(block, Image):
            out.append(f"![{block.caption}]({os.path.relpath(block.path, base)})\n")
    return "\n".join(out)


def render_html(blocks: Sequence[Block]) -> str:
    """One HTML file with inline CSS and images embedded as base64 PNG."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>calbench report</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}",
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}",
        "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}figure{display:inline-block;margin:8px}",
        "</style></head><body>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            bold = block.bold or set()
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.header) + "</tr>")
            for i, row in enumerate(block.rows):
                cells = [f"<td><b>{html.escape(c)}</b></td>" if (i, j) in bold else f"<td>{html.escape(c)}</td>" for j, c in enumerate(row)]
                parts.append("<tr>" + "".join(cells) + "</tr>")
            parts.append("</table>")
        elif isinstance(block, Image):
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            parts.append(f"<figure><img src='data:image/png;base64,{data}' width='360'><figcaption>{html.escape(block.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results_dir: Path) -> tuple[Path, Path]:
    """Write report.md and report.html into ``results_dir``; return their paths."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise CalbenchError(f"results folder {results_dir} does not exist; run `calbench compare --out {results_dir}` first")
    blocks = build_blocks(results_dir)
    md, page = results_dir / "report.md", results_dir / "report.html"
    write_text_atomic(md, render_markdown(blocks, results_dir))
    write_text_atomic(page, render_html(blocks))
    return md, page
