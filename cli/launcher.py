"""Options shared by the commands that can run as jobs (`compare`, `tune`): where the jobs run."""

from __future__ import annotations

from typing import Any, Optional

import typer
from rich.markup import escape

from calbench.cli.common import err_console

LauncherOpt = typer.Option(
    "local",
    "--launcher",
    help="local (this process), local-processes (submitit jobs on this machine) or slurm (a Slurm job array).",
)
PartitionOpt = typer.Option(None, "--slurm-partition", help="Slurm partition of the jobs (default: the cluster's).")
GpusOpt = typer.Option(None, "--slurm-gpus", help="GPUs per job.")
TimeOpt = typer.Option(None, "--slurm-time", help="Minutes per job (default: the partition's limit).")
CpusOpt = typer.Option(None, "--slurm-cpus", help="CPU cores per job.")
ParallelismOpt = typer.Option(None, "--array-parallelism", help="Jobs of the array running at once (Slurm's %N).")


def make_launcher(
    kind: str,
    partition: Optional[str],
    gpus: Optional[int],
    minutes: Optional[int],
    cpus: Optional[int],
    parallelism: Optional[int],
) -> Any:
    """The library's :class:`~calbench.jobs.Launcher`, checked (a wrong combination is one line)."""
    from calbench.jobs import Launcher

    launcher = Launcher(kind, partition, gpus, minutes, parallelism, cpus)
    launcher.check()
    return launcher


def compare_as_jobs(launcher: Any, *args: Any) -> Any:
    """`compare` as one job per (model, dataset) pair, each writing its own results shard; failed jobs
    are printed with their id and log."""
    from calbench.launch import describe_failure, run_compare_launched

    result = run_compare_launched(launcher, *args)
    print_failed_jobs([describe_failure(row) for row in result.failed_jobs])
    if result.failed_jobs and not result.rows:
        from calbench.errors import CalbenchError

        raise CalbenchError(f"all {len(result.failed_jobs)} job(s) failed; their logs are listed above")
    return result


def print_failed_jobs(lines: list[str]) -> None:
    for line in lines:
        err_console.print(f"[red]failed job:[/] {escape(line)}", highlight=False, soft_wrap=True)
