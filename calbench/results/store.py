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
import io
import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np

from calbench.atomic import save_npy_atomic, write_bytes_atomic, write_csv_atomic, write_text_atomic
from calbench.deferral import DEFERRAL_COLUMNS
from calbench.errors import CalbenchError, naming, warn
from calbench.metrics import METRICS, shift_damage

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
    "dataset_id",  # the dataset's file fingerprints, short: tells apart two datasets with one name
    *DEFERRAL_COLUMNS,  # selective prediction, conformal sets, smooth ECE; empty in files from before them
]
KEY = ("model", "dataset", "method", "seed", "config")
#: statuses whose row has metrics and is reused on the next run: a degenerate run is a deterministic
#: outcome of its settings (retrying gives the same), a failed one is retried
SCORED = ("ok", "degenerate")
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


def _parse_csv(path: Path) -> tuple[list[str], list[tuple[int, Row, str]]]:
    """The header and (line, row, damage) of every row; damage is "" for a sound row, else why it is not.

    Bytes that are not UTF-8 are kept as surrogates so that only their rows are lost; a file
    calbench wrote ends with a line break, so a last row without one was cut short.
    """
    text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        fields = list(reader.fieldnames or [])
    except csv.Error:
        fields = []
    rows: list[tuple[int, Row, str]] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rows.append((reader.line_num, {}, f"unreadable CSV ({exc})"))
            continue
        if None in row:
            damage = "more fields than the header"
        elif any(value is None for value in row.values()):
            damage = "fewer fields than the header"
        elif any(_NOT_UTF8.search(value) for value in row.values()):
            damage = "bytes that are not UTF-8"
        else:
            damage = ""
        rows.append((reader.line_num, row, damage))
    if rows and text and not text.endswith("\n"):
        rows[-1] = (rows[-1][0], rows[-1][1], "cut short: no line break at the end of the file")
    return fields, rows


#: surrogates that stand for bytes that were not UTF-8 (``errors="surrogateescape"``)
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _bad_number(row: Row, integers: Iterable[str], floats: Iterable[str]) -> str:
    """Why a row's numeric cells do not parse ("" when they all do; empty float cells are NaN)."""
    for key in integers:
        try:
            int(row[key])
        except (KeyError, ValueError):
            return f"{key} {row.get(key)!r} is not a whole number"
    for key in floats:
        try:
            float(row[key]) if row.get(key) not in (None, "") else None
        except ValueError:
            return f"{key} {row[key]!r} is not a number"
    return ""


def _sound_rows(path: Path, rows: list[tuple[int, Row, str]], quiet: bool, then: str) -> tuple[list[Row], int]:
    """The sound rows, and how many were damaged (each named in a warning unless ``quiet``)."""
    sound = [row for _, row, damage in rows if not damage]
    for line, _, damage in rows:
        if damage and not quiet:
            warn(f"{path} line {line} is damaged ({damage}); dropped it, {then}")
    return sound, len(rows) - len(sound)


def _load_results(path: Path, quiet: bool = False) -> tuple[list[Row], int]:
    if not Path(path).is_file():
        return [], 0
    fields, parsed = _parse_csv(path)
    missing = [c for c in ("model", "dataset", "method", "seed", *METRICS) if c not in fields]
    if missing:
        raise CalbenchError(
            f"{path} is not a calbench results.csv (no column {missing[0]!r}); point to a folder written by `calbench compare`"
        )
    numeric = [c for c in (*METRICS, "ece_ci_low", "ece_ci_high", *DEFERRAL_COLUMNS) if c in fields]
    parsed = [(line, row, damage or _bad_number(row, ["seed"], numeric)) for line, row, damage in parsed]
    rows, damaged = _sound_rows(path, parsed, quiet, "so its run is computed again")
    for row in rows:
        row["seed"] = int(row["seed"])
        for key in (*METRICS, "ece_ci_low", "ece_ci_high", *DEFERRAL_COLUMNS):
            row[key] = float(row[key]) if row.get(key) not in (None, "") else float("nan")
        row.setdefault("status", "ok")
        row["dataset_id"] = row.get("dataset_id") or ""  # files written before the column existed
    return rows, damaged


def read_results(path: Path) -> list[Row]:
    """Rows of a results.csv with numbers parsed back (empty cells of failed runs become NaN).

    A damaged row (bytes that are not UTF-8, a cell that should be a number and is not, a last
    row cut short) is left out with a warning naming the file and line, so its run is computed again.
    """
    return _load_results(path)[0]


def _load_certification(path: Path, quiet: bool = False) -> tuple[list[Row], int]:
    if not Path(path).is_file():
        return [], 0
    fields, parsed = _parse_csv(path)
    if fields != CERTIFY_COLUMNS:
        raise CalbenchError(
            f"{path} has columns {fields}, not calbench's certification columns; move it away or pick another --out"
        )
    integers = ("seed", "shots", "n0", "n", "subset")
    floats = ("sigma", "alpha", "radius", "certified_accuracy", "abstain_rate")
    parsed = [(line, row, damage or _bad_number(row, integers, floats)) for line, row, damage in parsed]
    return _sound_rows(path, parsed, quiet, "rerun `calbench certify` with that setting to restore it")


def read_certification(path: Path) -> list[Row]:
    """Rows of a certification.csv as text (the report formats them), checked to be calbench's;
    damaged rows are left out with a warning, as in :func:`read_results`."""
    return _load_certification(path)[0]


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".results.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def open_folder(out: Path) -> Path:
    """Create the results folder and take its lock once: a file in the way, or a folder that cannot
    be written, fails here, before any work, instead of after the first run."""
    with _locked(Path(out)):
        return Path(out)


def _merge(
    path: Path,
    rows: Sequence[Row],
    columns: Sequence[str],
    key: Sequence[str],
    load: Callable[[Path, bool], tuple[list[Row], int]],
) -> list[Row]:
    """Replace the rows of ``path`` that share ``key`` with ``rows``, keep the rest; re-read under the lock.

    Rows found damaged are dropped from the new file; the file as it was is kept beside it (``.damaged``).
    """

    def of(row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(str(row[k]) for k in key)

    with _locked(path.parent):
        new = {of(r) for r in rows}
        kept, damaged = load(path, True)
        if damaged:
            backup = path.with_name(f"{path.name}.damaged")
            with naming(backup):
                write_bytes_atomic(backup, path.read_bytes())
            warn(f"dropped {damaged} damaged row(s) from {path}; the file as it was is kept as {backup}")
        merged = [r for r in kept if of(r) not in new] + list(rows)
        with naming(path):
            write_csv_atomic(merged, path, columns)
    return merged


class ResultsStore:
    """One results folder: its results.csv rows, their test predictions, and certification.csv.

    Opening a store creates the folder (so an unwritable one fails before any work) and reads
    results.csv; damaged rows and prediction files are reported and their runs computed again.
    """

    def __init__(self, out: Path) -> None:
        self.out = open_folder(Path(out))
        self.path = self.out / "results.csv"
        self.rows = read_results(self.path)
        self._damaged: set[Path] = set()  # prediction files already reported

    @staticmethod
    def key(row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(str(row[k]) for k in KEY)

    def find(self, **key: object) -> Optional[Row]:
        wanted = self.key(key)
        return next((row for row in self.rows if self.key(row) == wanted), None)

    def put(self, row: Row, probs: Optional[np.ndarray] = None) -> None:
        """Add or replace one row (and its test probabilities); other processes' rows are kept."""
        if probs is not None:
            path = self.predictions_path(row)
            with naming(path):
                save_npy_atomic(path, probs.astype(np.float32))
        self.put_rows([row])

    def put_rows(self, rows: Sequence[Row]) -> None:
        self.rows = _merge(self.path, rows, RESULT_COLUMNS, KEY, _load_results)

    def predictions_path(self, row: Mapping[str, Any]) -> Path:
        name = "__".join(str(row[k]) for k in KEY).replace("/", "_").replace("+", "_")
        return self.out / "predictions" / f"{name}.npy"

    def predictions(self, row: Mapping[str, Any], shape: Optional[tuple[int, int]] = None) -> Optional[np.ndarray]:
        """The run's test probabilities ((items, classes) floats; ``shape`` when given), or None when it
        has none (failed, or written elsewhere) or its file is damaged (then with a warning, once)."""
        path = self.predictions_path(row)
        if row.get("status") == "failed" or not path.is_file():
            return None
        try:
            probs = np.load(path, allow_pickle=False)  # never unpickle: a file is data, not code
            damage = _prediction_damage(probs, shape)
        except (ValueError, EOFError) as exc:  # truncated, random bytes, an object array, an empty file
            pickled = "pickled" in str(exc)  # numpy's own text would suggest loading it unsafely
            damage = "not an array of numbers (pickled data is never loaded)" if pickled else f"unreadable: {exc}"
        if not damage:
            return probs
        if path not in self._damaged:
            self._damaged.add(path)
            warn(f"predictions file {path} is damaged ({damage}); computing its run again")
        return None

    def predictions_damaged(self, row: Optional[Mapping[str, Any]], shape: Optional[tuple[int, int]] = None) -> bool:
        """Whether a logged run has a prediction file that cannot be used (a missing file is not damaged):
        such a run is computed again, like a corrupt cache entry."""
        if row is None or row.get("status") == "failed" or not self.predictions_path(row).is_file():
            return False
        return self.predictions(row, shape) is None

    def put_certification(self, rows: Sequence[Row]) -> Path:
        return put_certification(self.out, rows)

    def put_shift(self, rows: Sequence[Row]) -> None:
        put_shift(self.out, rows)

    def shift_rows(self) -> list[Row]:
        return read_shift(self.out)

    def put_settings(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Record the settings each config ran with (``settings.json``: config -> model, dataset,
        method and {setting: [value, source]}), so the report shows what ran and why."""
        path = self.out / SETTINGS_NAME
        with _locked(self.out):
            merged = {**read_settings(self.out), **{str(k): dict(v) for k, v in records.items()}}
            with naming(path):
                write_text_atomic(path, json.dumps(merged, indent=1, sort_keys=True, default=str))


#: the settings each logged config ran with, for the report
SETTINGS_NAME = "settings.json"


def read_settings(out: Path) -> dict[str, dict[str, Any]]:
    """``settings.json`` of a results folder ({} when missing; unreadable: {} with a warning)."""
    path = Path(out) / SETTINGS_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        warn(f"{path} is unreadable ({exc}); the report leaves out the settings, and the next compare rewrites it")
        return {}
    return data if isinstance(data, dict) else {}


def put_certification(out: Path, rows: Sequence[Row]) -> Path:
    """Merge certification rows into ``out``/certification.csv, replacing earlier rows of the same setting."""
    path = Path(out) / "certification.csv"
    _merge(path, rows, CERTIFY_COLUMNS, CERTIFY_KEY, _load_certification)
    return path


#: one row per run, corruption and severity (`compare --shift`): the run's test metrics on corrupted copies
SHIFT_COLUMNS = [*KEY, "corruption", "severity", "accuracy", "ece", "smooth_ece", "nll", "aurc"]
SHIFT_KEY = (*KEY, "corruption", "severity")


def _load_shift(path: Path, quiet: bool = False, conditions: Collection[tuple[str, int]] = ()) -> tuple[list[Row], int]:
    if not Path(path).is_file():
        return [], 0
    fields, parsed = _parse_csv(path)
    if fields != SHIFT_COLUMNS:
        raise CalbenchError(
            f"{path} has columns {fields}, not calbench's shift columns; move it away or pick another --out"
        )
    floats = SHIFT_COLUMNS[len(SHIFT_KEY) :]
    parsed = [(line, row, damage or _bad_number(row, ["seed", "severity"], floats)) for line, row, damage in parsed]
    seen: dict[tuple[str, ...], int] = {}  # a repeated key would count twice towards a run's 30 conditions
    for i, (line, row, damage) in enumerate(parsed):
        if not damage and conditions and (row["corruption"], int(row["severity"])) not in conditions:
            damage = f"no corruption {row['corruption']!r} at severity {row['severity']} is known"
        if not damage and not (damage := shift_damage(row)):
            first = seen.setdefault(tuple(str(row[k]) for k in SHIFT_KEY), line)
            damage = "" if first == line else f"repeats line {first}'s run, corruption and severity"
        parsed[i] = (line, row, damage)
    rows, damaged = _sound_rows(path, parsed, quiet, "so its run is computed again with --shift")
    for row in rows:
        row.update(seed=int(row["seed"]), severity=int(row["severity"]), **{k: float(row[k]) for k in floats})
    return rows, damaged


def read_shift(out: Path, conditions: Collection[tuple[str, int]] = ()) -> list[Row]:
    """Rows of ``out``/shift.csv with numbers parsed back ([] when there is none); damaged rows (and, given
    ``conditions``, the known (corruption, severity) pairs, rows of any other) are left out with a warning."""
    return _load_shift(Path(out) / "shift.csv", conditions=conditions)[0]


def read_shift_file(path: Path) -> list[Row]:
    """Rows of any shift file (a job's shard), quietly leaving damaged ones out; [] when there is none."""
    return _load_shift(path, quiet=True)[0] if path.is_file() else []


def put_shift(out: Path, rows: Sequence[Row]) -> None:
    """Merge shift rows into ``out``/shift.csv, replacing earlier rows of the same run, corruption and severity."""
    if rows:
        _merge(Path(out) / "shift.csv", rows, SHIFT_COLUMNS, SHIFT_KEY, _load_shift)


def _prediction_damage(probs: np.ndarray, shape: Optional[tuple[int, int]]) -> str:
    """Why loaded test probabilities cannot be a run's ("" when they can)."""
    if probs.dtype.kind != "f" or probs.ndim != 2 or probs.size == 0:
        return f"a {probs.dtype} array of shape {probs.shape}, not (items, classes) probabilities"
    if shape is not None and probs.shape != tuple(shape):
        return f"shape {probs.shape}, but the test split has {shape[0]} images of {shape[1]} classes"
    if not np.all(np.isfinite(probs)):
        return "probabilities that are not finite"
    return ""
