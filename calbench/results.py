"""The results folder: ``results.csv``, ``certification.csv`` and test predictions, one writer for all.

``results.csv`` is a resumable log with one row per (model, dataset, method, seed, config),
where ``config`` hashes everything else that changes the numbers; `compare`, `tune` (its
final test rows) and the report read and write it only through :class:`ResultsStore`.
Every write re-reads the file under a lock, merges and replaces it atomically, so
concurrent runs into one folder keep each other's rows and an interrupted run loses at
most the run in progress. Nothing here needs torch: a report renders from these files alone.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np

from calbench.atomic import save_npy_atomic, write_csv_atomic
from calbench.errors import CalbenchError
from calbench.metrics import METRICS

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs into one folder are unsafe there
    fcntl = None  # type: ignore[assignment]

RESULT_COLUMNS = [
    "model",
    "dataset",
    "method",
    "seed",
    *METRICS,
    "ece_ci_low",
    "ece_ci_high",
    "status",
    "error",
    "config",
]
KEY = ("model", "dataset", "method", "seed", "config")
#: one row per certified setting and radius (`calbench certify`)
CERTIFY_COLUMNS = [
    "model",
    "dataset",
    "method",
    "seed",
    "shots",
    "sigma",
    "n0",
    "n",
    "alpha",
    "subset",
    "radius",
    "certified_accuracy",
    "abstain_rate",
]
CERTIFY_KEY = tuple(c for c in CERTIFY_COLUMNS if c not in ("certified_accuracy", "abstain_rate"))

Row = dict[str, Any]


def read_results(path: Path) -> list[Row]:
    """Rows of a results.csv with numbers parsed back (empty cells of failed runs become NaN)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("model", "dataset", "method", "seed", *METRICS) if c not in (reader.fieldnames or [])]
        if missing:
            raise CalbenchError(
                f"{path} is not a calbench results.csv (no column {missing[0]!r}); point to a folder written by `calbench compare`"
            )
        rows = list(reader)
    numeric = set(METRICS) | {"ece_ci_low", "ece_ci_high"}
    for row in rows:
        row["seed"] = int(row["seed"])
        for key in numeric:
            row[key] = float(row[key]) if row.get(key) not in (None, "") else float("nan")
        row.setdefault("status", "ok")
    return rows


def read_certification(path: Path) -> list[Row]:
    """Rows of a certification.csv as text (the report formats them), checked to be calbench's."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != CERTIFY_COLUMNS:
            raise CalbenchError(
                f"{path} has columns {reader.fieldnames}, not calbench's certification columns; move it away or pick another --out"
            )
        return list(reader)


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


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".results.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _merge(
    path: Path, rows: Sequence[Row], columns: Sequence[str], key: Sequence[str], read: Callable[[Path], list[Row]]
) -> list[Row]:
    """Replace the rows of ``path`` that share ``key`` with ``rows``, keep the rest; re-read under the lock."""

    def of(row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(str(row[k]) for k in key)

    with _locked(path.parent):
        new = {of(r) for r in rows}
        merged = [r for r in read(path) if of(r) not in new] + list(rows)
        write_csv_atomic(merged, path, columns)
    return merged


class ResultsStore:
    """One results folder: its results.csv rows, their test predictions, and certification.csv."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / "results.csv"
        self.rows = read_results(self.path)

    @staticmethod
    def key(row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(str(row[k]) for k in KEY)

    def find(self, **key: object) -> Optional[Row]:
        wanted = self.key(key)
        return next((row for row in self.rows if self.key(row) == wanted), None)

    def put(self, row: Row, probs: Optional[np.ndarray] = None) -> None:
        """Add or replace one row (and its test probabilities); other processes' rows are kept."""
        if probs is not None:
            save_npy_atomic(self.predictions_path(row), probs.astype(np.float32))
        self.put_rows([row])

    def put_rows(self, rows: Sequence[Row]) -> None:
        self.rows = _merge(self.path, rows, RESULT_COLUMNS, KEY, read_results)

    def predictions_path(self, row: Mapping[str, Any]) -> Path:
        name = "__".join(str(row[k]) for k in KEY).replace("/", "_").replace("+", "_")
        return self.out / "predictions" / f"{name}.npy"

    def predictions(self, row: Mapping[str, Any]) -> Optional[np.ndarray]:
        """The run's test probabilities, or None when it has none (failed, or written elsewhere)."""
        path = self.predictions_path(row)
        return np.load(path, allow_pickle=False) if row["status"] == "ok" and path.is_file() else None

    def put_certification(self, rows: Sequence[Row]) -> Path:
        """Merge certification rows into certification.csv, replacing earlier rows of the same setting."""
        path = self.out / "certification.csv"
        _merge(path, rows, CERTIFY_COLUMNS, CERTIFY_KEY, read_certification)
        return path
