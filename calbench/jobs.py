"""Where the jobs of a grid or a search run: this process, local processes, or a Slurm job array,
through submitit (the ``calbench[slurm]`` extra), not a scheduler of calbench's own.

``local-processes`` runs the very code path of ``slurm`` (pickled calls, one process per job,
results and logs in the job folder) on this machine with submitit's local executor, which is
how the tests exercise it (and a single-node Slurm started by the tests runs ``slurm`` itself). A
job that fails as a job (an exception, a node that died, a time limit, ``scancel``) is reported
with its job id and log file; the other jobs go on.

A job does not depend on the shell it was submitted from: submitit runs it with the absolute path
of this Python (the virtual environment, activated or not), and the variables calbench and the
Hugging Face libraries read (:data:`JOB_ENVIRONMENT`) are exported in the batch script itself and
passed on by ``srun --export=ALL``, so a site's ``--export=NONE`` default does not drop them.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from calbench.errors import CalbenchError, warn

LAUNCHERS = ("local", "local-processes", "slurm")
#: minutes a local-processes job may run before submitit stops it (its own default is 2, too short
#: for any grid); calbench's choice: a week, i.e. no limit in practice
LOCAL_TIME_MIN = 7 * 24 * 60
NO_SLURM = (
    "--launcher slurm needs Slurm (srun and sbatch on PATH): run on a Slurm login node, "
    "or use --launcher local-processes on this machine"
)
#: what a job needs from the submitting environment, exported explicitly in its batch script
#: (calbench: paths and offline switches; never credentials such as HF_TOKEN, as job files are plain text)
JOB_ENVIRONMENT = (
    "CALBENCH_CACHE",
    "CALBENCH_DATA",
    "CALBENCH_WEIGHTS",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)
_PATHS = {"CALBENCH_CACHE", "CALBENCH_DATA", "CALBENCH_WEIGHTS", "HF_HOME", "HF_HUB_CACHE"}


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
    if slurm:
        parameters.update(slurm_setup=job_environment(), slurm_srun_args=["--export=ALL"])
    chosen.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
    return chosen


def job_environment(environ: Optional[dict[str, str]] = None) -> list[str]:
    """Batch-script lines exporting the :data:`JOB_ENVIRONMENT` variables set here (paths made absolute:
    a job may start in another folder)."""
    environ = os.environ if environ is None else environ
    lines = []
    for name in JOB_ENVIRONMENT:
        if environ.get(name):
            value = os.path.abspath(environ[name]) if name in _PATHS else environ[name]
            lines.append(f"export {name}={shlex.quote(value)}")
    return lines


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
    if launcher.kind == "slurm":
        states = slurm_states()
        for job in jobs:
            job.watcher = states
    log(f"submitted {len(jobs)} {launcher.kind} job(s) ({jobs[0].job_id} ...); logs under {folder}")
    outcomes = []
    for index, job in enumerate(jobs):
        log_file = str(job.paths.stderr)
        try:
            outcomes.append(JobOutcome(index, job.job_id, log_file, value=job.result()))
        except Exception as exc:  # noqa: BLE001 - the job failed (or its node did): report it, wait for the rest
            reason = failure_reason(exc, launcher.time)
            outcomes.append(JobOutcome(index, job.job_id, log_file, error=reason, state=str(job.state)))
    return outcomes


def failure_reason(exc: BaseException, minutes: Optional[int] = None) -> str:
    """One line for a failed job: the last line of the job's traceback (the exception it died of);
    for a job that left no result (node failure, time limit, out-of-memory kill, scancel), its state
    and the last line of its error log. ``minutes``: the jobs' time limit, named when one timed out."""
    text = str(exc)
    parts = re.split(r"\n-{5,}\n", text)
    no_result = re.search(r"has not produced any output \(state: ([^)]*)\)", text)
    state = no_result[1].strip() if no_result else ""
    if state.startswith("TIMEOUT") or TIMED_OUT in text:  # killed by Slurm, or ended by submitit just before
        limit = "the partition's limit" if minutes is None else f"{minutes} min"
        return f"timed out: the job ran into its time limit ({limit}); give it more with --slurm-time"
    if no_result:
        log = [line.strip() for line in "".join(parts[1:]).splitlines() if line.strip()]
        return f"ended without a result (state: {state or 'unknown'})" + (f": {log[-1]}" if log else "")
    if len(parts) >= 3:  # "failed during processing with trace:" ---- traceback ---- where the logs are
        lines = [line.strip() for line in parts[1].splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return (text.splitlines() or [type(exc).__name__])[0]


#: how submitit ends a job that Slurm warned of its time limit (SIGUSR2 90 s before) and cannot checkpoint
TIMED_OUT = "timed-out and not checkpointable"
#: the state of a job squeue no longer lists (Slurm forgets a job MinJobAge, 300 s by default, after it ends)
GONE = "ENDED"
_STATES: list[Any] = []  # this process's one job-state poller, as submitit keeps one for all Slurm jobs
#: most seconds between two polls of the jobs' states (submitit's: 600); calbench: well inside Slurm's
#: MinJobAge (300 s by default), after which squeue no longer knows a job
POLL_SECONDS = 60


def slurm_states() -> Any:
    """The poller calbench's Slurm jobs use: submitit's (sacct), or squeue where sacct fails."""
    if not _STATES:
        _STATES.append(_squeue_watcher()(delay_s=POLL_SECONDS))
    return _STATES[0]


def squeue_states(output: str) -> dict[str, dict[str, str]]:
    """``squeue --array --format=%i|%T|%N`` lines as submitit's job info: {job id: {"State", "NodeList"}}."""
    states = {}
    for line in output.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3 and fields[0]:
            states[fields[0]] = {"JobID": fields[0], "State": fields[1], "NodeList": fields[2]}
    return states


def _squeue_watcher() -> type:
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SqueueWatcher(SlurmInfoWatcher):  # type: ignore[misc]
        """submitit's job-state poller, reading squeue when sacct fails (a cluster without job
        accounting), where submitit would warn on every poll and never see a job that ended
        without a result (scancel, time limit, node failure) as ended."""

        accounting: Optional[bool] = None  # whether sacct works here; None until the first poll

        def update(self) -> None:
            command = self._make_command()
            if command is None:
                return
            if self.accounting is None:
                self.accounting = _accounting(command)
            if self.accounting:
                super().update()
                return
            self._num_calls += 1
            unfinished = self._registered - self._finished
            arrays = sorted({job.split("_")[0] for job in unfinished})
            squeue = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%N"]
            try:
                done = subprocess.run([*squeue, f"--jobs={','.join(arrays)}"], capture_output=True, text=True)
            except OSError:  # no squeue here: the states stay as they were, the result files still tell
                done = subprocess.CompletedProcess(squeue, 1, "", "")
            if done.returncode == 0 or "Invalid job id" in done.stderr:  # else slurmctld is busy: ask again later
                known = squeue_states(done.stdout)
                for job in unfinished:
                    self._info_dict[job] = known.get(job, {"JobID": job, "State": GONE, "NodeList": ""})
            self._last_status_check = time.time()
            for job in unfinished:
                if self.is_done(job, mode="cache"):
                    self._finished.add(job)

    return SqueueWatcher


def _accounting(sacct: list[str]) -> bool:
    """Whether ``sacct`` works on this cluster; where it does not, say once what that means."""
    try:
        done = subprocess.run(sacct, capture_output=True, text=True)
    except OSError as exc:
        reason = str(exc)
    else:
        if done.returncode == 0:
            return True
        reason = (done.stderr.strip() or f"exit status {done.returncode}").splitlines()[-1]
    warn(
        f"this Slurm cluster keeps no job accounting (sacct: {reason}), so job states cannot come from "
        "sacct; calbench follows its jobs with squeue instead, and still reports jobs that end without a result"
    )
    return False
