"""`tune --launcher local-processes|slurm --workers N`: N search workers as one job array, sharing
one study (PostgreSQL, or a journal file on the shared file system), then one job that writes
best_params.json, runs the final test and writes the report.

The study is created here before any job starts (a bad storage URL or a missing driver fails
at once, and workers never race to create it). A worker whose node dies mid-trial costs that
trial's time, not the study: on a database its trial goes stale and another worker runs it again
(:func:`~calbench.tune.study.search`); once every worker job has ended, any trial still running
(a journal file has no heartbeats) is failed and queued again, and the final job runs it, with
any trials still missing if every worker failed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from calbench.errors import SEED_MAX, CalbenchError
from calbench.jobs import JobOutcome, Launcher, run_jobs
from calbench.tune.run import TuneRequest, TuneRun, run_tune
from calbench.tune.storage import default_storage
from calbench.tune.study import SearchResult, open_study, prepare, requeue_orphans, search


@dataclass
class LaunchedTune(TuneRun):
    """A search run as jobs: :class:`TuneRun` plus the jobs that failed as jobs."""

    failed_jobs: list[JobOutcome] = field(default_factory=list)


def shared_storage(launcher: Launcher, storage: Optional[str], out: Path) -> str:
    """The study's storage for ``launcher``: as given, else SQLite in OUT (one machine) or a journal
    file in OUT (Slurm: SQLite's file locks are unreliable on the network file systems nodes share)."""
    if launcher.kind != "slurm":
        return storage or default_storage(out)
    if storage is None:
        return f"journal:{out / 'study.log'}"
    if storage.startswith("sqlite"):
        raise CalbenchError(
            "--launcher slurm: SQLite is unsafe on the network file systems nodes share; use --storage "
            "postgresql+psycopg://... or a journal file (the default: OUT/study.log)"
        )
    return storage


def search_job(request: TuneRequest, threads: Optional[int]) -> tuple[int, float]:
    """One worker job: trials until the study is complete; returns (trials run here, seconds)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    r = request
    result = search(r.config, r.trials, str(r.study), str(r.storage), r.context, r.heartbeat, r.sampler_seed)
    return result.ran, result.seconds


def final_job(request: TuneRequest) -> dict[str, Any]:
    """The last job: any trials still missing, then best_params.json, the final test and the report."""
    run = run_tune(replace(request, search_only=False))
    return {"ran": run.search.ran, "best_params": run.best_params, "rows": run.test_rows, "reports": run.reports}


def launch_tune(
    request: TuneRequest,
    launcher: Launcher,
    workers: int,
    threads: Optional[int] = None,
    log: Callable[[str], None] = lambda message: None,
) -> LaunchedTune:
    """:func:`~calbench.tune.run.run_tune` as ``workers`` jobs of ``launcher`` on one study (worker i
    samples with ``sampler_seed + i``), then one final job unless ``search_only``."""
    launcher.check()
    if not launcher.distributed:
        raise CalbenchError("--workers runs worker jobs: use --launcher local-processes or slurm")
    if workers < 1:
        raise CalbenchError(f"--workers must be at least 1, got {workers}")
    r = request.home()
    out = Path(str(r.out)).resolve()
    storage = shared_storage(launcher, r.storage, out)
    started = time.perf_counter()
    prepare(r.config, r.trials, str(r.study), storage, r.heartbeat, r.sampler_seed)  # checked and created once, here
    context = replace(r.context, cache_dir=r.context.cache_root.resolve(), progress=False)
    job = replace(r, out=out, storage=storage, context=context)
    if threads is None and launcher.kind == "local-processes":  # one machine: each worker its share of the cores
        threads = max(1, (os.cpu_count() or 1) // workers)
    seeds = [None if r.sampler_seed is None else (r.sampler_seed + i) % (SEED_MAX + 1) for i in range(workers)]
    calls = [(replace(job, sampler_seed=seed), threads) for seed in seeds]
    outcomes = run_jobs(launcher, out / "jobs", "calbench-tune", search_job, calls, log)
    ran = sum(o.value[0] for o in outcomes if o.ok)
    failed = [o for o in outcomes if not o.ok]
    study = open_study(r.config, storage, str(r.study), r.heartbeat)
    requeue_orphans(study)  # every worker has ended: a trial still running lost its worker
    run = LaunchedTune(SearchResult(study, r.config, storage, ran, 0.0, r.trials), out)
    run.failed_jobs = failed
    if not r.search_only:
        final = run_jobs(launcher, out / "jobs", "calbench-tune-final", final_job, [(job,)], log)[0]
        if not final.ok:
            raise CalbenchError(f"the final job {final.job_id} failed: {final.error}; log: {final.log}")
        run.search.ran += final.value["ran"]
        run.best_params, run.test_rows, run.reports = (final.value[k] for k in ("best_params", "rows", "reports"))
    run.search.seconds = time.perf_counter() - started
    return run
