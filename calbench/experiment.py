"""`compare`: fit methods on few-shot features, evaluate once on the test split, write results.

The test split is encoded and scored here and nowhere else; methods only ever
receive :class:`~calbench.methods.FitData` (few-shot train views + validation).
"""
from __future__ import annotations

import csv
import io
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from calbench.cache import CacheStats, FeatureCache, default_cache_dir
from calbench.data import load_dataset
from calbench.data.folder import ImageFolderDataset, few_shot_split
from calbench.errors import CalbenchError
from calbench.methods import CALIBRATORS, METHODS, Calibrated, FeatureRequest, FitData, Method, PromptMethod, list_methods, make_method, parse_method
from calbench.metrics import METRICS, evaluate
from calbench.models import VLMBackend, load_vlm
from calbench.plots import reliability_diagram
from calbench.train import save_prompt

DEFAULT_METHODS = ["zero-shot", "zero-shot+ts", "coop-ce", "coop-ce+ts", "coop-ls", "coop-mbls", "calibprompt"]
RESULT_COLUMNS = ["model", "dataset", "method", "seed", *METRICS]


@dataclass
class FewShotFeatures:
    """Cached features of one seed's few-shot split."""

    fit: FitData
    train_indices: np.ndarray
    val_indices: np.ndarray


def fewshot_features(
    vlm: VLMBackend,
    dataset: ImageFolderDataset,
    cache: FeatureCache,
    shots: int,
    seed: int,
    val_shots: Optional[int] = None,
    views: int = 10,
    requests: Optional[dict[str, FeatureRequest]] = None,
) -> FewShotFeatures:
    """Few-shot train views and validation features for ``seed``, from the cache (train pool only).

    ``requests`` adds extra features of the same few-shot images (``FitData.extra``);
    asking for test images here is refused, because fitting must never see them.
    """
    labels = dataset.labels("train")
    train_idx, val_idx = few_shot_split(labels, shots, shots if val_shots is None else val_shots, seed, dataset.classnames)
    train = cache.features(dataset, "train", train_idx, kind="train", views=range(views))
    val = cache.features(dataset, "train", val_idx, kind="eval")[0]
    device = vlm.device
    fit = FitData(
        vlm=vlm,
        classnames=dataset.classnames,
        template=dataset.template,
        train_features=train.to(device),
        train_labels=torch.as_tensor(labels[train_idx], device=device),
        val_features=val.to(device),
        val_labels=torch.as_tensor(labels[val_idx], device=device),
        seed=seed,
    )
    for name, request in (requests or {}).items():
        if request.images not in ("train", "val"):
            raise ValueError(f"fit request {name!r} asks for {request.images!r} images; fitting may only see train and val")
        chosen = train_idx if request.images == "train" else val_idx
        fit.extra[name] = cache.features(dataset, "train", chosen, kind=request.kind, views=range(request.views)).to(device)
    return FewShotFeatures(fit, train_idx, val_idx)


def method_test_features(method: Method, dataset: ImageFolderDataset, cache: FeatureCache, clean: torch.Tensor) -> torch.Tensor:
    """The test features a method predicts from: clean (N, D), or (views, N, D) if it asks."""
    request = getattr(method, "test_request", None)
    if request is None:
        return clean
    indices = np.arange(len(dataset.files("test")))
    return cache.features(dataset, "test", indices, kind=request.kind, views=range(request.views)).to(clean.device)


def load_params_file(path: Path) -> dict[str, dict[str, object]]:
    """Method parameters from JSON: {"method": m, "params": {...}} (as `tune` writes) or {method: {...}}."""
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalbenchError(f"parameter file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise CalbenchError(f"parameter file {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "method" in data and "params" in data:
        return {str(data["method"]): dict(data["params"])}
    if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
        return {str(k): dict(v) for k, v in data.items()}
    raise CalbenchError(f"{path}: expected {{\"method\": ..., \"params\": {{...}}}} or {{method: {{param: value}}}}")


def open_run(
    model: str,
    data: str,
    device: str,
    cache_dir: Optional[Path],
    weights: Optional[Path],
    data_root: Optional[Path],
    progress: bool,
) -> tuple[VLMBackend, ImageFolderDataset, FeatureCache]:
    """The model, the dataset and the model's feature cache, as every command needs them."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    vlm = load_vlm(model, device=device, weights=weights)
    dataset = load_dataset(data, cache_dir=cache_dir, data_root=data_root)
    return vlm, dataset, FeatureCache(cache_dir, vlm, progress=progress)


@dataclass
class CompareResult:
    rows: list[dict[str, object]]
    failures: list[tuple[str, int, str]]
    stats: CacheStats
    seconds: float
    out: Path
    plots: dict[str, Path] = field(default_factory=dict)


def write_csv_atomic(rows: Sequence[dict[str, object]], path: Path, columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)


def run_compare(
    model: str = "tiny",
    data: str = "synthetic",
    methods: Sequence[str] = DEFAULT_METHODS,
    seeds: Sequence[int] = (1, 2, 3),
    shots: int = 8,
    val_shots: Optional[int] = None,
    views: int = 10,
    device: str = "auto",
    out: Path = Path("results"),
    cache_dir: Optional[Path] = None,
    weights: Optional[Path] = None,
    data_root: Optional[Path] = None,
    n_bins: int = 10,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    method_params: Optional[dict[str, dict[str, object]]] = None,
) -> CompareResult:
    """Fit every method for every seed, score on the test split, write results.csv and diagrams.

    ``method_params`` maps a base method id to constructor parameters (e.g. tuned ones).
    """
    start = time.perf_counter()
    for name in methods:
        parse_method(name)  # reject unknown names before any work
    if shots < 1:
        raise CalbenchError(f"--shots must be at least 1, got {shots}")
    vlm, dataset, cache = open_run(model, data, device, cache_dir, weights, data_root, progress)
    test_labels = dataset.labels("test")
    test_features = cache.features(dataset, "test", np.arange(len(test_labels)), kind="eval")[0].to(vlm.device)

    rows: list[dict[str, object]] = []
    failures: list[tuple[str, int, str]] = []
    pooled: dict[str, list[np.ndarray]] = {}
    method_params = method_params or {}
    for seed in seeds:
        base_fit = fewshot_features(vlm, dataset, cache, shots, seed, val_shots, views)
        fitted: dict[str, Method] = {}  # bases shared by their post-hoc variants (coop-ce, coop-ce+ts)
        for name in methods:
            base, calibrator = parse_method(name)
            log(f"seed {seed}: {name}")
            try:
                if base not in fitted:
                    method = make_method(base, **method_params.get(base, {}))
                    fit = base_fit.fit
                    requests = getattr(method, "fit_requests", None)
                    if requests:
                        fit = fewshot_features(vlm, dataset, cache, shots, seed, val_shots, views, requests).fit
                    fitted[base] = method.fit(fit)
                method = fitted[base]
                if calibrator is not None:
                    method = Calibrated(method, CALIBRATORS.get(calibrator)(), base_is_fitted=True).fit(base_fit.fit)
                with torch.no_grad():
                    probs = method.predict_proba(method_test_features(fitted[base], dataset, cache, test_features)).double().cpu().numpy()
            except CalbenchError as exc:
                failures.append((name, seed, str(exc)))
                log(f"seed {seed}: {name} failed: {exc}")
                continue
            rows.append({"model": model, "dataset": dataset.name, "method": name, "seed": seed, **evaluate(probs, test_labels, n_bins)})
            pooled.setdefault(name, []).append(probs)

    out = Path(out)
    write_csv_atomic(rows, out / "results.csv", RESULT_COLUMNS)
    plots = {}
    for name, parts in pooled.items():
        path = out / f"reliability_{name.replace('+', '_')}.png"
        reliability_diagram(np.concatenate(parts), np.tile(test_labels, len(parts)), f"{name} · {model} · {dataset.name} · {len(parts)} seed(s) pooled", path, n_bins)
        plots[name] = path
    return CompareResult(rows, failures, cache.stats, time.perf_counter() - start, out, plots)


def train_one(
    method: str,
    model: str,
    data: str,
    seed: int,
    shots: int,
    val_shots: Optional[int],
    views: int,
    device: str,
    out: Path,
    cache_dir: Optional[Path] = None,
    weights: Optional[Path] = None,
    data_root: Optional[Path] = None,
    progress: bool = False,
    params: Optional[dict[str, object]] = None,
) -> tuple[Path, dict[str, float]]:
    """Train one prompt method on one few-shot split, save its context; return path and validation metrics."""
    base, calibrator = parse_method(method)
    vlm, dataset, cache = open_run(model, data, device, cache_dir, weights, data_root, progress)
    untrained = make_method(method, **(params or {}))
    requests = getattr(untrained.base if isinstance(untrained, Calibrated) else untrained, "fit_requests", None)
    fit = fewshot_features(vlm, dataset, cache, shots, seed, val_shots, views, requests).fit
    trained = untrained.fit(fit)
    prompt = trained.base if isinstance(trained, Calibrated) else trained
    if not isinstance(prompt, PromptMethod):
        raise CalbenchError(f"{base} learns no prompt, so there is nothing to train; pick one of: {', '.join(m for m in list_methods() if METHODS.get(m).trainable)}")
    extra: dict[str, object] = {"method": method, "params": params or {}, "dataset": dataset.name, "seed": seed, "shots": shots}
    if isinstance(trained, Calibrated) and hasattr(trained.calibrator, "temperature"):
        extra["temperature"] = trained.calibrator.temperature
    path = Path(out) / f"{method.replace('+', '_')}-{model}-{dataset.name}-seed{seed}.safetensors"
    save_prompt(path, prompt.learner, prompt.config, extra)
    with torch.no_grad():
        metrics = evaluate(trained.predict_proba(fit.val_features).double().cpu().numpy(), fit.val_labels.cpu().numpy())
    return path, metrics


def build_cache(
    model: str,
    data: str,
    seeds: Sequence[int],
    shots: int,
    val_shots: Optional[int],
    views: int,
    device: str,
    cache_dir: Optional[Path] = None,
    weights: Optional[Path] = None,
    data_root: Optional[Path] = None,
    progress: bool = False,
) -> tuple[CacheStats, Path]:
    """Encode the test split and each seed's few-shot views ahead of training."""
    vlm, dataset, cache = open_run(model, data, device, cache_dir, weights, data_root, progress)
    cache.features(dataset, "test", np.arange(len(dataset.files("test"))), kind="eval")
    for seed in seeds:
        fewshot_features(vlm, dataset, cache, shots, seed, val_shots, views)
    return cache.stats, cache.root
