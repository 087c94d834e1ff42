"""Smooth ECE and the smoothed reliability curve (Błasiok & Nakkiran, "Smooth ECE: principled
reliability diagrams via kernel smoothing", ICLR 2024), computed by their ``relplot`` package.

Binned ECE changes with the number and placement of bins; smooth ECE replaces bins with a
Gaussian kernel whose width is chosen from the data (the fixed point sigma = smECE_sigma), so
it has no binning choice and is a consistent calibration measure. It is applied, like the
binned ECE columns, to the top-label confidence and whether the top label is right.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _top_label(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    return p.max(axis=1), (p.argmax(axis=1) == np.asarray(labels)).astype(np.float64)


def smooth_ece(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-label smooth ECE (a fraction, like ECE), with relplot's automatic kernel width."""
    import relplot  # imports seaborn and pandas: loaded only when a run is scored

    return float(relplot.smECE(*_top_label(probs, labels)))


def smooth_reliability(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """relplot's smoothed reliability diagram data: ``mesh`` (confidence grid), ``mu`` (smoothed accuracy
    at each grid point), ``density`` (of the confidences), ``ce`` (smooth ECE), ``sigma`` (kernel width)
    and what ``relplot.plot_rel_diagram`` draws besides.

    relplot's bootstrap band and interval are left out: they are unseeded, and a diagram should be
    the same every time it is drawn.
    """
    import relplot

    return relplot.prepare_rel_diagram(*_top_label(probs, labels), plot_confidence_band=False, report_CE_std=False)
