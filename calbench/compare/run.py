"""`compare` on any launcher: one job per (model, dataset) pair, each writing its own results shard; the
shards are merged into ``results.csv`` when the jobs end.

A job is exactly one pair of the grid: the same sessions, cache, rows, predictions and reliability
diagrams on every launcher, logged to ``shards/<pair>.csv`` through a :class:`~calbench.results.ShardStore`.
The local launcher runs the jobs in this process, one after another, and lets their errors stop the
grid with one line; ``local-processes`` and ``slurm`` run them as submitit jobs and report a job that
fails as a job (with its id and log) in ``failed_jobs.csv``. So the merged folder holds the same rows
whichever launcher ran it, and a grid interrupted anywhere resumes from any node.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from calbench.cache import CacheStats
from calbench.compare.deferral_shift import deferral_plots
from calbench.compare.grid import CompareRequest, Grid
from calbench.compare.pair import compare_pair, dataset_identity
from calbench.compare.plots import reliability_plots
from calbench.errors import warn
from calbench.jobs import JobOutcome, Launcher, run_jobs
from calbench.results import Row, ShardStore, merge_shards, open_folder, record_jobs, shard_path
from calbench.session import RunContext, Session


@dataclass
class CompareResult:
    rows: list[Row]  # every row of the requested grid, computed now or earlier
    computed: int
    skipped_pairs: list[tuple[str, str, str]]  # (model, dataset, what is missing)
    stats: CacheStats  # image views encoded and read from the cache
    seconds: float
    out: Path
    plots: dict[str, Path] = field(default_factory=dict)
    failed_jobs: list[Row] = field(default_factory=list)  # jobs that failed as jobs (never with the local launcher)

    @property
    def failures(self) -> list[Row]:
        return [row for row in self.rows if row["status"] == "failed"]

    @property
    def degenerate(self) -> list[Row]:
        """Runs whose predictions collapsed to near-uniform (see :func:`~calbench.compare.pair.degenerate_reason`)."""
        return [row for row in self.rows if row["status"] == "degenerate"]


@dataclass
class PairRun:
    """What one pair's job hands back (small and picklable: its rows, counts and diagram paths)."""

    rows: list[Row]
    computed: int
    encoded: int
    loaded: int
    plots: dict[str, Path]


def run_pair(
    model: str, data: str, grid: Grid, context: RunContext, out: Path, log: Callable[[str], None] = lambda m: None
) -> PairRun:
    """One job: every (method, seed) of one pair, logged to the pair's shard, and its reliability diagrams."""
    session = Session(model, data, context)
    store = ShardStore(out, model, data)
    rows, computed = compare_pair(session, store, grid, log)
    labels = {(session.dataset.name, dataset_identity(session)): session.test_labels}
    plots = reliability_plots(store, rows, labels, grid.n_bins)
    plots.update(deferral_plots(store, rows, labels, grid.extras))
    return PairRun(rows, computed, session.cache.stats.encoded, session.cache.stats.loaded, plots)


def run_compare(
    request: CompareRequest = CompareRequest(),
    launcher: Launcher = Launcher(),
    log: Callable[[str], None] = lambda message: None,
    on_skip: Callable[[str, str, str], None] = lambda model, data, missing: None,
) -> CompareResult:
    """Fit every method for every seed of every pair, score on the test split, log to ``out``/results.csv
    and draw the diagrams, one ``launcher`` job per pair; returns when every job has ended.

    Rows already in results.csv with the same settings are reused unless ``grid.force``. Jobs that fail
    as jobs are listed in ``out``/failed_jobs.csv (job id and log), and in the report.
    """
    start = time.perf_counter()
    launcher.check()
    request.grid.check()
    pairs, skipped = request.plan()
    for m, d, missing in skipped:
        on_skip(m, d, missing)
    out = open_folder(Path(request.out))
    if launcher.distributed:  # jobs may start in another folder, on another node: every path absolute
        pairs = [(m, str(Path(d).resolve()) if Path(d).exists() else d) for m, d in pairs]
        out = out.resolve()
    merge_shards(out)  # an earlier run's shards: jobs then see one results.csv
    calls = [(m, d, request.grid, _job_context(request, launcher), out) for m, d in pairs]
    if not launcher.distributed:  # in this process: its progress shows as it goes
        calls = [(*call, log) for call in calls]
    outcomes = run_jobs(launcher, out / "jobs", "calbench-compare", run_pair, calls, log)
    merge_shards(out, [shard_path(out, m, d) for m, d in pairs])
    failed = [_failure(pairs[o.index], o) for o in outcomes if not o.ok]
    record_jobs(out, pairs, failed)
    done: list[PairRun] = [o.value for o in outcomes if o.ok]
    rows = [row for run in done for row in run.rows]
    for row in rows:
        if row["status"] == "degenerate":
            warn(
                f"{row['model']} · {row['dataset']} · {row['method']} (seed {row['seed']}) is degenerate: {row['error']}"
            )
    stats = CacheStats(sum(r.encoded for r in done), sum(r.loaded for r in done))
    plots = {name: path for run in done for name, path in run.plots.items()}
    computed = sum(r.computed for r in done)
    return CompareResult(rows, computed, skipped, stats, time.perf_counter() - start, out, plots, failed)


def _job_context(request: CompareRequest, launcher: Launcher) -> RunContext:
    """The run context as a job sees it: ``--weights`` only for a one-model grid; for a job outside this
    process, absolute paths (it may start elsewhere) and no progress bars."""
    context = request.context
    context = replace(context, weights=context.weights if request.one_model else None)
    if not launcher.distributed:
        return context
    return replace(
        context,
        cache_dir=context.cache_root.resolve(),
        data_root=None if context.data_root is None else Path(context.data_root).resolve(),
        weights=None if context.weights is None else Path(context.weights).resolve(),
        progress=False,
    )


def _failure(pair: tuple[str, str], outcome: JobOutcome) -> Row:
    return {
        "model": pair[0],
        "dataset": pair[1],
        "job_id": outcome.job_id,
        "state": outcome.state,
        "log": outcome.log,
        "error": outcome.error,
    }


def describe_failure(row: Any) -> str:
    """One line for a failed job, as the CLI prints it."""
    return f"job {row['job_id']} ({row['model']} · {row['dataset']}) failed: {row['error']}; log: {row['log']}"
