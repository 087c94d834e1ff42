"""What `compare` measures of a fitted method beyond its test metrics, and the plots drawn from it.

- :func:`deferral_row`: the :data:`~calbench.deferral.DEFERRAL_COLUMNS` of a run: a confidence
  threshold and conformal sets fitted on the run's validation probabilities (the few-shot
  validation split of its seed, never test), applied to its test probabilities;
- :func:`shift_rows`: with ``--shift``, the run's metrics on corrupted copies of the test images
  (:mod:`calbench.data.corruptions`), read from the feature cache like any other view;
- :func:`deferral_plots`: per (model, dataset), a risk–coverage plot with every method on one axis,
  a shift plot (accuracy and ECE by severity) and, if asked, smoothed reliability diagrams.

A post-hoc calibrator is fitted on the same validation split its conformal sets are calibrated
on, so for ``<method>+<calibrator>`` rows those sets rest on data the calibrator has seen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from calbench.base import Method
from calbench.data.corruptions import CONDITIONS, CORRUPTIONS, SEVERITIES, shift_kind
from calbench.deferral import DeferralSettings, deferral_metrics
from calbench.deferral.selective import aurc
from calbench.deferral.smooth_ece import smooth_ece
from calbench.metrics import accuracy, ece, nll
from calbench.plots import risk_coverage_plot, shift_plot, smooth_reliability_diagram
from calbench.results import KEY, SCORED, ResultsStore, Row, dataset_labels, diagram_stem

if TYPE_CHECKING:
    from calbench.session import FewShot, Session


@dataclass(frozen=True)
class DeferralShiftOptions:
    """What a grid measures beyond the metric columns."""

    deferral: DeferralSettings = DeferralSettings()
    #: also score every run on corrupted copies of the test images (`--shift`)
    shift: bool = False
    #: also draw a smoothed reliability diagram per method (`--smooth-diagrams`)
    smooth_diagrams: bool = False

    def check(self) -> None:
        self.deferral.check()


def _probs(method: Method, inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return method.predict_proba(inputs).double().cpu().numpy()


def deferral_row(
    session: Session, seed: int, fewshot: FewShot, method: Method, test_probs: np.ndarray, settings: DeferralSettings
) -> Row:
    """The deferral columns of a fitted method: fitted on its validation probabilities, measured on test."""
    fit = session.fit_data(seed, fewshot, method, score_val=True)  # smoothed: noisy validation copies, as on test
    val_probs = _probs(method, fit.val_inputs(method))
    return deferral_metrics(val_probs, fit.val_labels.cpu().numpy(), test_probs, session.test_labels, settings, seed)


def shifted_inputs(session: Session, method: Method, corruption: str, severity: int) -> torch.Tensor:
    """The test split as ``method`` predicts from it (as :meth:`Session.test_features`), every image corrupted."""
    caps = method.capabilities
    if caps.test_copies is None:
        return session.test_views(shift_kind(corruption, severity), range(1))[0]
    requests = [r for r in (caps.adapt_copies, caps.test_copies) if r is not None]
    return torch.cat([session.test_views(shift_kind(corruption, severity, r.kind), range(r.views)) for r in requests])


def shift_rows(session: Session, method: Method, n_bins: int) -> list[Row]:
    """Accuracy, ECE, smooth ECE, NLL and AURC of a fitted method on each corruption at each severity."""
    labels = session.test_labels
    rows = []
    for corruption in CORRUPTIONS:
        for severity in SEVERITIES:
            probs = _probs(method, shifted_inputs(session, method, corruption, severity))
            rows.append(
                {
                    "corruption": corruption,
                    "severity": severity,
                    "accuracy": accuracy(probs, labels),
                    "ece": ece(probs, labels, n_bins),
                    "smooth_ece": smooth_ece(probs, labels),
                    "nll": nll(probs, labels),
                    "aurc": aurc(probs, labels),
                }
            )
    return rows


def shift_done(store: ResultsStore) -> set[tuple[str, ...]]:
    """Keys of the runs whose every corruption and severity is logged (shift.csv, and a job's shards)."""
    counts: dict[tuple[str, ...], int] = {}
    for row in store.shift_rows():
        if (row["corruption"], row["severity"]) not in CONDITIONS:  # not a condition `--shift` scores
            continue
        key = ResultsStore.key(row)
        counts[key] = counts.get(key, 0) + 1
    return {key for key, count in counts.items() if count >= len(CORRUPTIONS) * len(SEVERITIES)}


def _pooled(store: ResultsStore, rows: Sequence[Row]) -> dict[tuple[str, str, str, str], dict[str, list[np.ndarray]]]:
    """(model, dataset label, dataset id) -> method -> test probabilities of its seeds."""
    names = dataset_labels(store.rows)
    pooled: dict[tuple[str, str, str], dict[str, list[np.ndarray]]] = {}
    for row in rows:
        probs = store.predictions(row) if row["status"] in SCORED else None
        if probs is not None:
            ident = str(row.get("dataset_id") or "")
            pair = (str(row["model"]), names[(str(row["dataset"]), ident)], str(row["dataset"]), ident)
            pooled.setdefault(pair, {}).setdefault(str(row["method"]), []).append(probs)
    return pooled


def deferral_plots(
    store: ResultsStore,
    rows: Sequence[Row],
    labels_of: Mapping[tuple[str, str], np.ndarray],
    extras: DeferralShiftOptions,
) -> dict[str, Path]:
    """Risk–coverage plots (and shift plots, smoothed diagrams when asked) of ``rows``, seeds pooled.

    ``labels_of`` maps (dataset name, dataset_id) to test labels, as for the reliability diagrams.
    """
    plots: dict[str, Path] = {}
    for (model, label, dataset, ident), methods in _pooled(store, rows).items():
        labels = labels_of[(dataset, ident)]
        stem = diagram_stem(model, label, "").rstrip("_")
        curves = {m: (np.concatenate(p), np.tile(labels, len(p))) for m, p in methods.items()}
        path = store.out / "risk_coverage" / f"{stem}.png"
        risk_coverage_plot(curves, f"{model} · {label} · test, seeds pooled", path)
        plots[f"{model}/{label}/risk-coverage"] = path
        if extras.smooth_diagrams:
            for method, (probs, y) in curves.items():
                path = store.out / "reliability_smooth" / f"{diagram_stem(model, label, method)}.png"
                smooth_reliability_diagram(probs, y, f"{method} · {model} · {label}", path)
                plots[f"{model}/{label}/{method}/smooth"] = path
    if extras.shift:
        plots.update(_shift_plots(store, rows))
    return plots


def _shift_plots(store: ResultsStore, rows: Sequence[Row]) -> dict[str, Path]:
    """Per (model, dataset): mean accuracy and ECE over corruptions and seeds by severity (0: clean), per method."""
    names = dataset_labels(store.rows)
    wanted = {ResultsStore.key(r): r for r in rows if r["status"] in SCORED}
    series: dict[tuple[str, str], dict[str, dict[int, list[tuple[float, float]]]]] = {}
    for row in wanted.values():
        pair = (str(row["model"]), names[(str(row["dataset"]), str(row.get("dataset_id") or ""))])
        series.setdefault(pair, {}).setdefault(str(row["method"]), {}).setdefault(0, []).append(
            (float(row["accuracy"]), float(row["ece"]))
        )
    for shifted in store.shift_rows():
        row = wanted.get(tuple(str(shifted[k]) for k in KEY))
        if row is not None:
            pair = (str(row["model"]), names[(str(row["dataset"]), str(row.get("dataset_id") or ""))])
            series[pair][str(row["method"])].setdefault(int(shifted["severity"]), []).append(
                (float(shifted["accuracy"]), float(shifted["ece"]))
            )
    plots = {}
    for (model, label), methods in series.items():
        if not any(len(by) > 1 for by in methods.values()):
            continue  # no corrupted run of this pair yet
        means = {m: {s: tuple(np.mean(v, axis=0)) for s, v in sorted(by.items())} for m, by in methods.items()}
        path = store.out / "shift" / f"{diagram_stem(model, label, '').rstrip('_')}.png"
        shift_plot(means, f"{model} · {label} · corrupted test copies", path)
        plots[f"{model}/{label}/shift"] = path
    return plots
