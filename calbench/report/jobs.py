"""The report's list of jobs that failed as jobs (a grid run with ``--launcher slurm`` or
``local-processes``): which pair, the job id to look up in Slurm, and the log to read."""

from __future__ import annotations

from pathlib import Path

from calbench.report.blocks import Block, Heading, Table, Text
from calbench.results import read_failed_jobs


def failed_jobs_blocks(results_dir: Path) -> list[Block]:
    """A table of the failed jobs in ``results_dir``/failed_jobs.csv (nothing when none failed)."""
    rows = read_failed_jobs(results_dir)
    if not rows:
        return []
    return [
        Heading("Failed jobs"),
        Text(
            "These jobs ended without finishing their pair (an error, a node failure, a time limit): their "
            "runs are missing above. Read the log, then run the same command again: finished runs are reused."
        ),
        Table(
            ["model", "dataset", "job id", "state", "error", "log"],
            [[r["model"], r["dataset"], r["job_id"], r["state"], r["error"], r["log"]] for r in rows],
        ),
    ]
