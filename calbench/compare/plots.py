"""The figures of a grid: one reliability diagram per (model, dataset, method), seeds pooled."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from calbench.plots import reliability_diagram
from calbench.results import SCORED, ResultsStore, Row, dataset_labels, diagram_stem


def reliability_plots(
    store: ResultsStore, rows: Sequence[Row], labels_of: Mapping[tuple[str, str], np.ndarray], n_bins: int
) -> dict[str, Path]:
    """One diagram per (model, dataset, method), test predictions pooled over the seeds run.

    ``labels_of`` maps (dataset name, dataset_id) to test labels. A dataset is named as the report
    names it: plainly, or with its identity where another dataset in the folder shares its name.
    """
    names = dataset_labels(store.rows)
    groups: dict[tuple[str, str, str, str], list[np.ndarray]] = {}
    for row in rows:
        probs = store.predictions(row)  # a degenerate run's too: its diagram shows the collapse
        if probs is not None:
            key = (str(row["model"]), str(row["dataset"]), str(row.get("dataset_id") or ""), str(row["method"]))
            groups.setdefault(key, []).append(probs)
    plots = {}
    for (model, dataset, ident, method), parts in groups.items():
        label = names[(dataset, ident)]
        path = store.out / "reliability" / f"{diagram_stem(model, label, method)}.png"
        labels = np.tile(labels_of[(dataset, ident)], len(parts))
        reliability_diagram(
            np.concatenate(parts), labels, f"{method} · {model} · {label} · {len(parts)} seed(s) pooled", path, n_bins
        )
        plots[f"{model}/{label}/{method}"] = path
    _rename_plain_diagrams(store, names, {key[:2] + key[3:]: key[2] for key in groups})
    return plots


def _rename_plain_diagrams(
    store: ResultsStore, names: Mapping[tuple[str, str], str], drawn: Mapping[tuple[str, str, str], str]
) -> None:
    """A diagram drawn while its dataset's name was unique in the folder has the plain name. Once another
    dataset shares the name, it takes its dataset's label: the one other dataset of that name with runs
    of that model and method (with none or several the owner is unknown and the file is left alone)."""

    def ident(row: Row) -> str:
        return str(row.get("dataset_id") or "")

    for model, dataset, method in {(str(r["model"]), str(r["dataset"]), str(r["method"])) for r in store.rows}:
        plain = store.out / "reliability" / f"{diagram_stem(model, dataset, method)}.png"
        if not plain.is_file() or all(label == dataset for (name, _), label in names.items() if name == dataset):
            continue  # no plain diagram, or the name is still unique
        owners = {
            names[(dataset, ident(r))]
            for r in store.rows
            if (str(r["model"]), str(r["dataset"]), str(r["method"])) == (model, dataset, method)
            and r["status"] in SCORED
            and ident(r) != drawn.get((model, dataset, method))
        }
        if len(owners) == 1:
            plain.replace(plain.with_name(f"{diagram_stem(model, owners.pop(), method)}.png"))
