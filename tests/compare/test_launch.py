"""Grids and searches as jobs, for real: `--launcher local-processes` runs submitit's local executor,
the same code path as `--launcher slurm` (pickled calls, one process per job, logs per job id).

A grid's jobs write shards that merge into the results a single process writes (same rows, same
numbers, same report); a failed job is in the report with its id and log until its pair runs again;
N tune workers share one study and a final job writes best_params.json and the report.
`--launcher slurm` itself runs on a real single-node Slurm in tests/compare/test_slurm.py.
"""

import csv
import json
import re
import shutil

import numpy as np
import optuna
import pytest
from typer.testing import CliRunner

from calbench.cli.app import app
from calbench.compare import CompareRequest, Grid, run_compare
from calbench.jobs import Launcher
from calbench.report import write_results_report
from calbench.results import read_failed_jobs, read_results
from calbench.session import FewShot, RunContext
from calbench.tune.config import COUNTED
from calbench.tune.storage import open_storage

pytestmark = pytest.mark.e2e
MODEL = "tiny-random"  # the fastest model: these tests are about jobs and files, not calibration
GRID = Grid(
    ["zero-shot", "coop-ce"], [1], FewShot(shots=4, views=2), bootstrap=20, method_params={"coop-ce": {"epochs": 4}}
)


#: a job trains in its own process, whose torch thread count may differ from this one's (a test before may
#: have set it): the same sums in another order, so its numbers equal these up to float32 rounding
ROUNDING = 1e-6


def _same_rows_and_numbers(path, expected):
    """Two results.csv files with the same rows in the same order, equal text cells and numbers within rounding."""
    with open(path, newline="") as ours, open(expected, newline="") as theirs:
        rows, reference = list(csv.reader(ours)), list(csv.reader(theirs))
    assert [len(r) for r in rows] == [len(r) for r in reference] and rows[0] == reference[0]
    for row, want in zip(rows[1:], reference[1:]):
        for cell, expected_cell in zip(row, want):
            try:
                number, expected_number = float(cell), float(expected_cell)
            except ValueError:
                assert cell == expected_cell
                continue
            assert number == pytest.approx(expected_number, rel=0, abs=ROUNDING, nan_ok=True)


def _report(folder):
    """report.md without its time stamp and the failed-jobs section (which only the launched run has)."""
    text = (folder / "report.md").read_text()
    text = re.sub(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC\.", "", text)
    return re.sub(r"\n## Failed jobs.*?(?=\n## |\Z)", "", text, flags=re.S)


def test_launched_grid_merges_into_what_one_process_writes_and_failed_jobs_are_reported(synthetic, cache_dir, tmp_path):
    second = tmp_path / "synthetic-b"  # a second dataset: the same images in another folder
    shutil.copytree(synthetic.root, second)
    missing = tmp_path / "synthetic-c"  # not there yet: its job fails
    pairs = [(MODEL, "synthetic"), (MODEL, str(second)), (MODEL, str(missing))]
    context = RunContext(device="cpu", cache_dir=cache_dir)
    single = tmp_path / "single"
    for model, data in pairs[:2]:
        run_compare(CompareRequest(model=model, data=data, grid=GRID, context=context, out=single))
    write_results_report(single)

    jobs = tmp_path / "jobs"
    result = run_compare(CompareRequest(grid=GRID, context=context, out=jobs, pairs=pairs), Launcher("local-processes"))
    assert result.computed == 4 and len(result.rows) == 4
    assert (jobs / "settings.json").read_bytes() == (single / "settings.json").read_bytes()  # same settings
    _same_rows_and_numbers(jobs / "results.csv", single / "results.csv")
    for npy in (single / "predictions").iterdir():
        np.testing.assert_allclose(np.load(jobs / "predictions" / npy.name), np.load(npy), rtol=0, atol=ROUNDING)
    assert sorted(p.name for p in (jobs / "reliability").iterdir()) == sorted(
        p.name for p in (single / "reliability").iterdir()
    )
    assert not list((jobs / "shards").iterdir())  # every shard merged and removed
    [failed] = result.failed_jobs
    assert failed["dataset"] == str(missing) and str(missing) in failed["error"]
    assert failed["job_id"] in failed["log"] and str(missing) in open(failed["log"]).read()  # its own log says why
    write_results_report(jobs)
    assert _report(jobs) == _report(single)
    page = (jobs / "report.html").read_text()
    assert "Failed jobs" in page and failed["job_id"] in page and failed["log"] in page

    # resume from "another node": the missing dataset arrives; only its pair is computed, through the CLI
    shutil.copytree(synthetic.root, missing)
    args = ["compare", "--model", MODEL, "--data", str(missing), "--methods", "zero-shot,coop-ce", "--seeds", "1"]
    args += ["--shots", "4", "--views", "2", "--bootstrap", "20", "--params", str(_params(tmp_path))]
    args += ["--device", "cpu", "--cache-dir", str(cache_dir), "--out", str(jobs), "--launcher", "local-processes"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert "2 run(s) computed" in run.output
    assert read_failed_jobs(jobs) == [] and "Failed jobs" not in (jobs / "report.md").read_text()
    assert len(read_results(jobs / "results.csv")) == 6


def _params(folder):
    path = folder / "params.json"
    path.write_text(json.dumps({"coop-ce": {"epochs": 4}}))
    return path


def test_tune_workers_share_one_study_and_a_final_job_writes_the_results(synthetic, cache_dir, tmp_path):
    storage = f"journal:{tmp_path / 'study.log'}"
    args = ["tune", "--model", MODEL, "--trials", "4", "--epochs", "4", "--shots", "4", "--views", "2"]
    args += ["--storage", storage, "--study", "shared", "--final-seeds", "1", "--heartbeat", "1"]
    args += ["--split-seeds", "1"]  # about jobs, not the data-size rule
    args += ["--device", "cpu", "--cache-dir", str(cache_dir), "--out", str(tmp_path / "out")]
    args += ["--launcher", "local-processes", "--workers", "2"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    trials = optuna.load_study(study_name="shared", storage=open_storage(storage, 1)).get_trials()
    assert 4 <= sum(t.state in COUNTED for t in trials) <= 5  # the other worker's last trial may be a surplus one
    assert all(t.state in COUNTED for t in trials)  # nothing lost, failed, running or waiting
    best = json.loads((tmp_path / "out" / "best_params.json").read_text())
    assert best["study"] == "shared" and best["trial"] in [t.number for t in trials]
    assert (tmp_path / "out" / "report.md").is_file()
    rows = read_results(tmp_path / "out" / "results.csv")
    assert {r["method"] for r in rows} >= {"coop-ce", "calibprompt:tuned"}
    assert f"study 'shared': {len(trials)} trials in the study" in run.output
    surplus = len(trials) - 4
    assert (f"{surplus} scored trial(s) beyond --trials 4" in run.output) == (surplus > 0)


def test_workers_need_a_launcher_and_slurm_refuses_sqlite(tmp_path):
    runner = CliRunner()
    local = runner.invoke(app, ["tune", "--workers", "2", "--out", str(tmp_path)])
    assert local.exit_code == 2
    assert "--workers runs worker jobs: add --launcher local-processes or --launcher slurm" in local.output
    sqlite = f"sqlite:///{tmp_path / 'study.db'}"
    shared = runner.invoke(app, ["tune", "--launcher", "slurm", "--storage", sqlite, "--out", str(tmp_path)])
    assert shared.exit_code == 2 and "SQLite is unsafe on the network file systems nodes share" in shared.output
