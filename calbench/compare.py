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
from calbench.batched import prefit_grid
from calbench.cache import CacheStats
from calbench.errors import CalbenchError, check_seeds, warn
from calbench.methods import (
    DEFAULT_METHODS,
    check_method_params,
    make_method,
    method_signature,
    params_for,
    parse_method,
    resolved_settings,
)
from calbench.metrics import MAX_RESAMPLES, METRICS, bootstrap_ece, evaluate
from calbench.plots import reliability_diagram
from calbench.report.results import dataset_labels, diagram_stem
from calbench.results import SCORED, ResultsStore, Row
from calbench.scoring import Extras, deferral_plots, deferral_row, shift_done, shift_rows
from calbench.session import FewShot, RunContext, Session
from calbench.shards import merge_shards


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
    extras: Extras = Extras()  # deferral settings, --shift and smoothed diagrams (calbench.scoring)
    max_prompts: Optional[int] = None  # prompts per shared text-tower pass (None: calbench.batched's); 0: runs alone

    def check(self) -> None:
        """Reject a grid that cannot work, before any work, naming the option to fix."""
        if not self.methods:
            raise CalbenchError("--methods is empty; name at least one method, e.g. --methods coop-ce,calibprompt")
        for name in self.methods:
            parse_method(name)
        if not self.seeds:
            raise CalbenchError("--seeds is empty; give at least one seed, e.g. --seeds 1,2,3")
        check_seeds(self.seeds, "--seeds")
        for option, values in (("--methods", list(self.methods)), ("--seeds", list(self.seeds))):
            twice = sorted({str(v) for v in values if values.count(v) > 1})
            if twice:  # a repeat would count one run as two seeds and pool its predictions twice
                raise CalbenchError(f"{option} names {', '.join(twice)} more than once; name each once")
        if not 0 <= self.bootstrap <= MAX_RESAMPLES:
            raise CalbenchError(f"--bootstrap takes 0 (no interval) to {MAX_RESAMPLES} resamples, got {self.bootstrap}")
        check_method_params(self.method_params)
        self.extras.check()

    def build(self, name: str, model: Optional[str] = None, dataset: Optional[str] = None) -> Method:
        """The method ``name`` with its published defaults on (model, dataset) and its base's ``--params``, not fitted."""
        return make_method(name, **params_for(name, self.method_params, model, dataset))


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
        return [row for row in self.rows if row["status"] == "failed"]

    @property
    def degenerate(self) -> list[Row]:
        """Runs whose predictions collapsed to near-uniform (see :func:`degenerate_reason`)."""
        return [row for row in self.rows if row["status"] == "degenerate"]


#: a run is degenerate when every test item's top probability is this close to 1/C (calbench's
#: choice: an untrained or collapsed prompt would otherwise give ``ok``-looking rows at chance accuracy)
DEGENERATE_TOLERANCE = 1e-3


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


def dataset_identity(session: Session) -> str:
    """Six hex digits of the dataset's file fingerprints: what tells two datasets with one name
    (a/data, b/data) apart in the report and the diagram names. The run's ``config`` hashes the
    same fingerprints, so a row found by its config has this identity."""
    dataset = session.dataset
    return hashlib.sha256(f"{dataset.fingerprint('train')}|{dataset.fingerprint('test')}".encode()).hexdigest()[:6]


def degenerate_reason(probs: np.ndarray) -> str:
    """Why ``probs`` are a collapsed prediction, or "" when they are not: every top probability within
    :data:`DEGENERATE_TOLERANCE` of 1/C."""
    n_classes = probs.shape[1]
    if probs.shape[0] == 0 or not np.all(np.abs(probs.max(axis=1) - 1.0 / n_classes) <= DEGENERATE_TOLERANCE):
        return ""
    return (
        f"near-uniform predictions: every test item's top probability is within {DEGENERATE_TOLERANCE:g} of "
        f"1/{n_classes}; the method learned nothing (check epochs, lr and loss weights)"
    )


def score(probs: np.ndarray, labels: np.ndarray, seed: int, n_bins: int, bootstrap: int) -> Row:
    """A run's metric columns: every metric, the bootstrap ECE interval when asked for, and its status
    (``degenerate`` for a collapsed prediction: metrics kept, never the best ECE)."""
    metrics: Row = dict(evaluate(probs, labels, n_bins))
    low, high = bootstrap_ece(probs, labels, bootstrap, seed, n_bins) if bootstrap > 0 else (float("nan"), float("nan"))
    reason = degenerate_reason(probs)
    status = "degenerate" if reason else "ok"
    return {**metrics, "ece_ci_low": low, "ece_ci_high": high, "status": status, "error": reason}


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

    def __init__(self, session: Session, grid: Grid, seed: int, fitted: Optional[dict[str, Method]] = None) -> None:
        self.session, self.grid, self.seed = session, grid, seed
        self.fitted: dict[str, Method] = dict(fitted or {})  # bases fitted in shared text passes (calbench.batched)
        self.errors: dict[str, str] = {}
        self.shifted: dict[str, list[Row]] = {}  # --shift: each run's rows on corrupted test copies

    def fitted_method(self, name: str) -> Method:
        base, calibrator = parse_method(name)
        if base in self.errors:
            raise CalbenchError(self.errors[base])
        if base not in self.fitted:
            try:
                method = self.grid.build(base, self.session.model, self.session.dataset.name)
                self.fitted[base] = method.fit(self.session.fit_data(self.seed, self.grid.fewshot, method))
            except OSError:  # a full or read-only disk under the cache is the machine's, not the method's
                raise
            except Exception as exc:  # noqa: BLE001 - the base failed: so do its post-hoc variants
                self.errors[base] = reason_of(exc)
                raise CalbenchError(self.errors[base]) from exc
        if calibrator is None:
            return self.fitted[base]
        wrapped = Calibrated(self.fitted[base], CALIBRATORS.get(calibrator)(), base_is_fitted=True)
        return wrapped.fit(self.session.fit_data(self.seed, self.grid.fewshot, wrapped))

    def run(self, name: str) -> tuple[Row, Optional[np.ndarray]]:
        """Fit (or reuse) and score ``name``; a method's failure becomes a failed row, while a file-system
        error (the cache's disk is full or read-only) stops the grid with one line, finished rows kept."""
        try:
            method = self.fitted_method(name)
            with torch.no_grad():
                probs = method.predict_proba(self.session.test_features(method)).double().cpu().numpy()
            if not np.all(np.isfinite(probs)):
                raise CalbenchError("predicted probabilities are not finite")
            row = score(probs, self.session.test_labels, self.seed, self.grid.n_bins, self.grid.bootstrap)
            extras, fewshot = self.grid.extras, self.grid.fewshot
            row.update(deferral_row(self.session, self.seed, fewshot, method, probs, extras.deferral))
            self.shifted[name] = shift_rows(self.session, method, self.grid.n_bins) if extras.shift else []
            return row, probs
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - one failed run is reported in its row; the grid goes on
            return failed(reason_of(exc)), None


def compare_pair(
    session: Session, store: ResultsStore, grid: Grid, log: Callable[[str], None] = lambda message: None
) -> tuple[list[Row], int]:
    """Every (method, seed) of one model and dataset; rows already in ``store`` are reused unless ``grid.force``
    (failed rows are retried, degenerate ones reused: the same settings give the same collapse)."""
    fewshot = grid.fewshot
    settings = {"shots": fewshot.shots, "val_shots": fewshot.val, "views": fewshot.views, "n_bins": grid.n_bins}
    settings["deferral"] = [grid.extras.deferral.alpha, grid.extras.deferral.target_error]
    where = {"model": session.model, "dataset": session.dataset.name}
    pair = (session.model, session.dataset.name)
    configs = {
        name: run_config(session, name, {**settings, "method": method_signature(grid.build(name, *pair))})
        for name in grid.methods
    }
    given = {name: params_for(name, grid.method_params, *pair) for name in grid.methods}
    store.put_settings(
        {
            configs[name]: {**where, "method": name, "settings": resolved_settings(name, *pair, given[name])}
            for name in grid.methods
        }
    )
    identity = {"dataset_id": dataset_identity(session)}

    def logged(name: str, seed: int) -> Optional[Row]:
        return store.find(**where, method=name, seed=seed, config=configs[name])

    shape = (len(session.test_labels), session.dataset.n_classes)
    shifted = shift_done(store) if grid.extras.shift else None  # runs --shift has scored
    todos = {
        seed: [
            n
            for n in grid.methods
            if grid.force
            or (logged(n, seed) or {}).get("status") not in SCORED
            or store.predictions_damaged(logged(n, seed), shape)  # a damaged prediction file: its run again
            or (shifted is not None and store.key(logged(n, seed) or {}) not in shifted)  # --shift not yet run
        ]
        for seed in grid.seeds
    }
    # data problems stop the grid here with one line; prompt methods are fitted together (calbench.batched)
    prefit = prefit_grid(session, lambda name: grid.build(name, *pair), fewshot, todos, grid.max_prompts, log)
    for seed, todo in todos.items():
        run = _SeedRun(session, grid, seed, prefit.get(seed))
        for name in todo:
            log(f"{session.model} · {session.dataset.name} · seed {seed}: {name}")
            metrics, probs = run.run(name)
            if metrics["status"] != "ok":
                log(
                    f"{session.model} · {session.dataset.name} · seed {seed}: {name} {metrics['status']}: {metrics['error']}"
                )
            key = {**where, "method": name, "seed": seed, "config": configs[name]}
            store.put({**key, **identity, **metrics}, probs)
            store.put_shift([{**key, **r} for r in run.shifted.get(name, [])])
    rows = [row for seed in grid.seeds for name in grid.methods if (row := logged(name, seed)) is not None]
    # written again last, so the report shows the settings run now, not ones logged after them; rows from
    # before results.csv had a dataset_id get it (their config pins the same files)
    store.put_rows([{**row, **identity} if not row.get("dataset_id") else row for row in rows])
    rows = [row for seed in grid.seeds for name in grid.methods if (row := logged(name, seed)) is not None]
    return rows, sum(len(todo) for todo in todos.values())


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
    for m in (m for m in MODELS if not MODELS.get(m).variant_of):  # variants run only when named
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
    merge_shards(Path(out))  # rows that the jobs of a launched grid (calbench.launch) left in shards
    store = ResultsStore(Path(out))
    stats, rows, labels_of, computed = CacheStats(), [], {}, 0
    for m, d in pairs:
        session = Session(m, d, replace(context, weights=None) if all_pairs else context)
        session.cache.stats = stats  # one count over the grid
        labels_of[(session.dataset.name, dataset_identity(session))] = session.test_labels
        pair_rows, pair_computed = compare_pair(session, store, grid, log)
        rows += pair_rows
        computed += pair_computed
    plots = reliability_plots(store, rows, labels_of, grid.n_bins)
    plots.update(deferral_plots(store, rows, labels_of, grid.extras))
    for row in {id(r): r for r in rows}.values():
        if row["status"] == "degenerate":
            warn(
                f"{row['model']} · {row['dataset']} · {row['method']} (seed {row['seed']}) is degenerate: {row['error']}"
            )
    return CompareResult(rows, computed, skipped, stats, time.perf_counter() - start, store.out, plots)
