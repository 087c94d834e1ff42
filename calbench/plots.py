"""Reliability diagrams (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from calbench.atomic import save_figure_atomic  # noqa: E402
from calbench.metrics import ece, reliability_bins  # noqa: E402


def reliability_diagram(probs: Any, labels: Any, title: str, path: Path, n_bins: int = 10) -> None:
    """Accuracy per confidence bin against the diagonal, bin mass underneath; written atomically."""
    bins = reliability_bins(probs, labels, n_bins)
    centres = (bins["edges"][:-1] + bins["edges"][1:]) / 2
    width = 1.0 / n_bins
    filled = bins["count"] > 0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.2, 5.0), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    top.bar(
        centres[filled], bins["accuracy"][filled], width=width, edgecolor="black", color="#4c72b0", label="accuracy"
    )
    top.bar(
        centres[filled],
        bins["confidence"][filled] - bins["accuracy"][filled],
        bottom=bins["accuracy"][filled],
        width=width,
        edgecolor="#c44e52",
        color="none",
        hatch="//",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1)
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"{title}\nECE {100 * ece(probs, labels, n_bins):.2f}%", fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, bins["count"] / max(bins["count"].sum(), 1), width=width, color="grey", edgecolor="black")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("share")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    save_figure_atomic(path, fig, dpi=110)
