"""`certify`: certified accuracy of a smoothed classifier on a seeded test subset (Cohen et al., ICML 2019).

The method is fitted on few-shot train/validation features only, as in ``compare``;
the test split is read here for the final numbers and nowhere else. Each test image's
n0 selection and n estimation samples are cached noisy views (transform kind
``noise<sigma>``), classified by the method's base classifier. Methods that tune at
test time (``adapt``) tune on their own noisy copies first, and are certified on
views disjoint from those, so the base classifier is fixed before its votes are drawn.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from calbench.cache import CacheStats
from calbench.data.transforms import noise_kind
from calbench.errors import CalbenchError
from calbench.experiment import check_settings, fewshot_features, open_run, write_csv_atomic
from calbench.methods import Calibrated, Method, feature_requests, make_method, parse_method
from calbench.smoothing import DEFAULT_RADII, certified_accuracy, certify_predictions

#: one row per radius; the report reads this file ("certification.csv" in the results folder)
CERTIFY_COLUMNS = ["model", "dataset", "method", "seed", "shots", "sigma", "n0", "n", "alpha", "subset", "radius", "certified_accuracy", "abstain_rate"]
ITEM_COLUMNS = ["index", "label", "predicted", "radius", "correct"]
#: first seed word of the test-subset generator, apart from few-shot split seeds
SUBSET_STREAM = 7
#: cached views classified per chunk, bounding memory at (chunk, subset, D) features
VIEW_CHUNK = 100


@dataclass
class CertifyResult:
    accuracy: dict[float, float]
    abstain_rate: float
    labels: np.ndarray
    predicted: np.ndarray
    radii: np.ndarray
    shots: int
    path: Path
    items_path: Path
    stats: CacheStats
    seconds: float


def certify_subset(n_test: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` test images drawn without replacement, reproducible from ``seed``."""
    rng = np.random.default_rng([SUBSET_STREAM, seed])
    return np.sort(rng.choice(n_test, size=min(size, n_test), replace=False))


def _base(method: Method) -> Method:
    return method.base if isinstance(method, Calibrated) else method


def _build(method: str, sigma: float, params: dict[str, Any]) -> Method:
    """The method, with --sigma as its smoothing noise when it smooths at a sigma of its own."""
    built = make_method(method, **params)
    if hasattr(_base(built), "sigma"):
        built = make_method(method, **{**params, "sigma": sigma})
    return built


def _per_view_classifier(method: Method) -> Callable[[Tensor], Tensor]:
    def classify(views: Tensor) -> Tensor:
        return torch.stack([method.predict_logits(view) for view in views])

    return classify


def _merge_rows(path: Path, rows: list[dict[str, object]]) -> None:
    """Replace rows of the same run (every column but the results) and keep the others."""
    key_columns = [c for c in CERTIFY_COLUMNS if c not in ("certified_accuracy", "abstain_rate")]
    new_keys = {tuple(str(row[c]) for c in key_columns) for row in rows}
    kept: list[dict[str, object]] = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != CERTIFY_COLUMNS:
                raise CalbenchError(f"{path} has columns {reader.fieldnames}, not calbench's certification columns; move it away or pick another --out")
            kept = [row for row in reader if tuple(row[c] for c in key_columns) not in new_keys]
    write_csv_atomic([*kept, *rows], path, CERTIFY_COLUMNS)


def run_certify(
    model: str = "tiny",
    data: str = "synthetic",
    method: str = "promptsmooth",
    sigma: float = 0.25,
    n: int = 100,
    n0: int = 10,
    alpha: float = 0.001,
    subset: int = 500,
    seed: int = 1,
    shots: Optional[int] = None,
    val_shots: Optional[int] = None,
    views: int = 10,
    device: str = "auto",
    out: Path = Path("results"),
    cache_dir: Optional[Path] = None,
    weights: Optional[Path] = None,
    data_root: Optional[Path] = None,
    params: Optional[dict[str, Any]] = None,
    radii: tuple[float, ...] = DEFAULT_RADII,
    progress: bool = True,
) -> CertifyResult:
    """Fit ``method`` on one few-shot split, certify a test subset, merge the rows into ``out``/certification.csv.

    ``shots`` defaults to the method's own recommendation (``TrainConfig.shots``: 16 for
    PromptSmooth) or 8. Per-image results go to ``out``/certify/<run>.csv.
    """
    start = time.perf_counter()
    for name, value, low in (("--n", n, 1), ("--n0", n0, 1), ("--subset", subset, 1)):
        if value < low:
            raise CalbenchError(f"{name} must be at least {low}, got {value}")
    if not sigma > 0:
        raise CalbenchError(f"--sigma must be positive, got {sigma}")
    if not 0 < alpha < 1:
        raise CalbenchError(f"--alpha must be in (0, 1), got {alpha}")
    parse_method(method)
    smoothed = _build(method, sigma, dict(params or {}))
    config = getattr(_base(smoothed), "config", None)
    shots = shots if shots is not None else (config.shots if config is not None else 8)
    check_settings(shots, val_shots, views)

    vlm, dataset, cache = open_run(model, data, device, cache_dir, weights, data_root, progress)
    smoothed.fit(fewshot_features(vlm, dataset, cache, shots, seed, val_shots, views, feature_requests(smoothed)).fit)

    labels = dataset.labels("test")
    chosen = certify_subset(len(labels), subset, seed)
    base = _base(smoothed)
    offset = 0
    with torch.no_grad():
        if hasattr(base, "adapt"):
            request = base.test_request
            copies = cache.features(dataset, "test", chosen, kind=request.kind, views=range(request.views)).to(vlm.device)
            classify = base.adapt(copies)
            offset = request.views
        else:
            classify = _per_view_classifier(smoothed)
        votes = []
        for first in range(offset, offset + n0 + n, VIEW_CHUNK):
            chunk = range(first, min(first + VIEW_CHUNK, offset + n0 + n))
            features = cache.features(dataset, "test", chosen, kind=noise_kind(sigma), views=chunk).to(vlm.device)
            votes.append(classify(features).argmax(dim=-1).cpu())
    votes_all = torch.cat(votes)
    predicted, radius = certify_predictions(votes_all[:n0], votes_all[n0:], dataset.n_classes, sigma, alpha)
    accuracy = certified_accuracy(predicted, radius, labels[chosen], radii)
    abstain = float(np.mean(predicted == -1))

    out = Path(out)
    run = {"model": model, "dataset": dataset.name, "method": method, "seed": seed, "shots": shots, "sigma": float(sigma), "n0": n0, "n": n, "alpha": float(alpha), "subset": len(chosen)}
    path = out / "certification.csv"
    _merge_rows(path, [{**run, "radius": r, "certified_accuracy": acc, "abstain_rate": abstain} for r, acc in accuracy.items()])
    items_path = out / "certify" / f"{method.replace('+', '_')}-{model}-{dataset.name}-sigma{sigma:g}-n{n}-seed{seed}.csv"
    items = [
        {"index": int(i), "label": int(y), "predicted": int(p), "radius": float(r), "correct": int(p == y)}
        for i, y, p, r in zip(chosen, labels[chosen], predicted, radius)
    ]
    write_csv_atomic(items, items_path, ITEM_COLUMNS)
    return CertifyResult(accuracy, abstain, labels[chosen], predicted, radius, shots, path, items_path, cache.stats, time.perf_counter() - start)
