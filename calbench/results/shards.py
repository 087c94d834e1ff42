"""Results shards: how the jobs of a grid on many nodes share one results folder without a lock.

File locks are unreliable on the network file systems clusters share, so a job of
``compare --launcher slurm`` (one (model, dataset) pair) never writes ``results.csv``: it reads
the folder's results (``results.csv`` and every shard, so a grid resumes from any node) and
writes its rows only to its own shard, ``shards/<pair>.csv`` (and its settings to
``shards/<pair>.settings.json``), each replaced atomically; no other job writes them. Its test
predictions go to ``predictions/`` under names unique to each run, as in a single process.

:func:`merge_shards` folds the shards into ``results.csv`` (de-duplicated by run key, a shard's
row replacing an older one) and removes them; ``compare`` and ``report`` call it, so it runs in
one process at a time, on the node where the grid was submitted or resumed. A shard is renamed
before it is read, so rows a job writes while a merge runs land in a new shard, never in a deleted one.

Jobs that failed as jobs (a node died, a time limit, an out-of-memory kill) are listed in
``failed_jobs.csv`` with their job id and log, which the report shows until the pair runs again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from calbench.atomic import write_csv_atomic, write_text_atomic
from calbench.errors import CalbenchError, naming, warn
from calbench.results.store import (
    RESULT_COLUMNS,
    SHIFT_COLUMNS,
    SHIFT_KEY,
    ResultsStore,
    Row,
    put_shift,
    read_results,
    read_settings,
    read_shift,
    read_shift_file,
)

SHARDS = "shards"
FAILED_JOBS = "failed_jobs.csv"
FAILED_JOB_COLUMNS = ["model", "dataset", "job_id", "state", "log", "error"]
#: a merge's claim on a shard: ".<shard name>.merging-<pid>-<ns>", picked up again if that merge died
_CLAIMED = re.compile(r"^\.(?P<name>.+\.csv)\.merging-\d+-\d+$")


def shard_name(model: str, dataset: str) -> str:
    """File stem of a pair's shard: ``model__dataset``, made safe for a file name (a dataset given as a
    folder path gets a short hash of the path, so two folders with one name stay apart)."""
    raw = f"{model}__{dataset}"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._") or "pair"
    return safe if safe == raw else f"{safe}-{hashlib.sha256(raw.encode()).hexdigest()[:8]}"


def shard_path(out: Path, model: str, dataset: str) -> Path:
    return Path(out) / SHARDS / f"{shard_name(model, dataset)}.csv"


def _settings_path(shard: Path) -> Path:
    return shard.with_name(f"{shard.stem}.settings.json")


def _by_key(rows: Iterable[Row]) -> dict[tuple[str, ...], Row]:
    """Rows by run key; a later row replaces an earlier one with the same key."""
    return {ResultsStore.key(row): row for row in rows}


class ShardStore(ResultsStore):
    """One job's view of a results folder: every row logged so far (``results.csv``, then every
    shard), written to the job's own shard only. It takes no lock and never writes ``results.csv``."""

    def __init__(self, out: Path, model: str, dataset: str) -> None:  # not ResultsStore's: that one locks
        self.out = Path(out)
        self.path = shard_path(self.out, model, dataset)
        with naming(self.path.parent):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        logged = read_results(self.out / "results.csv")
        for shard in sorted((self.out / SHARDS).glob("*.csv")):
            logged += _shard_rows(read_results, shard)
        self.rows = list(_by_key(logged).values())
        self._damaged: set[Path] = set()

    def put_rows(self, rows: Sequence[Row]) -> None:
        """Add or replace ``rows`` (by run key) in this job's shard, atomically."""
        new = _by_key(rows)
        own = [row for row in _shard_rows(read_results, self.path) if self.key(row) not in new] + list(new.values())
        with naming(self.path):  # rows written again move to the end, as in results.csv
            write_csv_atomic(own, self.path, RESULT_COLUMNS)
        self.rows = [row for row in self.rows if self.key(row) not in new] + list(new.values())

    def put_shift(self, rows: Sequence[Row]) -> None:
        """This job's calibration-under-shift rows, into its own shift shard (``shards/shift/<pair>.csv``)."""
        if not rows:
            return
        path = _shift_path(self.path)
        new = {_shift_key(r): r for r in rows}
        own = [r for r in _shard_rows(read_shift_file, path) if _shift_key(r) not in new] + list(new.values())
        with naming(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_csv_atomic(own, path, SHIFT_COLUMNS)

    def shift_rows(self) -> list[Row]:
        """Every shift row logged so far: shift.csv, then every job's shift shard."""
        rows = read_shift(self.out)
        for shard in sorted((self.out / SHARDS / "shift").glob("*.csv")):
            rows += _shard_rows(read_shift_file, shard)
        return list({_shift_key(r): r for r in rows}.values())

    def put_settings(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """This job's settings records (config -> settings), into its own settings shard."""
        path = _settings_path(self.path)
        merged = {**_read_json(path), **{str(k): dict(v) for k, v in records.items()}}
        with naming(path):
            write_text_atomic(path, json.dumps(merged, indent=1, sort_keys=True, default=str))


def _shift_path(shard: Path) -> Path:
    return shard.parent / "shift" / shard.name


def _condition(row: Mapping[str, Any]) -> tuple[str, int]:
    return str(row["corruption"]), int(row["severity"])


def _shift_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(row[k]) for k in SHIFT_KEY)


def _merge_shift_shards(out: Path) -> None:
    """Fold every job's shift shard into shift.csv (claimed by renaming first, as results shards are)."""
    for shard in sorted((Path(out) / SHARDS / "shift").glob("*.csv")):
        claimed = shard.with_name(f".{shard.name}.merging-{os.getpid()}-{time.time_ns()}")
        try:
            shard.replace(claimed)
        except FileNotFoundError:  # another merge took it
            continue
        put_shift(out, _shard_rows(read_shift_file, claimed, shard))
        claimed.unlink(missing_ok=True)


def _shard_rows(read: Callable[[Path], list[Row]], path: Path, shard: Optional[Path] = None) -> list[Row]:
    """The rows of shard file ``path`` (``shard``: the shard it was claimed from, when renamed for a merge).
    A file that is not a results file at all (garbage, another header) is moved aside as
    ``<shard>.damaged`` with a warning and gives no rows, so its pair is computed again instead of
    every later `compare` and `report` on the folder stopping at it."""
    shard = shard or path
    try:
        return read(path)
    except CalbenchError:  # its message would name the merge's hidden claim, not the shard
        aside = shard.with_name(f"{shard.name}.damaged")
        try:
            path.replace(aside)
        except FileNotFoundError:  # another process moved it meanwhile
            return []
        warn(
            f"results shard {shard} is not a calbench results file; moved it aside as {aside}, its runs are computed again"
        )
        return []


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        warn(f"{path} is unreadable ({exc}); its settings are left out of the report")
        return {}
    return data if isinstance(data, dict) else {}


def claim_shard(shard: Path) -> Path:
    """Rename a shard (and its settings) to a merge's own name; FileNotFoundError if another took it."""
    claimed = shard.with_name(f".{shard.name}.merging-{os.getpid()}-{time.time_ns()}")
    settings = _settings_path(shard)
    shard.replace(claimed)
    if settings.is_file():
        try:
            settings.replace(claimed.with_name(claimed.name + ".settings.json"))
        except FileNotFoundError:
            pass
    return claimed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # claimed by another merge meanwhile
        return 0.0


def merge_shards(out: Path, order: Sequence[Path] = ()) -> int:
    """Fold every shard of ``out`` into results.csv and settings.json, then remove them; returns the rows merged.

    Shards named in ``order`` go first, in that order (a launcher passes its grid's pairs, so
    results.csv lists pairs as one process would), then the rest, oldest first.
    """
    folder = Path(out) / SHARDS
    if not folder.is_dir():
        return 0
    _merge_shift_shards(out)
    ranked = {Path(p).name: i for i, p in enumerate(order)}
    shards = sorted(folder.glob("*.csv"), key=lambda p: (ranked.get(p.name, len(ranked)), _mtime(p), p.name))
    claimed = []
    for shard in shards:
        try:
            claimed.append(claim_shard(shard))
        except FileNotFoundError:  # another merge took it
            continue
    claimed += sorted(p for p in folder.iterdir() if _CLAIMED.match(p.name) and p not in claimed)
    if not claimed:
        return 0
    rows: list[Row] = []
    settings: dict[str, Any] = {}
    for path in claimed:
        rows += _shard_rows(read_results, path, folder / _CLAIMED.match(path.name)["name"])  # type: ignore[index]
        settings.update(_read_json(path.with_name(path.name + ".settings.json")))
    store = ResultsStore(Path(out))
    if rows:
        store.put_rows(list(_by_key(rows).values()))
    if settings:
        store.put_settings(settings)
    for path in claimed:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".settings.json").unlink(missing_ok=True)
    return len(rows)


def _shards(out: Path) -> list[Path]:
    """The shards of ``out`` in the order a merge without a grid order takes them: oldest first."""
    return sorted((Path(out) / SHARDS).glob("*.csv"), key=lambda p: (_mtime(p), p.name))


def logged_rows(out: Path) -> list[Row]:
    """Every row logged in ``out``: results.csv with every job's shard folded in, as a merge would (a
    run logged again replaces its row and moves to the end), but read only: reading never rewrites a
    results folder, so a report can be rendered while jobs still write their shards."""
    rows = read_results(Path(out) / "results.csv")
    for shard in _shards(out):
        new = _by_key(_readable(read_results, shard))
        rows = [row for row in rows if ResultsStore.key(row) not in new] + list(new.values())
    return rows


def _readable(read: Callable[[Path], list[Row]], shard: Path) -> list[Row]:
    """A shard's rows for a read-only view; one that is not a results file is left out with a warning
    (the next merge moves it aside, see :func:`_shard_rows`)."""
    try:
        return read(shard)
    except CalbenchError:
        warn(f"results shard {shard} is not a calbench results file; its runs are left out")
        return []


def logged_settings(out: Path) -> dict[str, Any]:
    """settings.json with every job's settings shard over it, read only (see :func:`logged_rows`)."""
    settings = read_settings(out)
    for shard in _shards(out):
        settings.update(_read_json(_settings_path(shard)))
    return settings


def logged_shift(out: Path, conditions: Collection[tuple[str, int]] = ()) -> list[Row]:
    """shift.csv with every job's shift shard folded in, read only (see :func:`logged_rows`); given
    ``conditions``, rows of an unknown (corruption, severity) are left out with a warning."""
    rows = read_shift(out, conditions)
    for shard in sorted((Path(out) / SHARDS / "shift").glob("*.csv")):
        rows += [r for r in _readable(read_shift_file, shard) if not conditions or _condition(r) in conditions]
    return list({_shift_key(r): r for r in rows}.values())


def read_failed_jobs(out: Path) -> list[Row]:
    """``failed_jobs.csv`` of a results folder: one row per pair whose last job failed as a job."""
    path = Path(out) / FAILED_JOBS
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    for row in reader:
        if None in row or None in row.values() or not row.get("model"):
            warn(f"{path} line {reader.line_num} is damaged (not one cell per column); left out of the failed jobs")
            continue
        rows.append(row)
    return rows


def record_jobs(out: Path, ran: Sequence[tuple[str, str]], failed: Sequence[Row]) -> Path:
    """Update failed_jobs.csv after a launch: pairs in ``ran`` lose their old entry, ``failed`` are added."""
    path = Path(out) / FAILED_JOBS
    done = {tuple(pair) for pair in ran}
    kept = [row for row in read_failed_jobs(out) if (row["model"], row["dataset"]) not in done]
    rows = kept + [dict(row) for row in failed]
    if rows or path.is_file():
        with naming(path):
            write_csv_atomic(rows, path, FAILED_JOB_COLUMNS)
    return path
