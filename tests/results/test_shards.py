"""Results shards (one per job, no lock) merged into results.csv by run key, failed jobs in the
report, and the launcher options: the parts of a cluster grid that need no cluster."""

import builtins
import json
import math
import os
import re

import pytest

import calbench.jobs
from calbench.errors import CalbenchError, CalbenchWarning
from calbench.jobs import GONE, Launcher, executor, failure_reason, job_environment, slurm_states
from calbench.report import write_results_report
from calbench.results import (
    RESULT_COLUMNS,
    ResultsStore,
    ShardStore,
    logged_rows,
    merge_shards,
    read_failed_jobs,
    read_results,
    record_jobs,
    shard_name,
    shard_path,
)


def _row(model="m", dataset="d", method="coop-ce", seed=1, config="c1", ece=0.1, status="ok"):
    row = {column: 0.5 for column in RESULT_COLUMNS}
    row.update(model=model, dataset=dataset, method=method, seed=seed, config=config, ece=ece, status=status)
    row.update(error="", dataset_id="abc123", ece_ci_low=math.nan, ece_ci_high=math.nan)
    return row


def test_a_job_reads_every_row_and_writes_only_its_own_shard(tmp_path):
    ResultsStore(tmp_path).put_rows([_row(seed=1), _row(dataset="other", seed=1)])
    main = (tmp_path / "results.csv").read_bytes()
    ShardStore(tmp_path, "m", "x").put_rows([_row(dataset="x", seed=1)])  # another job's shard
    store = ShardStore(tmp_path, "m", "d")
    assert {(r["dataset"], r["seed"]) for r in store.rows} == {("d", 1), ("other", 1), ("x", 1)}
    store.put_rows([_row(seed=2)])
    store.put_rows([_row(seed=2, ece=0.3), _row(seed=1, ece=0.2)])  # a rerun replaces by run key
    assert (tmp_path / "results.csv").read_bytes() == main  # never written by a job
    assert [(r["seed"], r["ece"]) for r in read_results(shard_path(tmp_path, "m", "d"))] == [(2, 0.3), (1, 0.2)]
    assert store.find(model="m", dataset="d", method="coop-ce", seed=1, config="c1")["ece"] == 0.2
    store.put_settings({"c1": {"method": "coop-ce", "settings": {"alpha": [0.1, "calbench"]}}})
    assert json.loads((tmp_path / "shards" / "m__d.settings.json").read_text())["c1"]["method"] == "coop-ce"


def test_shard_store_overrides_every_writer_that_would_lock_results_csv(tmp_path):
    """A writer added to ResultsStore must get a shard version too, or jobs would lock the shared folder."""
    writers = [
        name for name in vars(ResultsStore) if name.startswith("put") and name not in ("put", "put_certification")
    ]
    assert writers and all(getattr(ShardStore, name) is not getattr(ResultsStore, name) for name in writers)
    assert set(vars(ResultsStore(tmp_path / "a"))) <= set(vars(ShardStore(tmp_path / "b", "m", "d")))


def test_merge_folds_shards_by_run_key_in_the_grid_order_and_removes_them(tmp_path):
    ResultsStore(tmp_path).put_rows([_row(dataset="b", ece=0.9, status="failed"), _row(dataset="z")])
    for dataset in ("b", "a"):  # shard b written first
        ShardStore(tmp_path, "m", dataset).put_rows([_row(dataset=dataset, ece=0.25)])
    ShardStore(tmp_path, "m", "a").put_settings({"ca": {"method": "coop-ce"}})
    order = [shard_path(tmp_path, "m", "a"), shard_path(tmp_path, "m", "b")]
    assert merge_shards(tmp_path, order) == 2
    rows = read_results(tmp_path / "results.csv")
    assert [(r["dataset"], r["ece"], r["status"]) for r in rows] == [
        ("z", 0.1, "ok"),
        ("a", 0.25, "ok"),
        ("b", 0.25, "ok"),
    ]
    assert list((tmp_path / "shards").iterdir()) == []
    assert json.loads((tmp_path / "settings.json").read_text())["ca"] == {"method": "coop-ce"}
    assert merge_shards(tmp_path) == 0  # nothing left to merge; results.csv as it was
    assert repr(read_results(tmp_path / "results.csv")) == repr(rows)  # (NaN cells: compared as text)


def test_rows_a_job_writes_during_a_merge_are_kept_for_the_next_one(tmp_path):
    from calbench.results.shards import claim_shard

    job = ShardStore(tmp_path, "m", "d")
    job.put_rows([_row(seed=1)])
    claimed = claim_shard(shard_path(tmp_path, "m", "d"))  # a merge took the shard ...
    job.put_rows([_row(seed=2)])  # ... while the job wrote on: a new shard
    assert shard_path(tmp_path, "m", "d").is_file()
    assert merge_shards(tmp_path) == 2  # the new shard, and the claimed one its merge never finished
    assert sorted(r["seed"] for r in read_results(tmp_path / "results.csv")) == [1, 2]
    assert not claimed.exists()


def test_report_reads_shards_without_rewriting_results_and_lists_failed_jobs_until_their_pair_runs(tmp_path):
    ShardStore(tmp_path, "m", "d").put_rows([_row()])
    failure = {"model": "m", "dataset": "e", "job_id": "4242_1", "state": "NODE_FAIL", "log": "/logs/4242_1_0_log.err"}
    record_jobs(tmp_path, [("m", "d"), ("m", "e")], [{**failure, "error": "node died"}])
    md, page = write_results_report(tmp_path)
    text = page.read_text()
    assert "Failed jobs" in text and "4242_1" in text and "/logs/4242_1_0_log.err" in text and "node died" in text
    assert "m · d" in md.read_text()  # the shard's row is in the report ...
    assert not (tmp_path / "results.csv").exists()  # ... and rendering wrote no results
    assert shard_path(tmp_path, "m", "d").is_file()
    assert [r["dataset"] for r in logged_rows(tmp_path)] == ["d"]
    record_jobs(tmp_path, [("m", "e")], [])  # the pair ran again, and finished
    assert read_failed_jobs(tmp_path) == []
    assert "Failed jobs" not in write_results_report(tmp_path)[0].read_text()


def test_shard_names_are_safe_and_keep_folders_apart():
    assert shard_name("tiny", "synthetic") == "tiny__synthetic"
    a, b = shard_name("tiny", "/data/a/kather"), shard_name("tiny", "/data/b/kather")
    assert a != b and "/" not in a and a.startswith("tiny___data_a_kather-")


@pytest.mark.parametrize(
    ("launcher", "message"),
    [
        (Launcher("pbs"), "--launcher 'pbs': choose one of local, local-processes, slurm"),
        (Launcher("local", gpus=1), "--slurm-gpus only apply with --launcher slurm; got --launcher local"),
        (
            Launcher("local-processes", partition="gpu", array_parallelism=2),
            "--slurm-partition, --array-parallelism only apply with --launcher slurm; got --launcher local-processes",
        ),
        (Launcher("slurm", time=0), "--slurm-time must be at least 1, got 0"),
        (Launcher("slurm", array_parallelism=-1), "--array-parallelism must be at least 1, got -1"),
    ],
)
def test_launcher_options_are_checked_with_one_line(launcher, message):
    with pytest.raises(CalbenchError) as caught:
        launcher.check()
    assert str(caught.value) == message


def test_slurm_jobs_get_the_partition_gpus_time_and_array_parallelism(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\n")  # submitit looks for Slurm's srun
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    chosen = executor(Launcher("slurm", "gpu", 1, 60, 4, 8), tmp_path, "calbench-compare")
    assert {k: chosen._executor.parameters[k] for k in ("partition", "gpus_per_node", "time", "array_parallelism")} == {
        "partition": "gpu",
        "gpus_per_node": 1,
        "time": 60,
        "array_parallelism": 4,
    }
    script = chosen._executor._make_submission_file_text("python -m x", "uid")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --time=60",
        "#SBATCH --cpus-per-task=8",
    ):
        assert line in script
    local = executor(Launcher("local-processes"), tmp_path, "x")._executor.parameters
    assert local["timeout_min"] == 7 * 24 * 60  # not submitit's 2-minute default


def test_slurm_without_slurm_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CalbenchError) as caught:
        executor(Launcher("slurm"), tmp_path, "x")
    assert str(caught.value) == (
        "--launcher slurm needs Slurm (srun and sbatch on PATH): run on a Slurm login node, "
        "or use --launcher local-processes on this machine"
    )


def test_a_missing_submitit_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name.split(".")[0] == "submitit":
            raise ModuleNotFoundError("No module named 'submitit'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    with pytest.raises(CalbenchError) as caught:
        executor(Launcher("slurm"), tmp_path, "x")
    assert str(caught.value) == "--launcher slurm needs submitit: pip install 'calbench[slurm]'"


def test_a_failed_job_is_told_by_the_exception_it_died_of():
    text = (
        "Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\ncalbench.errors.CalbenchError: no dataset at /data/x\n\n'
        "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - /l/1_0_log.err"
    )
    assert failure_reason(RuntimeError(text)) == "calbench.errors.CalbenchError: no dataset at /data/x"
    node = "Job 77_3 (task: 0) with path /l/77_3_0_result.pkl\nhas not produced any output (state: NODE_FAIL)"
    assert failure_reason(RuntimeError(node)) == "ended without a result (state: NODE_FAIL)"
    oom = (
        node.replace("NODE_FAIL", "OUT_OF_MEMORY")
        + "\nError stream produced:\n"
        + "-" * 40
        + "\nslurmstepd: oom_kill\n"
    )
    assert failure_reason(RuntimeError(oom)) == "ended without a result (state: OUT_OF_MEMORY): slurmstepd: oom_kill"


def test_a_timed_out_job_is_told_as_such_naming_the_limit():
    killed = "Job 77_3 (task: 0) with path /l/77_3_0_result.pkl\nhas not produced any output (state: TIMEOUT)"
    said = "timed out: the job ran into its time limit ({}); give it more with --slurm-time"
    assert failure_reason(RuntimeError(killed), 30) == said.format("30 min")
    assert failure_reason(RuntimeError(killed)) == said.format("the partition's limit")
    # submitit ends a job itself when Slurm warns it of the limit (SIGUSR2) and it cannot checkpoint
    ended = (
        "Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent call last):\n"
        "submitit.core.utils.UncompletedJobError: Job not requeued because: timed-out and not checkpointable.\n\n"
        "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - /l/1_0_log.err"
    )
    assert failure_reason(RuntimeError(ended), 1) == said.format("1 min")


def test_the_job_environment_is_exported_with_absolute_paths_and_without_credentials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    environ = {
        "CALBENCH_CACHE": "cache",
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": "secret",
        "CALBENCH_DATA": "",
        "PATH": "/x",
    }
    assert job_environment(environ) == [f"export CALBENCH_CACHE={tmp_path / 'cache'}", "export HF_HUB_OFFLINE=1"]
    assert job_environment({"HF_HOME": "/a b/it's"}) == ["export HF_HOME='/a b/it'\"'\"'s'"]


def _commands(folder, **scripts):
    folder.mkdir(exist_ok=True)
    for name, script in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{script}\n")
        (folder / name).chmod(0o755)


def test_without_job_accounting_job_states_come_from_squeue_with_one_warning(tmp_path, monkeypatch):
    """sacct fails as on a cluster without slurmdbd: one warning in words, then squeue's states, and a
    job squeue no longer lists (Slurm forgot it after it ended) counts as ended, not as running forever."""
    pytest.importorskip("submitit")
    listed = tmp_path / "listed"
    listed.write_text("5_0|RUNNING|node1\n5_1|PENDING|\n")
    bin_ = tmp_path / "bin"
    _commands(bin_, sacct='echo "Slurm accounting storage is disabled" >&2; exit 1', squeue=f'cat "{listed}"')
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    monkeypatch.setattr(calbench.jobs, "_STATES", [])
    states = slurm_states()
    for job in ("5_0", "5_1"):
        states.register_job(job)
    with pytest.warns(CalbenchWarning) as caught:
        states.update()
        assert [states.get_state(job, mode="cache") for job in ("5_0", "5_1")] == ["RUNNING", "PENDING"]
        listed.write_text("5_0|CANCELLED|node1\n")
        states.update()
    assert [states.get_state(job, mode="cache") for job in ("5_0", "5_1")] == ["CANCELLED", GONE]
    assert states.is_done("5_0", mode="cache") and states.is_done("5_1", mode="cache")
    assert [str(w.message) for w in caught] == [
        "this Slurm cluster keeps no job accounting (sacct: Slurm accounting storage is disabled), so job states "
        "cannot come from sacct; calbench follows its jobs with squeue instead, and still reports jobs that end "
        "without a result"
    ]
    assert slurm_states() is states  # one poller per process: the warning is not repeated by later grids


def test_with_job_accounting_job_states_come_from_sacct(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    bin_ = tmp_path / "bin"
    _commands(bin_, sacct='echo "JobID|State|NodeList"; echo "8_0|COMPLETED|n1"', squeue="exit 3")
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    monkeypatch.setattr(calbench.jobs, "_STATES", [])
    states = slurm_states()
    states.register_job("8_0")
    states.update()
    assert states.get_state("8_0", mode="cache") == "COMPLETED" and states.accounting


def _shift(seed=1, corruption="gaussian_noise", severity=1, ece=0.2):
    key = {"model": "m", "dataset": "d", "method": "coop-ce", "seed": seed, "config": "c1"}
    return {**key, "corruption": corruption, "severity": severity, "accuracy": 0.5, "ece": ece}


def test_a_jobs_shift_rows_go_to_its_own_shard_and_merge_into_shift_csv(tmp_path):
    from calbench.results import SHIFT_COLUMNS, read_shift

    full = {c: 0.1 for c in SHIFT_COLUMNS}
    ResultsStore(tmp_path).put_shift([{**full, **_shift(seed=1)}])
    store = ShardStore(tmp_path, "m", "d")
    store.put_shift([{**full, **_shift(seed=2)}, {**full, **_shift(seed=1, ece=0.3)}])
    assert [r["ece"] for r in read_shift(tmp_path)] == [0.2]  # shift.csv is never written by a job
    assert (tmp_path / "shards" / "shift" / "m__d.csv").is_file()
    assert sorted((r["seed"], r["ece"]) for r in store.shift_rows()) == [(1, 0.3), (2, 0.2)]
    merge_shards(tmp_path)
    assert sorted((r["seed"], r["ece"]) for r in read_shift(tmp_path)) == [(1, 0.3), (2, 0.2)]
    assert not list((tmp_path / "shards" / "shift").glob("*.csv"))


@pytest.mark.parametrize("damaged", ["m,e,123\n", "m,e,1,FAILED,log,error,extra\n", ",,,,,\n"])
def test_a_failed_jobs_row_with_too_few_or_many_cells_is_left_out_with_a_warning(tmp_path, damaged):
    ShardStore(tmp_path, "m", "d").put_rows([_row()])
    header = "model,dataset,job_id,state,log,error\n"
    (tmp_path / "failed_jobs.csv").write_text(header + damaged + "m,f,77_0,TIMEOUT,/logs/77.err,time limit\n")
    with pytest.warns(CalbenchWarning, match=r"failed_jobs.csv line 2 is damaged \(not one cell per column\)"):
        _, page = write_results_report(tmp_path)
        assert [row["job_id"] for row in read_failed_jobs(tmp_path)] == ["77_0"]
    assert "77_0" in page.read_text()


@pytest.mark.parametrize("content", [b"\x00\xff garbage\n", b"a,b,c\n1,2,3\n"])
def test_a_damaged_shard_is_kept_aside_and_the_grid_goes_on(tmp_path, content):
    ShardStore(tmp_path, "m", "d").put_rows([_row()])
    bad = shard_path(tmp_path, "m", "e")
    bad.write_bytes(content)
    message = re.escape(f"results shard {bad} is not a calbench results file; moved it aside as {bad}.damaged")
    with pytest.warns(CalbenchWarning, match=message):
        assert len(ShardStore(tmp_path, "m", "f").rows) == 1  # a job reading the folder goes on
    assert bad.with_name(bad.name + ".damaged").read_bytes() == content and not bad.exists()
    bad.write_bytes(content)
    with pytest.warns(CalbenchWarning, match=message):
        assert merge_shards(tmp_path) == 1  # and so does a merge: no hidden claimed file is left behind
    assert [r["dataset"] for r in read_results(tmp_path / "results.csv")] == ["d"]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [bad.name + ".damaged"]
    merge_shards(tmp_path)  # the next merge has nothing left to stop at


def test_a_damaged_shift_shard_is_kept_aside(tmp_path):
    shift = tmp_path / "shards" / "shift" / "m__d.csv"
    shift.parent.mkdir(parents=True)
    shift.write_text("not,a,shift,file\n")
    with pytest.warns(CalbenchWarning, match=re.escape(f"results shard {shift} is not a calbench results file")):
        merge_shards(tmp_path)
    assert shift.with_name("m__d.csv.damaged").is_file() and not (tmp_path / "shift.csv").exists()
