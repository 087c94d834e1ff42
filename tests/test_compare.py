"""The comparison grid: resume, failures, --all with skipped pairs, and the report."""
import csv

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from calbench.cli.app import app
from calbench.errors import CalbenchError
from calbench.experiment import RESULT_COLUMNS, read_results, run_compare
from calbench.methods import METHODS, LogitMethod, MethodSpec
from calbench.models import MODELS

runner = CliRunner()
FAST = {"coop-ce": {"epochs": 3}, "calibprompt": {"epochs": 3}}


def test_rows_are_resumed_and_force_recomputes(tmp_path, cache_dir):
    args = dict(methods=["zero-shot", "coop-ce", "coop-ce+ts"], seeds=[1, 2], out=tmp_path, cache_dir=cache_dir, progress=False, method_params=FAST, device="cpu")
    first = run_compare(**args)
    assert first.computed == 6 and len(first.rows) == 6
    again = run_compare(**args)
    assert again.computed == 0 and again.stats.encoded == 0
    assert [r["ece"] for r in again.rows] == [r["ece"] for r in first.rows]
    wider = run_compare(**{**args, "seeds": [1, 2, 3]})
    assert wider.computed == 3  # only seed 3 is new
    forced = run_compare(**{**args, "force": True})
    assert forced.computed == 6
    assert [r["ece"] for r in forced.rows] == [r["ece"] for r in first.rows]  # deterministic
    changed = run_compare(**{**args, "method_params": {"coop-ce": {"epochs": 4}}})
    assert changed.computed == 4  # coop-ce and coop-ce+ts have new settings; zero-shot is reused
    rows = read_results(tmp_path / "results.csv")
    assert len(rows) == 9 + 4 and list(rows[0]) == RESULT_COLUMNS


def test_each_run_carries_a_bootstrap_interval(tmp_path, cache_dir):
    result = run_compare(methods=["coop-ce"], seeds=[1], out=tmp_path, cache_dir=cache_dir, progress=False, method_params=FAST, bootstrap=200)
    (row,) = result.rows
    assert row["ece_ci_low"] < row["ece"] < row["ece_ci_high"]
    probs = np.load(tmp_path / "predictions" / f"tiny__synthetic__coop-ce__1__{row['config']}.npy")
    assert probs.shape == (300, 5)


class _Exploding(LogitMethod):
    def fit(self, data):
        raise FloatingPointError("loss is nan")


@pytest.fixture()
def exploding_method():
    METHODS._entries["exploding"] = MethodSpec("exploding", "test double", _Exploding, True)
    yield "exploding"
    del METHODS._entries["exploding"]


def test_a_failing_method_is_a_failed_row_and_the_grid_goes_on(tmp_path, cache_dir, exploding_method):
    result = run_compare(methods=["exploding", "exploding+ts", "zero-shot"], seeds=[1], out=tmp_path, cache_dir=cache_dir, progress=False)
    by_method = {r["method"]: r for r in result.rows}
    assert by_method["exploding"]["status"] == "failed"
    assert by_method["exploding"]["error"] == "FloatingPointError: loss is nan"
    assert by_method["exploding+ts"]["status"] == "failed"
    assert by_method["zero-shot"]["status"] == "ok"
    with open(tmp_path / "results.csv") as f:
        saved = {r["method"]: r for r in csv.DictReader(f)}
    assert saved["exploding"]["status"] == "failed" and saved["exploding"]["ece"] == "nan"


@pytest.fixture()
def missing_model(monkeypatch):
    """A demo-modality model whose weights are absent: --all must skip it without building it."""
    import dataclasses

    import calbench.models as models

    def build(*args, **kwargs):
        raise AssertionError("a skipped model must never be built")

    MODELS._entries["ghost"] = dataclasses.replace(MODELS.get("tiny"), name="ghost", build=build)
    real = models.availability
    monkeypatch.setattr(models, "availability", lambda name: (False, "weights not found; run `calbench models fetch ghost`") if name == "ghost" else real(name))
    yield "ghost"
    del MODELS._entries["ghost"]


def test_all_runs_available_pairs_and_lists_the_rest(tmp_path, cache_dir, missing_model):
    skipped = []
    result = run_compare(
        methods=["zero-shot"], seeds=[1], out=tmp_path, cache_dir=cache_dir, progress=False, all_pairs=True, on_skip=lambda *s: skipped.append(s)
    )
    assert ("ghost", "synthetic", "weights not found; run `calbench models fetch ghost`") in skipped
    assert {(r["model"], r["dataset"]) for r in result.rows} >= {("tiny", "synthetic")}


def test_compare_all_cli_then_rerun_recomputes_nothing(tmp_path, cache_dir, missing_model):
    args = ["compare", "--all", "--methods", "zero-shot,coop-ls", "--seeds", "1", "--out", str(tmp_path), "--cache-dir", str(cache_dir), "--bootstrap", "50"]
    first = runner.invoke(app, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "skipped ghost · synthetic: weights not found; run `calbench models fetch ghost`" in " ".join(first.output.split())
    assert "2 run(s) computed" in first.output
    second = runner.invoke(app, args, catch_exceptions=False)
    assert "0 run(s) computed, 2 reused" in second.output
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").is_file()


def test_report_marks_the_best_ece_and_embeds_the_diagrams(tmp_path, cache_dir):
    run_compare(methods=["zero-shot", "zero-shot+ts", "coop-ce"], seeds=[1, 2], out=tmp_path, cache_dir=cache_dir, progress=False, method_params=FAST, bootstrap=50)
    result = runner.invoke(app, ["report", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0
    md = (tmp_path / "report.md").read_text()
    rows = read_results(tmp_path / "results.csv")
    best = min({r["method"] for r in rows}, key=lambda m: np.mean([r["ece"] for r in rows if r["method"] == m]))
    best_line = next(line for line in md.splitlines() if line.startswith(f"| {best} |"))
    assert "**ECE" in best_line
    assert sum("**ECE" in line for line in md.splitlines()) == 1
    assert "Relative ECE change against coop-ce" in md and "| coop-ce | +0.0% |" in md
    assert "![" in md and "reliability/tiny_synthetic_coop-ce.png" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<b>ECE" in page


def test_report_of_a_missing_folder_is_one_line(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "does not exist; run `calbench compare" in result.output


def test_report_pivots_the_certification_table(tmp_path, cache_dir):
    run_compare(methods=["zero-shot"], seeds=[1], out=tmp_path, cache_dir=cache_dir, progress=False, bootstrap=0)
    header = "model,dataset,method,seed,shots,sigma,n0,n,alpha,subset,radius,certified_accuracy,abstain_rate\n"
    lines = [f"tiny,synthetic,promptsmooth,1,16,0.25,10,100,0.001,300,{r},{a},0.36\n" for r, a in [(0.0, 0.387), (0.25, 0.17), (0.5, 0.0)]]
    (tmp_path / "certification.csv").write_text(header + "".join(lines))
    runner.invoke(app, ["report", str(tmp_path)], catch_exceptions=False)
    md = (tmp_path / "report.md").read_text()
    assert "| model | dataset | method | seed | sigma | n0 | n | alpha | subset | r=0 | r=0.25 | r=0.5 |" in md
    assert "| tiny | synthetic | promptsmooth | 1 | 0.25 | 10 | 100 | 0.001 | 300 | 38.7 | 17.0 | 0.0 |" in md
