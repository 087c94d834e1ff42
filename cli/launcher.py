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
    launcher: str,
    slurm_partition: Optional[str],
    slurm_gpus: Optional[int],
    slurm_time: Optional[int],
    slurm_cpus: Optional[int],
    array_parallelism: Optional[int],
) -> Any:
    """The library's :class:`~calbench.jobs.Launcher` from the launcher options, checked (a wrong
    combination is one line)."""
    from calbench.jobs import Launcher

    chosen = Launcher(
        launcher,
        partition=slurm_partition,
        gpus=slurm_gpus,
        time=slurm_time,
        array_parallelism=array_parallelism,
        cpus=slurm_cpus,
    )
    chosen.check()
    return chosen


def print_failed_jobs(lines: list[str]) -> None:
    for line in lines:
        err_console.print(f"[red]failed job:[/] {escape(line)}", highlight=False, soft_wrap=True)
