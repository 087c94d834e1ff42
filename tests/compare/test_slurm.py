"""`--launcher slurm` on a real single-node Slurm (tests/slurm_cluster.py: munged, slurmctld and
slurmd started for this module, without job accounting, as small clusters often run).

A grid as a job array gives the rows one process writes; a job killed with scancel is reported
with its id and log, and the rerun computes only what it left; a job past its time limit is
reported as timed out; `tune --workers 2` on a PostgreSQL study survives a worker killed with
scancel (its trial is retried) and writes the final report; jobs get what they need from the
submitting process, not from the shell's exports.

Without the binaries or root the tests skip with the reason; under CI (.ci/run installs Slurm
and sets CALBENCH_REQUIRE_SLURM) they fail instead.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState
from postgres_server import REQUIRED as PG_REQUIRED
from postgres_server import PostgresServer
from postgres_server import Unavailable as PgUnavailable
from services import started
from slurm_cluster import PARTITION, REQUIRED, SlurmCluster, Unavailable
from typer.testing import CliRunner

import calbench.jobs
from calbench.cli.app import app
from calbench.compare import CompareRequest, Grid, run_compare
from calbench.jobs import JOB_ENVIRONMENT, Launcher, run_jobs
from calbench.report import write_results_report
from calbench.results import read_failed_jobs, read_results
from calbench.session import FewShot, RunContext
from calbench.tune.config import COUNTED
from calbench.tune.space import base_space
from calbench.tune.storage import open_storage

pytestmark = pytest.mark.e2e
MODEL = "tiny-random"  # the fastest model: these tests are about jobs, not calibration
SMALL = ["--shots", "4", "--views", "2", "--bootstrap", "20", "--device", "cpu"]


@pytest.fixture(scope="module")
def cluster():
    yield from started(SlurmCluster, "Slurm", REQUIRED, Unavailable)


@pytest.fixture(autouse=True)
def local_disk(monkeypatch):
    """submitit waits 15 s for a missing result to appear on a slow network file system; here it is a
    local disk. And a one-node cluster can be asked for job states every 2 s, not once a minute."""
    import submitit.core.core

    monkeypatch.setattr(submitit.core.core.Job, "_results_timeout_s", 1)
    monkeypatch.setattr(calbench.jobs, "POLL_SECONDS", 2)
    monkeypatch.setattr(calbench.jobs, "_STATES", [])


def _scontrol(job):
    text = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text.splitlines()[0]))


def _compare(cache_dir, out, *extra):
    args = ["compare", "--methods", "zero-shot,coop-ce", "--seeds", "1", *SMALL, "--cache-dir", str(cache_dir)]
    return CliRunner().invoke(app, [*args, "--out", str(out), *extra])


def test_compare_all_on_slurm_gives_the_rows_of_one_process(cluster, synthetic, cache_dir, tmp_path):
    local = _compare(cache_dir, tmp_path / "local", "--all")
    assert local.exit_code == 0, local.output
    options = ["--slurm-partition", PARTITION, "--slurm-time", "10", "--slurm-cpus", "1", "--array-parallelism", "1"]
    slurm = _in_time(240, _compare, cache_dir, tmp_path / "slurm", "--all", "--launcher", "slurm", *options)
    assert slurm.exit_code == 0, slurm.output
    for name in ("results.csv", "settings.json"):
        assert (tmp_path / "slurm" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    [log] = (tmp_path / "slurm" / "jobs").glob("*_0_log.err")  # one pair: one job (submitit sends no array of one)
    job = log.name[: -len("_0_log.err")]
    seen = _scontrol(job)  # what Slurm itself ran: the options given, one array
    assert (seen["Partition"], seen["TimeLimit"], seen["NumCPUs"]) == (PARTITION, "00:10:00", "1")
    assert seen["JobName"] == "calbench-compare"
    # no job accounting here: sacct fails, said once, in words, not submitit's warning on every poll
    assert [line for line in slurm.output.splitlines() if "sacct" in line] == [
        "warning: this Slurm cluster keeps no job accounting (sacct: Slurm accounting storage is disabled), so job "
        "states cannot come from sacct; calbench follows its jobs with squeue instead, and still reports jobs that "
        "end without a result"
    ]
    assert "Bypassing sacct error" not in slurm.output


def _in_time(seconds, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, failing the test (not hanging it) when it has not returned within ``seconds``."""
    done = {}
    thread = threading.Thread(target=lambda: done.update(value=fn(*args, **kwargs)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert "value" in done, f"{getattr(fn, '__name__', fn)} did not return within {seconds} s"
    return done["value"]


def _wait(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


def test_a_job_killed_with_scancel_is_a_failed_job_and_the_rerun_computes_only_what_it_left(
    cluster, synthetic, cache_dir, tmp_path
):
    second = tmp_path / "synthetic-b"  # a second pair: the same images in another folder
    shutil.copytree(synthetic.root, second)
    grid = Grid(["zero-shot", "coop-ce"], [1], FewShot(4, 2), bootstrap=20, method_params={"coop-ce": {"epochs": 4}})
    pairs = [(MODEL, "synthetic"), (MODEL, str(second))]
    context, out = RunContext(device="cpu", cache_dir=cache_dir), tmp_path / "res"
    launcher = Launcher("slurm", array_parallelism=1)  # the second task starts when the first has ended
    done = {}

    def launch():
        done["run"] = run_compare(CompareRequest(grid=grid, context=context, out=out, pairs=pairs), launcher)

    thread = threading.Thread(target=launch, daemon=True)
    thread.start()

    def second_task_running():
        logs = list((out / "jobs").glob("*_1_0_log.out")) if (out / "jobs").is_dir() else []
        return bool(logs) and "Starting with JobEnvironment" in logs[0].read_text()  # submitit's first line

    _wait(second_task_running, 120, "the second task to start")
    [job] = [j for j, state in cluster.squeue().items() if j.endswith("_1") and state == "RUNNING"]
    assert _scontrol(job)["ArrayTaskThrottle"] == "1"  # --array-parallelism reached Slurm
    cluster.scancel(job)
    thread.join(timeout=120)
    [failed] = done["run"].failed_jobs
    assert failed["job_id"] == job and failed["log"] == str(out / "jobs" / f"{job}_0_log.err")
    assert failed["dataset"] == str(second) and failed["state"] == "CANCELLED"
    assert failed["error"].startswith("ended without a result (state: CANCELLED): ")
    assert "CANCELLED AT" in open(failed["log"]).read()  # slurmstepd's "*** JOB n ON node CANCELLED AT time ***"
    page = write_results_report(out)[1].read_text()
    failed_section = page[page.index("Failed jobs") :]
    assert job in failed_section and failed["log"] in failed_section
    assert len(read_results(out / "results.csv")) == 2  # the first pair's runs

    again = _in_time(240, run_compare, CompareRequest(grid=grid, context=context, out=out, pairs=pairs), launcher)
    assert again.computed == 2 and again.failed_jobs == []  # only the killed pair's runs
    assert len(read_results(out / "results.csv")) == 4 and read_failed_jobs(out) == []


def test_a_job_past_its_time_limit_is_reported_as_timed_out(cluster, tmp_path):
    started = time.monotonic()
    [outcome] = _in_time(240, run_jobs, Launcher("slurm", time=1), tmp_path / "jobs", "sleep", time.sleep, [(600,)])
    assert outcome.error == "timed out: the job ran into its time limit (1 min); give it more with --slurm-time"
    assert time.monotonic() - started < 150  # ended by the limit, not by the sleep


def test_a_job_gets_python_and_environment_from_calbench_not_from_the_shell(cluster, cache_dir, tmp_path, monkeypatch):
    """A site may submit with --export=NONE (SBATCH_EXPORT): the job still runs this Python with the
    cache, data, weights and offline settings of the submitting process."""
    monkeypatch.setenv("SBATCH_EXPORT", "NONE")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no virtual environment activated
    monkeypatch.setenv("CALBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "secret")  # a credential stays out of job files
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CALBENCH_WEIGHTS", "weights")  # relative: made absolute for the job
    # the job's own process: the Python it runs (its command line) and its environment, through a child
    look = 'tr "\\0" "\\n" < /proc/$PPID/cmdline | head -n 1; env -0'
    call = (["sh", "-c", look],)
    [outcome] = _in_time(240, run_jobs, Launcher("slurm"), tmp_path / "jobs", "env", subprocess.check_output, [call])
    assert outcome.ok, outcome.error  # the system's python3 has no submitit: the job ran this virtual environment's
    python, environ = outcome.value.decode().split("\n", 1)
    environ = dict(item.split("=", 1) for item in environ.split("\0") if item)
    assert python == sys.executable
    expected = {name: os.environ[name] for name in JOB_ENVIRONMENT if name in os.environ}
    expected["CALBENCH_WEIGHTS"] = str(tmp_path / "weights")
    assert {name: environ.get(name) for name in expected} == expected
    assert "HF_TOKEN" not in environ and "VIRTUAL_ENV" not in environ  # --export=NONE held for everything else


@pytest.fixture(scope="module")
def postgres():
    yield from started(PostgresServer, "PostgreSQL", PG_REQUIRED, PgUnavailable)


def _job_of(worker):
    """The Slurm array task a search worker ("host:pid") runs in, from its process's environment."""
    pid = int(worker.rsplit(":", 1)[1])
    environ = dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)
    return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"


def test_tune_workers_on_slurm_finish_a_postgresql_study_when_one_is_killed_with_scancel(
    cluster, postgres, synthetic, cache_dir, tmp_path
):
    storage, out = postgres.database("slurm_tune"), tmp_path / "out"
    args = ["tune", "--model", MODEL, "--trials", "4", "--epochs", "20", "--shots", "4", "--views", "2"]
    args += ["--storage", storage, "--study", "shared", "--final-seeds", "1", "--heartbeat", "1", "--pruner", "none"]
    args += ["--split-seeds", "1"]  # about jobs, not the data-size rule
    args += [
        "--device",
        "cpu",
        "--cache-dir",
        str(cache_dir),
        "--out",
        str(out),
        "--launcher",
        "slurm",
        "--workers",
        "2",
    ]
    killed = {}

    def kill_a_worker_mid_trial():
        """Freeze the worker of a running trial (scontrol suspend: SIGSTOP), check the trial is still
        running, then scancel it; a trial that finished meanwhile lets its worker go on, and we look again."""
        space = set(base_space("calibprompt"))  # a trial training: its whole setting drawn
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            try:
                running = [t for t in _trials(storage) if t.state == TrialState.RUNNING and set(t.params) == space]
            except Exception:  # noqa: BLE001 - the study is not created yet
                running = []
            for trial in running[:1]:
                job = _job_of(trial.user_attrs["worker"])
                subprocess.run(["scontrol", "suspend", job], check=True)
                if [t for t in _trials(storage) if t.number == trial.number][0].state == TrialState.RUNNING:
                    cluster.scancel(job)
                    killed.update(job=job, trial=trial.number)
                else:
                    subprocess.run(["scontrol", "resume", job], check=True)
            time.sleep(0.1)

    killer = threading.Thread(target=kill_a_worker_mid_trial, daemon=True)
    killer.start()
    run = _in_time(600, CliRunner().invoke, app, args)
    killer.join(timeout=10)
    assert run.exit_code == 0, run.output
    assert killed, "no trial was seen running"
    assert f"failed job: job {killed['job']} (worker" in run.output and "state: CANCELLED" in run.output
    trials = _trials(storage)
    assert 4 <= sum(t.state in COUNTED for t in trials) <= 4 + 2  # the total, and at most one surplus per worker
    [lost] = [t for t in trials if t.number == killed["trial"]]
    assert lost.state == TrialState.FAIL
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
    assert retry.state == TrialState.COMPLETE and retry.params == lost.params  # the same setting, run to the end
    best = json.loads((out / "best_params.json").read_text())
    assert best["study"] == "shared" and (out / "report.md").is_file()
    assert {r["method"] for r in read_results(out / "results.csv")} >= {"coop-ce", "calibprompt:tuned"}


def _trials(storage):
    return optuna.load_study(study_name="shared", storage=open_storage(storage, 1)).get_trials()
