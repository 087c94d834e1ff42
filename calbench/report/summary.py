"""What a results folder's tables show: each (model, dataset, method)'s latest runs, summarised over seeds.

One summary feeds every rendering of the paper-style table (report.md and report.html, report.tex,
report.csv), so they cannot disagree on which runs count, their means, or which ECE is best.
"""

from __future__ import annotations

import math
from typing import Optional

from calbench.metrics import mean_std
from calbench.results import SCORED, Row, dataset_labels

Pair = tuple[str, str]
Stats = dict[str, tuple[float, Optional[float]]]
#: the metrics the paper-style table summarises per cell
CELL_METRICS = ("ece", "accuracy", "nll", "brier")


def pct(mean: float, std: Optional[float], sep: str = " ± ") -> str:
    """A fraction's mean (and std over seeds) in percent, two decimals; "failed" when no run scored."""
    if math.isnan(mean):
        return "failed"
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f}{sep}{100 * std:.2f}"


class Summary:
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
        self.scored: dict[tuple[str, str, str], list[Row]] = {}
        for r in self.rows:
            if r["status"] in SCORED:
                self.scored.setdefault((str(r["model"]), str(r["dataset"]), str(r["method"])), []).append(r)
        self.cell: dict[tuple[str, str, str], Stats] = {
            key: {k: mean_std(float(o[k]) for o in runs) for k in CELL_METRICS} for key, runs in self.scored.items()
        }
        #: (model, dataset, method) -> (degenerate seeds, scored seeds), for cells with a degenerate run
        self.degenerate: dict[tuple[str, str, str], tuple[int, int]] = {}
        for key, runs in self.scored.items():
            collapsed = sum(o["status"] == "degenerate" for o in runs)
            if collapsed:
                self.degenerate[key] = (collapsed, len(runs))

    def config_of(self, pair: Pair, method: str) -> Optional[str]:
        """The config hash of the runs shown for (pair, method)."""
        return next(
            (str(r.get("config", "")) for r in self.rows if (r["model"], r["dataset"], r["method"]) == (*pair, method)),
            None,
        )

    def ece(self, pair: Pair, method: str) -> Optional[float]:
        stats = self.cell.get((*pair, method))
        return None if stats is None else stats["ece"][0]

    def best_ece(self, pair: Pair) -> Optional[str]:
        """The method with the lowest mean ECE on ``pair``; a degenerate run is never the best."""
        scores = {
            m: e for m in self.methods if (e := self.ece(pair, m)) is not None and (*pair, m) not in self.degenerate
        }
        return min(scores, key=scores.get) if scores else None

    def mark(self, pair: Pair, method: str) -> str:
        """ " (degenerate)" after a cell whose runs collapsed to near-uniform predictions ("1/3 seeds" if some did)."""
        if (*pair, method) not in self.degenerate:
            return ""
        collapsed, scored = self.degenerate[(*pair, method)]
        return " (degenerate)" if collapsed == scored else f" (degenerate in {collapsed}/{scored} seeds)"

    def seeds(self) -> list[int]:
        return sorted({int(r["seed"]) for r in self.rows})
