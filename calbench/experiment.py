"""`compare`: fit methods on few-shot features, evaluate once on the test split, write results.

The test split is encoded and scored here and nowhere else; methods only ever
receive :class:`~calbench.methods.FitData` (few-shot train views + validation).
"""
from __future__ import annotations

import csv
import hashlib

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs into one folder are unsafe there
    fcntl = None  # type: ignore[assignment]
import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from calbench.atomic import write_text_atomic
from calbench.cache import CacheStats, FeatureCache, default_cache_dir
from calbench.data import load_dataset
from calbench.data.folder import ImageFolderDataset, few_shot_split
from calbench.errors import CalbenchError
from calbench.methods import (
    CALIBRATORS,
    METHODS,
    Calibrated,
    FeatureRequest,
    FitData,
    Method,
    PromptMethod,
    VAL_AS_TEST,
    feature_requests,
    list_methods,
    make_method,
    parse_method,
)
from calbench.metrics import METRICS, bootstrap_ece, evaluate
from calbench.models import VLMBackend, load_vlm
from calbench.plots import reliability_diagram
from calbench.train import save_prompt

DEFAULT_METHODS = ["zero-shot", "zero-shot+ts", "coop-ce", "coop-ce+ts", "coop-ls", "coop-mbls", "calibprompt"]


def all_methods() -> list[str]:
    """The standard set, then every other registered method (what `compare --all` runs)."""
    return DEFAULT_METHODS + [m for m in list_methods() if m not in DEFAULT_METHODS]


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
    strict: bool = False,
) -> tuple[VLMBackend, ImageFolderDataset, FeatureCache]:
    """The model, the dataset and the model's feature cache, as every command needs them.

    ``strict`` makes an unreadable image an error instead of a skipped file with a warning.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    vlm = load_vlm(model, device=device, weights=weights)
    dataset = load_dataset(data, cache_dir=cache_dir, data_root=data_root, strict=strict)
    return vlm, dataset, FeatureCache(cache_dir, vlm, progress=progress)


RESULT_COLUMNS = ["model", "dataset", "method", "seed", *METRICS, "ece_ci_low", "ece_ci_high", "status", "error", "config"]
KEY = ("model", "dataset", "method", "seed", "config")


def write_csv_atomic(rows: Sequence[dict[str, object]], path: Path, columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(path, buffer.getvalue())


def read_results(path: Path) -> list[dict[str, object]]:
    """Rows of a results.csv with numbers parsed back (empty cells of failed runs become NaN)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("model", "dataset", "method", "seed", *METRICS) if c not in (reader.fieldnames or [])]
        if missing:
            raise CalbenchError(f"{path} is not a calbench results.csv (no column {missing[0]!r}); point to a folder written by `calbench compare`")
        rows = list(reader)
    numeric = set(METRICS) | {"ece_ci_low", "ece_ci_high"}
    for row in rows:
        row["seed"] = int(row["seed"])
        for key in numeric:
            row[key] = float(row[key]) if row.get(key) not in (None, "") else float("nan")
        row.setdefault("status", "ok")
    return rows


class ResultsStore:
    """results.csv as a resumable log: one row per (model, dataset, method, seed, config).

    Each new row rewrites the file atomically, so an interrupted grid loses at most
    the run in progress; test-split probabilities are kept beside it for diagrams
    and reports.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / "results.csv"
        self.rows = read_results(self.path)

    @staticmethod
    def key(row: dict[str, object]) -> tuple[str, ...]:
        return tuple(str(row[k]) for k in KEY)

    def find(self, **key: object) -> Optional[dict[str, object]]:
        wanted = self.key(key)
        return next((row for row in self.rows if self.key(row) == wanted), None)

    def put(self, row: dict[str, object], probs: Optional[np.ndarray] = None) -> None:
        """Add or replace one row; other processes writing the same file keep their rows."""
        if probs is not None:
            path = self.predictions_path(row)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npy", dir=path.parent)
            os.close(fd)
            np.save(tmp, probs.astype(np.float32))
            os.replace(tmp, path)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / ".results.lock", "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)  # re-read under the lock: another run may have added rows
            merged = [r for r in read_results(self.path) if self.key(r) != self.key(row)]
            self.rows = merged + [row]
            write_csv_atomic(self.rows, self.path, RESULT_COLUMNS)

    def predictions_path(self, row: dict[str, object]) -> Path:
        name = "__".join(str(row[k]) for k in KEY).replace("/", "_").replace("+", "_")
        return self.out / "predictions" / f"{name}.npy"


def method_signature(method: Method) -> dict[str, object]:
    """Every resolved setting of a built method (defaults included), for the run's config hash.

    Hashing resolved settings, not the user's overrides, means a changed default is a new
    config, and spelling out a default is not.
    """
    if isinstance(method, Calibrated):
        return {"base": method_signature(method.base), "calibrator": type(method.calibrator).__name__}
    plain = (int, float, str, bool, tuple, list, type(None))
    signature: dict[str, object] = {"class": type(method).__name__}
    signature.update({k: v for k, v in sorted(vars(method).items()) if not k.startswith("_") and isinstance(v, plain)})
    if isinstance(method, PromptMethod):
        signature["config"] = asdict(method.config)
        signature["objective"] = {name: [t.loss, t.weight, dict(t.kwargs)] for name, t in method.objective.terms.items()}
    return signature


def check_settings(shots: int, val_shots: Optional[int], views: int, bootstrap: int = 0) -> None:
    """Reject run settings that cannot work, before any work, with the option to fix."""
    if shots < 1:
        raise CalbenchError(f"--shots must be at least 1, got {shots}")
    if val_shots is not None and val_shots < 1:
        raise CalbenchError(f"--val-shots must be at least 1 (post-hoc calibrators fit on the validation split), got {val_shots}")
    if views < 1:
        raise CalbenchError(f"--views must be at least 1, got {views}")
    if bootstrap < 0:
        raise CalbenchError(f"--bootstrap must be 0 (no interval) or more, got {bootstrap}")


def check_method_params(method_params: dict[str, dict[str, object]]) -> None:
    """Parameters must name registered base methods and build: a typo must not be ignored silently."""
    for name, params in method_params.items():
        if name not in METHODS:
            raise CalbenchError(f"--params names {name!r}, which is not a base method; use one of: {', '.join(list_methods())}")
        make_method(name, **params)


def run_config(vlm: VLMBackend, dataset: ImageFolderDataset, method: str, settings: dict[str, object]) -> str:
    """Short hash of everything besides (model, dataset, method, seed) that changes a row's numbers."""
    payload = {"model": vlm.fingerprint, "train": dataset.fingerprint("train"), "test": dataset.fingerprint("test"), "method": method, **settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class CompareResult:
    rows: list[dict[str, object]]  # every row of the requested grid, computed now or earlier
    computed: int
    skipped_pairs: list[tuple[str, str, str]]  # (model, dataset, what is missing)
    stats: CacheStats
    seconds: float
    out: Path
    plots: dict[str, Path] = field(default_factory=dict)

    @property
    def failures(self) -> list[dict[str, object]]:
        return [row for row in self.rows if row["status"] != "ok"]


def _evaluate_run(probs: np.ndarray, labels: np.ndarray, seed: int, n_bins: int, bootstrap: int) -> dict[str, object]:
    metrics: dict[str, object] = dict(evaluate(probs, labels, n_bins))
    low, high = bootstrap_ece(probs, labels, bootstrap, seed, n_bins) if bootstrap > 0 else (float("nan"), float("nan"))
    return {**metrics, "ece_ci_low": low, "ece_ci_high": high, "status": "ok", "error": ""}


def _failed(reason: str) -> dict[str, object]:
    return {**{m: float("nan") for m in METRICS}, "ece_ci_low": float("nan"), "ece_ci_high": float("nan"), "status": "failed", "error": reason}


def compare_pair(
    vlm: VLMBackend,
    dataset: ImageFolderDataset,
    cache: FeatureCache,
    store: ResultsStore,
    model: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    shots: int,
    val_shots: Optional[int],
    views: int,
    n_bins: int,
    bootstrap: int,
    method_params: dict[str, dict[str, object]],
    force: bool,
    log: Callable[[str], None],
) -> tuple[list[dict[str, object]], int]:
    """Every (method, seed) of one model and dataset; rows already in ``store`` are reused unless ``force``."""
    settings = {"shots": shots, "val_shots": val_shots, "views": views, "n_bins": n_bins}
    configs = {name: run_config(vlm, dataset, name, {**settings, "method": method_signature(make_method(name, **method_params.get(parse_method(name)[0], {})))}) for name in methods}
    test_labels = dataset.labels("test")
    test_features: Optional[torch.Tensor] = None
    rows, computed = [], 0
    for seed in seeds:
        def done(name: str, seed: int = seed) -> bool:
            row = store.find(model=model, dataset=dataset.name, method=name, seed=seed, config=configs[name])
            return row is not None and row["status"] == "ok"  # failed runs are retried

        todo = [name for name in methods if force or not done(name)]
        if not todo:
            continue
        if test_features is None:
            indices = np.arange(len(test_labels))
            test_features = cache.features(dataset, "test", indices, kind="eval")[0].to(vlm.device)
        base_fit = fewshot_features(vlm, dataset, cache, shots, seed, val_shots, views)

        def _fit_data(method: Method, seed: int = seed, base_fit: FewShotFeatures = base_fit) -> FitData:
            requests = feature_requests(method)
            return fewshot_features(vlm, dataset, cache, shots, seed, val_shots, views, requests).fit if requests else base_fit.fit

        fitted: dict[str, Method] = {}  # bases shared by their post-hoc variants (coop-ce, coop-ce+ts)
        errors: dict[str, str] = {}
        for name in todo:
            base, calibrator = parse_method(name)
            log(f"{model} · {dataset.name} · seed {seed}: {name}")
            row: dict[str, object] = {"model": model, "dataset": dataset.name, "method": name, "seed": seed, "config": configs[name]}
            probs = None
            try:
                if base in errors:
                    raise CalbenchError(errors[base])
                if base not in fitted:
                    try:
                        method = make_method(base, **method_params.get(base, {}))
                        fitted[base] = method.fit(_fit_data(method))
                    except Exception as exc:  # noqa: BLE001 - the base failed: so do its post-hoc variants
                        errors[base] = str(exc) if isinstance(exc, CalbenchError) else f"{type(exc).__name__}: {exc}"
                        raise CalbenchError(errors[base]) from exc
                method = fitted[base]
                if calibrator is not None:
                    method = Calibrated(method, CALIBRATORS.get(calibrator)(), base_is_fitted=True)
                    method.fit(_fit_data(method))
                with torch.no_grad():
                    probs = method.predict_proba(method_test_features(fitted[base], dataset, cache, test_features)).double().cpu().numpy()
                if not np.all(np.isfinite(probs)):
                    raise CalbenchError("predicted probabilities are not finite")
                row.update(_evaluate_run(probs, test_labels, seed, n_bins, bootstrap))
            except Exception as exc:  # noqa: BLE001 - one failed run is reported in its row; the grid goes on
                reason = str(exc) if isinstance(exc, CalbenchError) else f"{type(exc).__name__}: {exc}"
                row.update(_failed(reason))
                probs = None
                log(f"{model} · {dataset.name} · seed {seed}: {name} failed: {reason}")
            store.put(row, probs)
            computed += 1
    for seed in seeds:
        for name in methods:
            found = store.find(model=model, dataset=dataset.name, method=name, seed=seed, config=configs[name])
            if found is not None:
                rows.append(found)
    return rows, computed


def reliability_plots(store: ResultsStore, rows: Sequence[dict[str, object]], labels_of: dict[str, np.ndarray], n_bins: int) -> dict[str, Path]:
    """One diagram per (model, dataset, method), test predictions pooled over the seeds run."""
    groups: dict[tuple[str, str, str], list[np.ndarray]] = {}
    for row in rows:
        path = store.predictions_path(row)
        if row["status"] == "ok" and path.is_file():
            groups.setdefault((str(row["model"]), str(row["dataset"]), str(row["method"])), []).append(np.load(path))
    plots = {}
    for (model, dataset, method), parts in groups.items():
        path = store.out / "reliability" / f"{model}_{dataset}_{method.replace('+', '_')}.png"
        labels = np.tile(labels_of[dataset], len(parts))
        reliability_diagram(np.concatenate(parts), labels, f"{method} · {model} · {dataset} · {len(parts)} seed(s) pooled", path, n_bins)
        plots[f"{model}/{dataset}/{method}"] = path
    return plots


def plan_grid(all_pairs: bool, model: str, data: str, data_root: Optional[Path]) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """The (model, dataset) pairs to run and the skipped ones with what they miss.

    ``--all`` pairs every registered model with every registered dataset of its modality.
    """
    if not all_pairs:
        return [(model, data)], []
    from calbench.data import DATASETS
    from calbench.data import availability as data_availability
    from calbench.models import MODELS
    from calbench.models import availability as model_availability

    run, skipped = [], []
    for m in MODELS:
        for d in DATASETS:
            if not DATASETS.get(d).in_grid or MODELS.get(m).modality != DATASETS.get(d).modality:
                continue
            missing = [hint for ok, hint in (model_availability(m), data_availability(d, data_root)) if not ok]
            (skipped.append((m, d, "; ".join(missing))) if missing else run.append((m, d)))
    return run, skipped


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
    bootstrap: int = 1000,
    all_pairs: bool = False,
    force: bool = False,
    on_skip: Callable[[str, str, str], None] = lambda model, data, missing: None,
    strict: bool = False,
) -> CompareResult:
    """Fit every method for every seed, score on the test split, append to results.csv, draw diagrams.

    With ``all_pairs`` the grid is every available (model, dataset) pair of one modality;
    rows already in ``out/results.csv`` with the same settings are reused unless ``force``.
    ``method_params`` maps a base method id to constructor parameters (e.g. tuned ones).
    """
    start = time.perf_counter()
    if not methods:
        raise CalbenchError("--methods is empty; name at least one method, e.g. --methods coop-ce,calibprompt")
    for name in methods:
        parse_method(name)  # reject unknown names before any work
    check_settings(shots, val_shots, views, bootstrap)
    check_method_params(method_params or {})
    if not seeds:
        raise CalbenchError("--seeds is empty; give at least one seed, e.g. --seeds 1,2,3")
    pairs, skipped = plan_grid(all_pairs, model, data, data_root)
    for m, d, missing in skipped:
        on_skip(m, d, missing)
    store = ResultsStore(Path(out))
    stats = CacheStats()
    rows: list[dict[str, object]] = []
    labels_of: dict[str, np.ndarray] = {}
    computed = 0
    for m, d in pairs:
        vlm, dataset, cache = open_run(m, d, device, cache_dir, weights if not all_pairs else None, data_root, progress, strict)
        cache.stats = stats
        labels_of[dataset.name] = dataset.labels("test")
        pair_rows, pair_computed = compare_pair(
            vlm, dataset, cache, store, m, methods, seeds, shots, val_shots, views, n_bins, bootstrap, method_params or {}, force, log
        )
        rows += pair_rows
        computed += pair_computed
    plots = reliability_plots(store, rows, labels_of, n_bins)
    return CompareResult(rows, computed, skipped, stats, time.perf_counter() - start, store.out, plots)


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
    strict: bool = False,
) -> tuple[Path, dict[str, float]]:
    """Train one prompt method on one few-shot split, save its context; return path and validation metrics."""
    base, calibrator = parse_method(method)
    check_settings(shots, val_shots, views)
    untrained = make_method(method, **(params or {}))
    vlm, dataset, cache = open_run(model, data, device, cache_dir, weights, data_root, progress, strict)
    fit = fewshot_features(vlm, dataset, cache, shots, seed, val_shots, views, feature_requests(untrained, validate=True)).fit
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
        val = fit.extra.get(VAL_AS_TEST, fit.val_features)  # smoothed methods are judged on noisy copies, as at test time
        metrics = evaluate(trained.predict_proba(val).double().cpu().numpy(), fit.val_labels.cpu().numpy())
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
    strict: bool = False,
) -> tuple[CacheStats, Path]:
    """Encode the test split and each seed's few-shot views ahead of training."""
    check_settings(shots, val_shots, views)
    vlm, dataset, cache = open_run(model, data, device, cache_dir, weights, data_root, progress, strict)
    cache.features(dataset, "test", np.arange(len(dataset.files("test"))), kind="eval")
    for seed in seeds:
        fewshot_features(vlm, dataset, cache, shots, seed, val_shots, views)
    return cache.stats, cache.root
