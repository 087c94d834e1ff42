"""Reliability diagrams, risk–coverage and shift plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from calbench.atomic import save_figure_atomic  # noqa: E402
from calbench.deferral.selective import risk_coverage  # noqa: E402
from calbench.deferral.smooth_ece import smooth_reliability  # noqa: E402
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


def risk_coverage_plot(curves: dict[str, tuple[Any, Any]], title: str, path: Path) -> None:
    """Error rate among the most confident cases against the share automated, one line per method
    (``curves``: method -> (probs, labels)); the AURC of each in the legend."""
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for method, (probs, labels) in curves.items():
        coverage, risk = risk_coverage(probs, labels)
        ax.plot(coverage, 100 * risk, linewidth=1.2, label=f"{method} (AURC {100 * risk.mean():.2f})")
    ax.set_xlabel("coverage (share of cases automated)")
    ax.set_ylabel("error among automated cases (%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_figure_atomic(path, fig, dpi=110)


def shift_plot(means: dict[str, dict[int, tuple[float, float]]], title: str, path: Path) -> None:
    """Accuracy and ECE (%) by corruption severity (0: clean), one line per method
    (``means``: method -> severity -> (accuracy, ECE), means over corruptions and seeds)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.6), sharex=True)
    for method, by_severity in means.items():
        severities = sorted(by_severity)
        left.plot(severities, [100 * by_severity[s][0] for s in severities], marker="o", markersize=3, label=method)
        right.plot(severities, [100 * by_severity[s][1] for s in severities], marker="o", markersize=3, label=method)
    for ax, name in ((left, "accuracy (%)"), (right, "ECE (%)")):
        ax.set_xlabel("corruption severity (0: clean)")
        ax.set_ylabel(name)
        ax.set_xticks(range(6))
        ax.grid(alpha=0.3)
    right.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure_atomic(path, fig, dpi=110)


def smooth_reliability_diagram(probs: Any, labels: Any, title: str, path: Path) -> None:
    """Kernel-smoothed accuracy against confidence (Błasiok & Nakkiran's reliability diagram, drawn by
    relplot), the density of confidences underneath; written atomically."""
    import relplot

    curve = smooth_reliability(probs, labels)
    fig, ax = plt.subplots(figsize=(4.4, 4.6))
    # relplot's own drawing: the curve fades where few confidences are, the density shaded beneath
    relplot.plot_rel_diagram(curve, fig=fig, ax=ax, use_default_style=False, plot_density=True)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy (kernel-smoothed)")
    ax.set_title(f"{title}\nsmooth ECE {100 * curve['ce']:.2f}% (kernel width {curve['sigma']:.3f})", fontsize=10)
    fig.tight_layout()
    save_figure_atomic(path, fig, dpi=110)
