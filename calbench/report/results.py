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
from typing import Any, Optional

import numpy as np

from calbench import published
from calbench.errors import CalbenchError
from calbench.report.blocks import Block, Heading, Image, Table, Text, write_report
from calbench.report.deferral import deferral_blocks, shift_blocks
from calbench.report.jobs import failed_jobs_blocks
from calbench.results import SCORED, Row, mean_std, read_certification, read_results, read_settings
from calbench.shards import merge_shards

REFERENCE_METHOD = "coop-ce"
#: statuses of runs with metrics; a ``degenerate`` run (near-uniform predictions) is never the best ECE

Pair = tuple[str, str]
Stats = dict[str, tuple[float, Optional[float]]]


def dataset_labels(rows: Sequence[Row]) -> dict[tuple[str, str], str]:
    """How the report and the diagrams name each (dataset, dataset_id): the plain name, unless another
    dataset in the same results shares it; then the name and its identity, e.g. "data (a1b2c3)".

    Rows from before results.csv had a dataset_id (empty) count as the name's one identified dataset;
    a rerun of `compare` fills their id in. With several, they are "data (unknown)".
    """
    found: dict[str, set[str]] = {}
    for r in rows:
        found.setdefault(str(r["dataset"]), set()).add(str(r.get("dataset_id") or ""))
    labels = {}
    for name, ids in found.items():
        unique = len(ids - {""}) <= 1
        labels.update({(name, i): name if unique else f"{name} ({i or 'unknown'})" for i in ids})
    return labels


def diagram_stem(model: str, dataset_label: str, method: str) -> str:
    """File stem of a reliability diagram, e.g. tiny_synthetic_coop-ce_ts; an identity as data-a1b2c3."""
    tag = dataset_label.replace(" (", "-").replace(")", "")
    return f"{model}_{tag}_{method.replace('+', '_')}"


def _modality(model: str, dataset: str) -> str:
    from calbench.data import DATASETS
    from calbench.models import MODELS

    if dataset in DATASETS:
        return DATASETS.get(dataset).modality
    return MODELS.get(model).modality if model in MODELS else "other"


def _published_model(model: str) -> str:
    """A model variant (``medclip-masked``) is compared with its model's published numbers."""
    from calbench.models import MODELS

    return MODELS.get(model).weights_name if model in MODELS else model


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


def _pct(mean: float, std: Optional[float]) -> str:
    if math.isnan(mean):
        return "failed"
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


class _Results:
    """The logged runs a report shows: each (model, dataset, method)'s latest config, summarised over seeds.

    Each row's ``dataset`` is its label (:func:`dataset_labels`); ``names`` maps labels back to names.
    """

    def __init__(self, logged: list[Row]) -> None:
        labels = dataset_labels(logged)
        logged = [{**r, "dataset": labels[(str(r["dataset"]), str(r.get("dataset_id") or ""))]} for r in logged]
        self.names = {labels[key]: key[0] for key in labels}
        # runs with other settings (shots, parameters, weights) are not extra seeds: keep the most recent config
        latest = {(r["model"], r["dataset"], r["method"]): r.get("config", "") for r in logged}
        self.logged = logged
        self.rows = [r for r in logged if r.get("config", "") == latest[(r["model"], r["dataset"], r["method"])]]
        self.pairs: list[Pair] = list(dict.fromkeys((str(r["model"]), str(r["dataset"])) for r in self.rows))
        self.methods = list(dict.fromkeys(str(r["method"]) for r in self.rows))
        self.cell: dict[tuple[str, str, str], Stats] = {}
        #: (model, dataset, method) -> (degenerate seeds, scored seeds), for cells with a degenerate run
        self.degenerate: dict[tuple[str, str, str], tuple[int, int]] = {}
        for r in self.rows:
            key = (str(r["model"]), str(r["dataset"]), str(r["method"]))
            if key not in self.cell and r["status"] in SCORED:
                mine = [
                    o for o in self.rows if (o["model"], o["dataset"], o["method"]) == key and o["status"] in SCORED
                ]
                self.cell[key] = {k: mean_std(float(o[k]) for o in mine) for k in ("ece", "accuracy", "nll", "brier")}
                collapsed = sum(o["status"] == "degenerate" for o in mine)
                if collapsed:
                    self.degenerate[key] = (collapsed, len(mine))

    def config_of(self, pair: Pair, method: str) -> Optional[str]:
        """The config hash of the runs shown for (pair, method)."""
        return next(
            (str(r.get("config", "")) for r in self.rows if (r["model"], r["dataset"], r["method"]) == (*pair, method)),
            None,
        )

    def ece(self, pair: Pair, method: str) -> Optional[float]:
        stats = self.cell.get((*pair, method))
        return None if stats is None else stats["ece"][0]

    def mark(self, pair: Pair, method: str) -> str:
        """ " (degenerate)" after a cell whose runs collapsed to near-uniform predictions ("1/3 seeds" if some did)."""
        if (*pair, method) not in self.degenerate:
            return ""
        collapsed, scored = self.degenerate[(*pair, method)]
        return " (degenerate)" if collapsed == scored else f" (degenerate in {collapsed}/{scored} seeds)"


def _summary(res: _Results) -> list[Block]:
    seeds = sorted({int(r["seed"]) for r in res.rows})
    hidden = len(res.logged) - len(res.rows)
    return [
        Heading("calbench report", 1),
        Text(
            f"{len(res.rows)} runs: {len(res.pairs)} model · dataset pair(s), {len(res.methods)} method(s), seeds {', '.join(map(str, seeds))}. "
            f"Test-split metrics, mean ± std over seeds (percent). Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC."
            + (f" {hidden} older run(s) with other settings are in results.csv but not shown." if hidden else "")
        ),
    ]


def _main_table(res: _Results) -> list[Block]:
    header = ["method"] + [f"{m} · {d}" for m, d in res.pairs]
    rows = []
    for method in res.methods:
        cells = [(pair, res.cell.get((*pair, method))) for pair in res.pairs]
        rows.append(
            [method]
            + [
                "failed" if s is None else f"ECE {_pct(*s['ece'])} / Acc {_pct(*s['accuracy'])}{res.mark(pair, method)}"
                for pair, s in cells
            ]
        )
    bold = set()
    for j, pair in enumerate(res.pairs, start=1):
        scores = {
            i: e
            for i, m in enumerate(res.methods)
            if (e := res.ece(pair, m)) is not None and (*pair, m) not in res.degenerate
        }
        if scores:
            bold.add((min(scores, key=scores.get), j))
    blocks: list[Block] = [Heading("Results (best ECE per column in bold)"), Table(header, rows, bold)]
    if res.degenerate:
        blocks.append(
            Text(
                "Degenerate runs predicted near-uniform probabilities (the status column of every run says why): "
                "their metrics are shown but they are never the best ECE."
            )
        )
    return blocks


def _modality_table(res: _Results) -> list[Block]:
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


def _relative_table(res: _Results) -> list[Block]:
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


def _published_table(res: _Results, settings: Mapping[str, Mapping[str, Any]]) -> list[Block]:
    """Our CoOp-CE and CalibPrompt ECE next to the published ones, with the CalibPrompt setting each ran."""
    rows = []
    for pair in res.pairs:
        row = published.pair(_published_model(pair[0]), res.names[pair[1]])
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


def _settings_table(res: _Results, settings: Mapping[str, Mapping[str, Any]]) -> list[Block]:
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


def _runs_table(res: _Results) -> list[Block]:
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
    logged = read_results(results_dir / "results.csv")
    if not logged:
        raise CalbenchError(
            f"{results_dir / 'results.csv'} is missing or empty; run `calbench compare --out {results_dir}` first"
        )
    res = _Results(logged)
    settings = read_settings(results_dir)
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
    merge_shards(results_dir)  # rows the jobs of a launched grid left in results shards
    return write_report(build_blocks(results_dir), results_dir, "calbench report")
