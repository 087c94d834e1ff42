"""Classification and calibration metrics, as pure functions of (probs, labels).

``probs`` is (N, C) with rows summing to 1 and ``labels`` is (N,) int; either may
be a numpy array or a torch tensor. Every value is a fraction in [0, 1] (tables
multiply by 100). Binning follows Guo et al. (2017): equal-width bins
(i/n, (i+1)/n], each bin's |accuracy - confidence| weighted by its share of samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import numpy as np

from calbench import streams


def _as_numpy(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(probs, "detach"):
        probs = probs.detach().cpu().numpy()
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {p.shape}")
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must be (N,) with N = {p.shape[0]}, got shape {y.shape}")
    return p, y


def bin_ids(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Index of the equal-width bin (i/n, (i+1)/n] holding each value; 0 goes to the first bin."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, values, side="left") - 1, 0, n_bins - 1)


def _bin_gaps(conf: np.ndarray, hits: np.ndarray, bins: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin |mean(hits) - mean(conf)| and sample counts."""
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(bins, weights=hits, minlength=n_bins)
    safe = np.maximum(counts, 1.0)
    return np.abs(hit_sum / safe - conf_sum / safe), counts


def _top_label(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def accuracy(probs: Any, labels: Any) -> float:
    p, y = _as_numpy(probs, labels)
    return float((p.argmax(axis=1) == y).mean())


def ece(probs: Any, labels: Any, n_bins: int = 10) -> float:
    """Top-label expected calibration error with equal-width bins."""
    p, y = _as_numpy(probs, labels)
    conf, hits = _top_label(p, y)
    gaps, counts = _bin_gaps(conf, hits, bin_ids(conf, n_bins), n_bins)
    return float((gaps * counts).sum() / len(y))


def ece_weighted(probs: Any, labels: Any, weights: Any, n_bins: int = 10) -> np.ndarray:
    """:func:`ece` of each row of ``weights`` (R, N), item i counted ``weights[r, i]`` times: the ECE of
    R bootstrap resamples at once (a row of ones is :func:`ece` itself). A bin's gap times its count is
    |sum of hits - sum of confidences| in it, so a resample is one weighted sum per bin."""
    p, y = _as_numpy(probs, labels)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    conf, hits = _top_label(p, y)
    onehot = np.eye(n_bins)[bin_ids(conf, n_bins)]  # (N, n_bins)
    return np.abs(w @ ((hits - conf)[:, None] * onehot)).sum(axis=1) / w.sum(axis=1)


def mce(probs: Any, labels: Any, n_bins: int = 10) -> float:
    """Maximum calibration error: the largest gap over non-empty equal-width bins."""
    p, y = _as_numpy(probs, labels)
    conf, hits = _top_label(p, y)
    gaps, counts = _bin_gaps(conf, hits, bin_ids(conf, n_bins), n_bins)
    return float(gaps[counts > 0].max())


def adaptive_ece(probs: Any, labels: Any, n_bins: int = 10) -> float:
    """Top-label ECE with equal-mass bins (Nixon et al., 2019).

    Samples sorted by confidence are cut into ``n_bins`` groups whose sizes differ
    by at most one, so sparse high-confidence regions still get their own bins.
    """
    p, y = _as_numpy(probs, labels)
    conf, hits = _top_label(p, y)
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for chunk in np.array_split(order, min(n_bins, len(order))):
        total += len(chunk) * abs(hits[chunk].mean() - conf[chunk].mean())
    return float(total / len(y))


def classwise_ece(probs: Any, labels: Any, n_bins: int = 10) -> float:
    """Class-wise ECE (Kull et al., 2019): mean over classes of the binned gap
    between p(class c) and the frequency of class c, equal-width bins over [0, 1]."""
    p, y = _as_numpy(probs, labels)
    n, n_classes = p.shape
    total = 0.0
    for c in range(n_classes):
        gaps, counts = _bin_gaps(p[:, c], (y == c).astype(np.float64), bin_ids(p[:, c], n_bins), n_bins)
        total += (gaps * counts).sum() / n
    return float(total / n_classes)


def nll(probs: Any, labels: Any, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at eps)."""
    p, y = _as_numpy(probs, labels)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], eps, 1.0)).mean())


def brier(probs: Any, labels: Any) -> float:
    """Multiclass Brier score: mean over samples of sum_c (p_c - y_c)^2 (range [0, 2])."""
    p, y = _as_numpy(probs, labels)
    onehot = np.eye(p.shape[1])[y]
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def macro_f1(probs: Any, labels: Any) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    p, y = _as_numpy(probs, labels)
    pred = p.argmax(axis=1)
    scores = []
    for c in np.union1d(y, pred):
        tp = np.sum((pred == c) & (y == c))
        denom = np.sum(pred == c) + np.sum(y == c)
        scores.append(2.0 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


METRICS = {
    "accuracy": accuracy,
    "ece": ece,
    "mce": mce,
    "adaptive_ece": adaptive_ece,
    "classwise_ece": classwise_ece,
    "nll": nll,
    "brier": brier,
    "macro_f1": macro_f1,
}


def evaluate(probs: Any, labels: Any, n_bins: int = 10) -> dict[str, float]:
    """Every metric above, keyed by the column names of ``results.csv``."""
    binned = {"ece", "mce", "adaptive_ece", "classwise_ece"}
    return {
        name: fn(probs, labels, n_bins=n_bins) if name in binned else fn(probs, labels) for name, fn in METRICS.items()
    }


def reliability_bins(probs: Any, labels: Any, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Per-bin accuracy, confidence and count for a reliability diagram."""
    p, y = _as_numpy(probs, labels)
    conf, hits = _top_label(p, y)
    bins = bin_ids(conf, n_bins)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    return {
        "accuracy": np.bincount(bins, weights=hits, minlength=n_bins) / safe,
        "confidence": np.bincount(bins, weights=conf, minlength=n_bins) / safe,
        "count": counts,
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
    }


#: calbench: the most bootstrap resamples a run may ask for, 100 times `compare`'s 1,000: a bound on the
#: time a run takes (its memory is bounded by the blocks below at any count)
MAX_RESAMPLES = 100_000
#: calbench: resampled test items held at once (about 100 MB of int64 draws and float64 weights)
_BOOTSTRAP_CHUNK = 4_000_000


def bootstrap_ece(
    probs: Any, labels: Any, n_boot: int = 1000, seed: int = 0, n_bins: int = 10, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the ECE over test items (resampled with replacement).

    All resamples are binned at once: bin ids are offset by resample so one bincount
    gives every resample's per-bin sums.
    """
    if not 1 <= n_boot <= MAX_RESAMPLES:
        raise ValueError(f"n_boot must be in [1, {MAX_RESAMPLES}], got {n_boot}")
    p, y = _as_numpy(probs, labels)
    conf, hits = _top_label(p, y)
    bins = bin_ids(conf, n_bins)
    n = len(y)
    rng = streams.rng("bootstrap", seed)  # not the few-shot split's draws of the same seed
    values = np.empty(n_boot)
    step = max(1, _BOOTSTRAP_CHUNK // max(n, 1))  # resamples per block: memory stays bounded at any n_boot
    for start in range(0, n_boot, step):  # the generator's stream, drawn in blocks, is the same draws as at once
        count = min(step, n_boot - start)
        draws = rng.integers(0, n, size=(count, n))
        slots = (bins[draws] + n_bins * np.arange(count)[:, None]).ravel()
        size = count * n_bins
        conf_sum = np.bincount(slots, weights=conf[draws].ravel(), minlength=size).reshape(count, n_bins)
        hit_sum = np.bincount(slots, weights=hits[draws].ravel(), minlength=size).reshape(count, n_bins)
        values[start : start + count] = np.abs(hit_sum - conf_sum).sum(axis=1) / n  # sum of count * |acc - conf|, / n
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def mean_std(values: Iterable[float]) -> tuple[float, Optional[float]]:
    """Mean and sample std over seeds, NaNs (failed runs) left out; std is None for one value."""
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if array.size == 0:
        return float("nan"), None
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


def format_mean_std(values: Iterable[float], scale: float = 100.0, sep: str = " ± ", missing: str = "–") -> str:
    """``mean ± std`` of ``values * scale`` to two decimals (``mean`` alone for one value)."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return missing
    return f"{scale * mean:.2f}" if std is None else f"{scale * mean:.2f}{sep}{scale * std:.2f}"


#: the values each column of a shift row can take: fractions, and the NLL of probabilities (>= 0)
SHIFT_RANGES = {
    "accuracy": (0.0, 1.0),
    "ece": (0.0, 1.0),
    "smooth_ece": (0.0, 1.0),
    "aurc": (0.0, 1.0),
    "nll": (0.0, math.inf),
}


def shift_damage(row: Mapping[str, Any]) -> str:
    """Why a shift row's numbers cannot be a run's ("" when they can): a metric outside its range (NaN,
    1e309), or a severity below 1 (every corruption has severities 1-5, checked by whoever knows them)."""
    for key, (low, high) in SHIFT_RANGES.items():
        value = float(row[key])
        if not (low <= value <= high and math.isfinite(value)):  # NaN fails the comparison
            return f"{key} {row[key]!r} is not a finite number in [{low:g}, {high:g}]"
    return "" if int(row["severity"]) >= 1 else f"severity {row['severity']!r} is below 1"
