"""One pair of a grid: fit its methods on few-shot features, score each once on the test split, log the rows.

Methods only ever receive :class:`~calbench.base.FitData` (few-shot train views and
validation images from the train pool); the test split is read here, through
:meth:`Session.test_features`, to score methods that are already fitted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any, Optional

import numpy as np
import torch

from calbench.base import CALIBRATORS, Calibrated, Method
from calbench.batched import FitOutcome, fit_grid
from calbench.compare.deferral_shift import deferral_row, shift_done, shift_rows
from calbench.compare.grid import Grid
from calbench.errors import CalbenchError
from calbench.methods import parse_method
from calbench.metrics import METRICS, bootstrap_ece, evaluate
from calbench.results import SCORED, ResultsStore, Row
from calbench.session import Session

#: a run is degenerate when every test item's top probability is this close to 1/C (calbench's
#: choice: an untrained or collapsed prompt would otherwise give ``ok``-looking rows at chance accuracy)
DEGENERATE_TOLERANCE = 1e-3


def run_context_of(session: Session, grid: Grid) -> dict[str, Any]:
    """Everything besides the method's settings (and model, dataset, method, seed) that changes a row's
    numbers: the model's and the data's files, the few-shot draw and the scoring options."""
    dataset, fewshot = session.dataset, grid.fewshot
    return {
        "model": session.vlm.fingerprint,
        "train": dataset.fingerprint("train"),
        "test": dataset.fingerprint("test"),
        "shots": fewshot.shots,
        "val_shots": fewshot.val,
        "views": fewshot.views,
        "n_bins": grid.n_bins,
        "deferral": [grid.extras.deferral.alpha, grid.extras.deferral.target_error],
    }


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
    """One seed of one pair: its bases fitted once (by :func:`~calbench.batched.fit_grid`) and shared by their
    post-hoc variants (coop-ce, coop-ce+ts)."""

    def __init__(self, session: Session, grid: Grid, seed: int, fitted: Mapping[str, FitOutcome]) -> None:
        self.session, self.grid, self.seed = session, grid, seed
        self.fitted = fitted
        self.shifted: dict[str, list[Row]] = {}  # --shift: each run's rows on corrupted test copies

    def fitted_method(self, name: str) -> Method:
        base, calibrator = parse_method(name)
        outcome = self.fitted[base]
        if outcome.error is not None:  # the base failed: so do its post-hoc variants
            raise CalbenchError(reason_of(outcome.error)) from outcome.error
        method = outcome.fitted()
        if calibrator is None:
            return method
        wrapped = Calibrated(method, CALIBRATORS.get(calibrator)(), base_is_fitted=True)
        return wrapped.fit(self.session.fit_data(self.seed, self.grid.fewshot, wrapped))

    def run(self, name: str) -> tuple[Row, Optional[np.ndarray]]:
        """Score ``name`` (its base fitted already); a method's failure becomes a failed row, while a file-system
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


def _todo(session: Session, store: ResultsStore, grid: Grid, configs: Mapping[str, str]) -> dict[int, list[str]]:
    """The methods of each seed still to run: not in ``store`` with a scored row (failed rows are retried,
    degenerate ones reused: the same settings give the same collapse), or all with ``grid.force``."""
    where = {"model": session.model, "dataset": session.dataset.name}
    shape = (len(session.test_labels), session.dataset.n_classes)
    shifted = shift_done(store) if grid.extras.shift else None  # runs --shift has scored

    def missing(name: str, seed: int) -> bool:
        row = store.find(**where, method=name, seed=seed, config=configs[name])
        return (
            grid.force
            or (row or {}).get("status") not in SCORED
            or not (row or {}).get("dataset_id")  # written before rows named their dataset's files: run again
            or store.predictions_damaged(row, shape)  # a damaged prediction file: its run again
            or (shifted is not None and store.key(row or {}) not in shifted)  # --shift not yet run
        )

    return {seed: [name for name in grid.methods if missing(name, seed)] for seed in grid.seeds}


def compare_pair(
    session: Session, store: ResultsStore, grid: Grid, log: Callable[[str], None] = lambda message: None
) -> tuple[list[Row], int]:
    """Every (method, seed) of one model and dataset; rows already in ``store`` are reused unless ``grid.force``.

    Each method's settings are resolved once for the pair, and each base is built once per seed and fitted
    once (:func:`~calbench.batched.fit_grid`), its post-hoc variants sharing it."""
    where = {"model": session.model, "dataset": session.dataset.name}
    resolved = grid.resolve(session.model, session.dataset.name)
    context = run_context_of(session, grid)
    configs = {name: r.config_hash(context) for name, r in resolved.items()}
    store.put_settings(
        {
            configs[name]: {
                **where,
                "method": name,
                "settings": {k: (s.value, s.source) for k, s in r.settings.items()},
            }
            for name, r in resolved.items()
        }
    )
    identity = {"dataset_id": dataset_identity(session)}
    todos = _todo(session, store, grid, configs)
    built: dict[int, dict[str, Method]] = {}
    for seed, todo in todos.items():
        bases = {resolved[name].base: resolved[name] for name in todo}  # a base and its +cal resolve alike
        built[seed] = {base: r.build_base() for base, r in bases.items()}
        if todo:  # data problems stop the grid here with one line (views: one per epoch of its first method)
            session.check(seed, grid.fewshot, next(iter(built[seed].values())))
    fitted = fit_grid(session, built, grid.fewshot, grid.max_prompts, log)
    for seed, todo in todos.items():
        run = _SeedRun(session, grid, seed, fitted[seed])
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

    def logged(name: str, seed: int) -> Optional[Row]:
        return store.find(**where, method=name, seed=seed, config=configs[name])

    rows = [row for seed in grid.seeds for name in grid.methods if (row := logged(name, seed)) is not None]
    # written again last, so the report shows the settings run now, not ones logged after them
    store.put_rows(rows)
    rows = [row for seed in grid.seeds for name in grid.methods if (row := logged(name, seed)) is not None]
    return rows, sum(len(todo) for todo in todos.values())
