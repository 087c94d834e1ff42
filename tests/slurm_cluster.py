"""A throwaway single-node Slurm cluster for tests: the distribution's munged, slurmctld and
slurmd (Debian's ``slurm-wlm`` and ``munge``), with the munge key and socket, state, spool, pid
and log files in a temporary folder, TCP ports picked free, and the setup a small cluster uses:
one node named after ``hostname -s`` with all its CPUs, one default partition, no cgroups
(``proctrack/linuxproc``, ``task/none``) and no job accounting (so ``sacct`` fails, as there).

The daemons run as root (slurmd must, to start jobs as their user); clients find the cluster
through ``SLURM_CONF``, which :meth:`SlurmCluster.__enter__` sets for this process and its children.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

#: set by .ci/run after it installed Slurm: a cluster that cannot start fails the tests there
REQUIRED = "CALBENCH_REQUIRE_SLURM"
PARTITION = "debug"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "sinfo")
#: seconds between scancel's SIGTERM and SIGKILL (Slurm's default: 30); short, so killed jobs end quickly
KILL_WAIT = 2


class Unavailable(Exception):
    """Why no cluster can run here (a test skips with this reason, or fails under CI)."""


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (f"{d}/{name}" for d in ("/usr/sbin", "/sbin") if os.path.isfile(f"{d}/{name}")), None
    )
    if found is None:
        raise Unavailable(f"{name} is not installed: install the distribution's slurm-wlm and munge (.ci/run does)")
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config(home: Path, node: str, cpus: int) -> str:
    ports = _free_port(), _free_port()
    return f"""\
ClusterName=calbench
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={home}/munge/socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={home}/state
SlurmdSpoolDir={home}/spool
SlurmctldPidFile={home}/slurmctld.pid
SlurmdPidFile={home}/slurmd.pid
SlurmctldLogFile={home}/slurmctld.log
SlurmdLogFile={home}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
KillWait={KILL_WAIT}
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """``with SlurmCluster() as cluster:`` sbatch, srun, squeue and scancel talk to a fresh cluster."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("slurmd must run as root to start jobs, and these tests do not run as root")
        self.bins = {name: _binary(name) for name in (*DAEMONS, *CLIENTS)}
        self.home: Optional[Path] = None
        self.node = socket.gethostname().split(".")[0]  # what `hostname -s` prints: slurmd finds its node by it
        self._saved_conf: Optional[str] = None

    def __enter__(self) -> SlurmCluster:
        self.home = Path(tempfile.mkdtemp(prefix="calbench-slurm-"))
        self.home.chmod(0o755)  # munged wants every folder above its socket searchable
        for folder in ("munge", "state", "spool"):
            (self.home / folder).mkdir(mode=0o755)
        key = self.home / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.home / "slurm.conf").write_text(_config(self.home, self.node, os.cpu_count() or 1))
        self._saved_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.home / "slurm.conf")
        try:
            munge = self.home / "munge"
            self._start(
                "munged",
                f"--key-file={key}",
                f"--socket={munge / 'socket'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            )
            self._start("slurmctld", "-i")  # -i: ignore saved state (there is none)
            self._start("slurmd")
            self._wait_idle(30)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self, daemon: str, *args: str) -> None:
        done = subprocess.run([self.bins[daemon], *args], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise Unavailable(f"{daemon} did not start: {(done.stderr or done.stdout).strip()[-300:]}")

    def _wait_idle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            state = subprocess.run([self.bins["sinfo"], "-h", "-o", "%T"], capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return
            time.sleep(0.2)
        raise Unavailable(f"the node did not come up within {seconds:.0f} s: {self.log('slurmd')[-300:]}")

    def log(self, daemon: str) -> str:
        path = self.home / (f"munge/{daemon}.log" if daemon == "munged" else f"{daemon}.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def squeue(self, *jobs: str) -> dict[str, str]:
        """{job id (``<array>_<task>`` for array tasks): state} of the cluster's jobs, finished ones too."""
        args = [self.bins["squeue"], "-h", "-r", "-t", "all", "-o", "%i|%T"] + (["-j", ",".join(jobs)] if jobs else [])
        lines = subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.split()
        return dict(line.split("|", 1) for line in lines)

    def scancel(self, job: str) -> None:
        subprocess.run([self.bins["scancel"], job], check=True, timeout=30)

    def __exit__(self, *exc: object) -> None:
        if self.home is None:
            return
        if (self.home / "slurmctld.pid").exists():  # end every job first, or its slurmstepd outlives slurmd
            subprocess.run([self.bins["scancel"], "--user", "root"], capture_output=True, timeout=30)
            deadline = time.monotonic() + KILL_WAIT + 10
            while time.monotonic() < deadline and any(
                s in ("RUNNING", "COMPLETING", "PENDING") for s in self.squeue().values()
            ):
                time.sleep(0.2)
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            _stop(self.home / pid_file)
        if self._saved_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._saved_conf
        shutil.rmtree(self.home, ignore_errors=True)
        self.home = None


def _stop(pid_file: Path, seconds: float = 10) -> None:
    """SIGTERM the daemon in ``pid_file`` and wait for it to go (SIGKILL after ``seconds``)."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig, wait in ((signal.SIGTERM, seconds), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or "zombie" in _status(pid):
                return
            time.sleep(0.1)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return ""
