"""`compare` on a launcher: one job per (model, dataset) pair, as one Slurm job array (or local
processes), each writing its own results shard; this process merges the shards when the jobs end.

A job is exactly one pair of :func:`~calbench.compare.run_compare`: the same sessions, cache,
rows, predictions and reliability diagrams, only logged to ``shards/<pair>.csv`` through a
:class:`~calbench.shards.ShardStore` instead of ``results.csv``. So the merged folder holds the
rows a single process would have written, and a grid interrupted anywhere resumes from any node.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from calbench.cache import CacheStats
from calbench.compare import CompareResult, Grid, compare_pair, dataset_identity, plan_grid, reliability_plots
from calbench.errors import warn
from calbench.jobs import JobOutcome, Launcher, run_jobs
from calbench.results import Row, open_folder
from calbench.scoring import deferral_plots
from calbench.session import RunContext, Session
from calbench.shards import ShardStore, merge_shards, record_jobs, shard_path


@dataclass
class PairRun:
    """What one pair's job hands back (small and picklable: its rows, counts and diagram paths)."""

    rows: list[Row]
    computed: int
    encoded: int
    loaded: int
    plots: dict[str, Path]


@dataclass
class LaunchedCompare(CompareResult):
    """A grid run as jobs: :class:`CompareResult` plus the jobs that failed as jobs."""

    failed_jobs: list[Row] = field(default_factory=list)


def run_pair(model: str, data: str, grid: Grid, context: RunContext, out: Path) -> PairRun:
    """One job: every (method, seed) of one pair, logged to the pair's shard, and its reliability diagrams."""
    session = Session(model, data, context)
    store = ShardStore(out, model, data)
    rows, computed = compare_pair(session, store, grid)
    labels = {(session.dataset.name, dataset_identity(session)): session.test_labels}
    plots = reliability_plots(store, rows, labels, grid.n_bins)  # the figures run_compare draws after its pairs
    plots.update(deferral_plots(store, rows, labels, grid.extras))
    return PairRun(rows, computed, session.cache.stats.encoded, session.cache.stats.loaded, plots)


def run_compare_launched(
    launcher: Launcher,
    model: str = "tiny",
    data: str = "synthetic",
    grid: Grid = Grid(),
    context: RunContext = RunContext(),
    out: Path = Path("results"),
    all_pairs: bool = False,
    log: Callable[[str], None] = lambda message: None,
    on_skip: Callable[[str, str, str], None] = lambda model, data, missing: None,
    pairs: Optional[Sequence[tuple[str, str]]] = None,
) -> LaunchedCompare:
    """:func:`~calbench.compare.run_compare` with one ``launcher`` job per pair; returns when every job has ended.

    ``pairs`` (any (model, dataset name or folder) pairs) replaces ``model``/``data``/``all_pairs``.
    Jobs that fail as jobs are listed in ``out``/failed_jobs.csv (job id and log), and in the report.
    """
    start = time.perf_counter()
    launcher.check()
    grid.check()
    if pairs is None:
        pairs, skipped = plan_grid(all_pairs, model, data, context.data_root)
    else:
        pairs, skipped, all_pairs = list(pairs), [], len({m for m, _ in pairs}) > 1  # --weights: one model
    for m, d, missing in skipped:
        on_skip(m, d, missing)
    # jobs may start in another folder, on another node: every path absolute
    pairs = [(m, str(Path(d).resolve()) if Path(d).exists() else d) for m, d in pairs]
    out = open_folder(Path(out)).resolve()
    merge_shards(out)  # an earlier run's shards: jobs then see one results.csv
    job_context = replace(
        context,
        cache_dir=context.cache_root.resolve(),
        data_root=None if context.data_root is None else Path(context.data_root).resolve(),
        weights=None if all_pairs or context.weights is None else Path(context.weights).resolve(),
        progress=False,
    )
    calls = [(m, d, grid, job_context, out) for m, d in pairs]
    outcomes = run_jobs(launcher, out / "jobs", "calbench-compare", run_pair, calls, log)
    merge_shards(out, [shard_path(out, m, d) for m, d in pairs])
    failed = [_failure(pairs[o.index], o) for o in outcomes if not o.ok]
    record_jobs(out, pairs, failed)
    done = [o.value for o in outcomes if o.ok]
    rows = [row for run in done for row in run.rows]
    for row in rows:
        if row["status"] == "degenerate":
            warn(
                f"{row['model']} · {row['dataset']} · {row['method']} (seed {row['seed']}) is degenerate: {row['error']}"
            )
    stats = CacheStats(sum(r.encoded for r in done), sum(r.loaded for r in done))
    plots = {name: path for run in done for name, path in run.plots.items()}
    computed = sum(r.computed for r in done)
    seconds = time.perf_counter() - start
    return LaunchedCompare(rows, computed, skipped, stats, seconds, out, plots, failed_jobs=failed)


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
