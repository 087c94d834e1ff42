"""`compare`: fit methods on few-shot features, score each once on the test split, log the results.

Methods only ever receive :class:`~calbench.base.FitData` (few-shot train views and
validation images from the train pool); the test split is read here, through
:meth:`Session.test_features`, to score methods that are already fitted.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from calbench.base import CALIBRATORS, Calibrated, Method
from calbench.cache import CacheStats
from calbench.errors import CalbenchError
from calbench.methods import (
    DEFAULT_METHODS,
    check_method_params,
    make_method,
    method_signature,
    params_for,
    parse_method,
)
from calbench.metrics import METRICS, bootstrap_ece, evaluate
from calbench.plots import reliability_diagram
from calbench.results import ResultsStore, Row
from calbench.session import FewShot, RunContext, Session


@dataclass(frozen=True)
class Grid:
    """What to run on each (model, dataset) pair and how to score it."""

    methods: Sequence[str] = tuple(DEFAULT_METHODS)
    seeds: Sequence[int] = (1, 2, 3)
    fewshot: FewShot = FewShot()
    n_bins: int = 10  # equal-width confidence bins of ECE and the diagrams (Guo et al., 2017)
    bootstrap: int = 1000  # resamples of each run's 95% ECE interval (0: none)
    method_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    force: bool = False  # recompute rows already in results.csv

    def check(self) -> None:
        """Reject a grid that cannot work, before any work, naming the option to fix."""
        if not self.methods:
            raise CalbenchError("--methods is empty; name at least one method, e.g. --methods coop-ce,calibprompt")
        for name in self.methods:
            parse_method(name)
        if not self.seeds:
            raise CalbenchError("--seeds is empty; give at least one seed, e.g. --seeds 1,2,3")
        if self.bootstrap < 0:
            raise CalbenchError(f"--bootstrap must be 0 (no interval) or more, got {self.bootstrap}")
        check_method_params(self.method_params)

    def build(self, name: str) -> Method:
        """The method ``name`` with its base's ``--params``, not fitted."""
        return make_method(name, **params_for(name, self.method_params))


@dataclass
class CompareResult:
    rows: list[Row]  # every row of the requested grid, computed now or earlier
    computed: int
    skipped_pairs: list[tuple[str, str, str]]  # (model, dataset, what is missing)
    stats: CacheStats  # image views encoded and read from the cache
    seconds: float
    out: Path
    plots: dict[str, Path] = field(default_factory=dict)

    @property
    def failures(self) -> list[Row]:
        return [row for row in self.rows if row["status"] != "ok"]


def run_config(session: Session, method: str, settings: Mapping[str, object]) -> str:
    """Short hash of everything besides (model, dataset, method, seed) that changes a row's numbers."""
    dataset = session.dataset
    payload = {
        "model": session.vlm.fingerprint,
        "train": dataset.fingerprint("train"),
        "test": dataset.fingerprint("test"),
        "method": method,
        **settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


def score(probs: np.ndarray, labels: np.ndarray, seed: int, n_bins: int, bootstrap: int) -> Row:
    """A run's metric columns: every metric, and the bootstrap ECE interval when asked for."""
    metrics: Row = dict(evaluate(probs, labels, n_bins))
    low, high = bootstrap_ece(probs, labels, bootstrap, seed, n_bins) if bootstrap > 0 else (float("nan"), float("nan"))
    return {**metrics, "ece_ci_low": low, "ece_ci_high": high, "status": "ok", "error": ""}


def failed(reason: str) -> Row:
    return {
        **{m: float("nan") for m in METRICS},
        "ece_ci_low": float("nan"),
        "ece_ci_high": float("nan"),
        "status": "failed",
        "error": reason,
    }


def reason_of(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, CalbenchError) else f"{type(exc).__name__}: {exc}"


class _SeedRun:
    """One seed of one pair: bases are fitted once and shared by their post-hoc variants (coop-ce, coop-ce+ts)."""

    def __init__(self, session: Session, grid: Grid, seed: int) -> None:
        self.session, self.grid, self.seed = session, grid, seed
        self.fitted: dict[str, Method] = {}
        self.errors: dict[str, str] = {}

    def fitted_method(self, name: str) -> Method:
        base, calibrator = parse_method(name)
        if base in self.errors:
            raise CalbenchError(self.errors[base])
        if base not in self.fitted:
            try:
                method = self.grid.build(base)
                self.fitted[base] = method.fit(self.session.fit_data(self.seed, self.grid.fewshot, method))
            except Exception as exc:  # noqa: BLE001 - the base failed: so do its post-hoc variants
                self.errors[base] = reason_of(exc)
                raise CalbenchError(self.errors[base]) from exc
        if calibrator is None:
            return self.fitted[base]
        wrapped = Calibrated(self.fitted[base], CALIBRATORS.get(calibrator)(), base_is_fitted=True)
        return wrapped.fit(self.session.fit_data(self.seed, self.grid.fewshot, wrapped))

    def run(self, name: str) -> tuple[Row, Optional[np.ndarray]]:
        """Fit (or reuse) and score ``name``; a failure becomes a failed row, never an exception."""
        try:
            method = self.fitted_method(name)
            with torch.no_grad():
                probs = method.predict_proba(self.session.test_features(method)).double().cpu().numpy()
            if not np.all(np.isfinite(probs)):
                raise CalbenchError("predicted probabilities are not finite")
            return score(probs, self.session.test_labels, self.seed, self.grid.n_bins, self.grid.bootstrap), probs
        except Exception as exc:  # noqa: BLE001 - one failed run is reported in its row; the grid goes on
            return failed(reason_of(exc)), None


def compare_pair(
    session: Session, store: ResultsStore, grid: Grid, log: Callable[[str], None] = lambda message: None
) -> tuple[list[Row], int]:
    """Every (method, seed) of one model and dataset; rows already in ``store`` are reused unless ``grid.force``."""
    fewshot = grid.fewshot
    settings = {"shots": fewshot.shots, "val_shots": fewshot.val_shots, "views": fewshot.views, "n_bins": grid.n_bins}
    configs = {
        name: run_config(session, name, {**settings, "method": method_signature(grid.build(name))})
        for name in grid.methods
    }
    where = {"model": session.model, "dataset": session.dataset.name}

    def logged(name: str, seed: int) -> Optional[Row]:
        return store.find(**where, method=name, seed=seed, config=configs[name])

    computed = 0
    for seed in grid.seeds:
        # failed runs are retried
        todo = [n for n in grid.methods if grid.force or (logged(n, seed) or {}).get("status") != "ok"]
        if todo:  # data problems (too few images, an unreadable file) stop the grid with one line, not a row per method
            session.test_features()
            session.fit_data(seed, fewshot)
        run = _SeedRun(session, grid, seed)
        for name in todo:
            log(f"{session.model} · {session.dataset.name} · seed {seed}: {name}")
            metrics, probs = run.run(name)
            if metrics["status"] != "ok":
                log(f"{session.model} · {session.dataset.name} · seed {seed}: {name} failed: {metrics['error']}")
            store.put({**where, "method": name, "seed": seed, "config": configs[name], **metrics}, probs)
            computed += 1
    rows = [row for seed in grid.seeds for name in grid.methods if (row := logged(name, seed)) is not None]
    return rows, computed


def reliability_plots(
    store: ResultsStore, rows: Sequence[Row], labels_of: Mapping[str, np.ndarray], n_bins: int
) -> dict[str, Path]:
    """One diagram per (model, dataset, method), test predictions pooled over the seeds run."""
    groups: dict[tuple[str, str, str], list[np.ndarray]] = {}
    for row in rows:
        probs = store.predictions(row)
        if probs is not None:
            groups.setdefault((str(row["model"]), str(row["dataset"]), str(row["method"])), []).append(probs)
    plots = {}
    for (model, dataset, method), parts in groups.items():
        path = store.out / "reliability" / f"{model}_{dataset}_{method.replace('+', '_')}.png"
        labels = np.tile(labels_of[dataset], len(parts))
        reliability_diagram(
            np.concatenate(parts), labels, f"{method} · {model} · {dataset} · {len(parts)} seed(s) pooled", path, n_bins
        )
        plots[f"{model}/{dataset}/{method}"] = path
    return plots


def plan_grid(
    all_pairs: bool, model: str, data: str, data_root: Optional[Path]
) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
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
    grid: Grid = Grid(),
    context: RunContext = RunContext(),
    out: Path = Path("results"),
    all_pairs: bool = False,
    log: Callable[[str], None] = lambda message: None,
    on_skip: Callable[[str, str, str], None] = lambda model, data, missing: None,
) -> CompareResult:
    """Fit every method for every seed, score on the test split, log to ``out``/results.csv, draw diagrams.

    With ``all_pairs`` the grid is every available (model, dataset) pair of one modality
    (``context.weights`` is then ignored: it belongs to one model); rows already in
    results.csv with the same settings are reused unless ``grid.force``.
    """
    start = time.perf_counter()
    grid.check()
    pairs, skipped = plan_grid(all_pairs, model, data, context.data_root)
    for m, d, missing in skipped:
        on_skip(m, d, missing)
    store = ResultsStore(Path(out))
    stats, rows, labels_of, computed = CacheStats(), [], {}, 0
    for m, d in pairs:
        session = Session(m, d, replace(context, weights=None) if all_pairs else context)
        session.cache.stats = stats  # one count over the grid
        labels_of[session.dataset.name] = session.test_labels
        pair_rows, pair_computed = compare_pair(session, store, grid, log)
        rows += pair_rows
        computed += pair_computed
    plots = reliability_plots(store, rows, labels_of, grid.n_bins)
    return CompareResult(rows, computed, skipped, stats, time.perf_counter() - start, store.out, plots)
