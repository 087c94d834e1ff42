"""Where the jobs of a grid or a search run: this process, local processes, or a Slurm job array,
through submitit (the ``calbench[slurm]`` extra), not a scheduler of calbench's own.

``local-processes`` runs the very code path of ``slurm`` (pickled calls, one process per job,
results and logs in the job folder) on this machine with submitit's local executor, which is
how the tests exercise it. A job that fails as a job (an exception, a node that died, a time
limit) is reported with its job id and log file; the other jobs go on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from calbench.errors import CalbenchError

LAUNCHERS = ("local", "local-processes", "slurm")
#: minutes a local-processes job may run before submitit stops it (its own default is 2, too short
#: for any grid); calbench's choice: a week, i.e. no limit in practice
LOCAL_TIME_MIN = 7 * 24 * 60
NO_SLURM = (
    "--launcher slurm needs Slurm (srun and sbatch on PATH): run on a Slurm login node, "
    "or use --launcher local-processes on this machine"
)


@dataclass(frozen=True)
class Launcher:
    """How jobs are launched; ``None`` leaves a Slurm setting to the cluster's defaults."""

    kind: str = "local"
    partition: Optional[str] = None
    gpus: Optional[int] = None  # GPUs per job
    time: Optional[int] = None  # minutes per job
    array_parallelism: Optional[int] = None  # jobs of one array running at once
    cpus: Optional[int] = None  # CPU cores per job

    def check(self) -> None:
        """Reject options the launcher cannot use, naming them, before any job is submitted."""
        if self.kind not in LAUNCHERS:
            raise CalbenchError(f"--launcher {self.kind!r}: choose one of {', '.join(LAUNCHERS)}")
        given = {
            "--slurm-partition": self.partition,
            "--array-parallelism": self.array_parallelism,
            "--slurm-gpus": self.gpus,
            "--slurm-time": self.time,
            "--slurm-cpus": self.cpus,
        }
        allowed = {"slurm": tuple(given), "local-processes": ("--slurm-gpus", "--slurm-time", "--slurm-cpus")}.get(
            self.kind, ()
        )
        wrong = [option for option, value in given.items() if value is not None and option not in allowed]
        if wrong:
            raise CalbenchError(f"{', '.join(wrong)} only apply with --launcher slurm; got --launcher {self.kind}")
        for option, value, least in (
            ("--slurm-gpus", self.gpus, 0),
            ("--slurm-time", self.time, 1),
            ("--array-parallelism", self.array_parallelism, 1),
            ("--slurm-cpus", self.cpus, 1),
        ):
            if value is not None and value < least:
                raise CalbenchError(f"{option} must be at least {least}, got {value}")

    @property
    def distributed(self) -> bool:
        return self.kind != "local"


@dataclass
class JobOutcome:
    """One job: its id (Slurm: ``<array id>_<task>``; local: a process id), log, and value or error."""

    index: int
    job_id: str
    log: str
    value: Any = None
    error: str = ""  # why it failed; "" when it finished
    state: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def executor(launcher: Launcher, folder: Path, name: str) -> Any:
    """A submitit executor for ``launcher`` writing job files and logs (``<job id>_<task>_log.err``) in ``folder``."""
    try:
        import submitit
    except ImportError:
        raise CalbenchError(f"--launcher {launcher.kind} needs submitit: pip install 'calbench[slurm]'") from None
    slurm = launcher.kind == "slurm"
    try:
        chosen = submitit.AutoExecutor(folder=Path(folder), cluster="slurm" if slurm else "local")
    except RuntimeError:  # submitit: 'Could not detect "srun"'
        raise CalbenchError(NO_SLURM) from None
    parameters = {
        "name": name,
        "timeout_min": launcher.time if launcher.time is not None or slurm else LOCAL_TIME_MIN,
        "gpus_per_node": launcher.gpus,
        "cpus_per_task": launcher.cpus,
        "slurm_partition": launcher.partition,
        "slurm_array_parallelism": launcher.array_parallelism,
    }
    chosen.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
    return chosen


def run_jobs(
    launcher: Launcher,
    folder: Path,
    name: str,
    fn: Callable[..., Any],
    calls: Sequence[tuple[Any, ...]],
    log: Callable[[str], None] = lambda message: None,
) -> list[JobOutcome]:
    """Run ``fn(*call)`` for every call as one job array and wait for all; failures are outcomes, not errors.

    The ``local`` launcher is the in-process executor: each call runs here, in order, and its error is
    raised (a data problem or a full disk stops the run with one line, as it would without jobs)."""
    if not calls:
        return []
    if not launcher.distributed:
        return [JobOutcome(index, f"local-{index}", "", value=fn(*call)) for index, call in enumerate(calls)]
    chosen = executor(launcher, folder, name)
    try:
        jobs = chosen.map_array(fn, *zip(*calls))
    except FileNotFoundError:  # no sbatch on PATH
        raise CalbenchError(NO_SLURM) from None
    log(f"submitted {len(jobs)} {launcher.kind} job(s) ({jobs[0].job_id} ...); logs under {folder}")
    outcomes = []
    for index, job in enumerate(jobs):
        log_file = str(job.paths.stderr)
        try:
            outcomes.append(JobOutcome(index, job.job_id, log_file, value=job.result()))
        except Exception as exc:  # noqa: BLE001 - the job failed (or its node did): report it, wait for the rest
            outcomes.append(JobOutcome(index, job.job_id, log_file, error=failure_reason(exc), state=str(job.state)))
    return outcomes


def failure_reason(exc: BaseException) -> str:
    """One line for a failed job: the last line of the job's traceback (the exception it died of);
    for a job that left no result (node failure, time limit, out-of-memory kill), its state and the
    last line of its error log."""
    text = str(exc)
    parts = re.split(r"\n-{5,}\n", text)
    no_result = re.search(r"has not produced any output \(state: ([^)]*)\)", text)
    if no_result:
        log = [line.strip() for line in "".join(parts[1:]).splitlines() if line.strip()]
        return f"ended without a result (state: {no_result[1].strip() or 'unknown'})" + (f": {log[-1]}" if log else "")
    if len(parts) >= 3:  # "failed during processing with trace:" ---- traceback ---- where the logs are
        lines = [line.strip() for line in parts[1].splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return (text.splitlines() or [type(exc).__name__])[0]
