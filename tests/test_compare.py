"""The comparison grid: resume, failures, --all with skipped pairs, and the report."""

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from calbench.base import METHODS, LogitMethod, MethodSpec
from calbench.cli.app import app
from calbench.compare import CompareRequest, Grid, run_compare
from calbench.errors import CalbenchError
from calbench.models import MODELS
from calbench.results import RESULT_COLUMNS, read_results
from calbench.session import FewShot, RunContext

runner = CliRunner()
FAST = {"coop-ce": {"epochs": 3}, "calibprompt": {"epochs": 3}}


@pytest.mark.e2e
def test_rows_are_resumed_and_force_recomputes(tmp_path, cache_dir):
    grid = Grid(["zero-shot", "coop-ce", "coop-ce+ts"], [1, 2], method_params=FAST)
    context = RunContext(device="cpu", cache_dir=cache_dir)
    first = run_compare(CompareRequest(grid=grid, context=context, out=tmp_path))
    assert first.computed == 6 and len(first.rows) == 6
    again = run_compare(CompareRequest(grid=grid, context=context, out=tmp_path))
    assert again.computed == 0 and again.stats.encoded == 0
    assert [r["ece"] for r in again.rows] == [r["ece"] for r in first.rows]
    wider = run_compare(CompareRequest(grid=replace(grid, seeds=[1, 2, 3]), context=context, out=tmp_path))
    assert wider.computed == 3  # only seed 3 is new
    forced = run_compare(CompareRequest(grid=replace(grid, force=True), context=context, out=tmp_path))
    assert forced.computed == 6
    assert [r["ece"] for r in forced.rows] == [r["ece"] for r in first.rows]  # deterministic
    changed = run_compare(
        CompareRequest(grid=replace(grid, method_params={"coop-ce": {"epochs": 4}}), context=context, out=tmp_path)
    )
    assert changed.computed == 4  # coop-ce and coop-ce+ts have new settings; zero-shot is reused
    rows = read_results(tmp_path / "results.csv")
    assert len(rows) == 9 + 4 and list(rows[0]) == RESULT_COLUMNS


@pytest.mark.e2e
def test_each_run_carries_a_bootstrap_interval(tmp_path, cache_dir):
    result = run_compare(
        CompareRequest(
            grid=Grid(["coop-ce"], [1], method_params=FAST, bootstrap=200),
            context=RunContext(cache_dir=cache_dir),
            out=tmp_path,
        )
    )
    (row,) = result.rows
    assert row["ece_ci_low"] < row["ece"] < row["ece_ci_high"]
    probs = np.load(tmp_path / "predictions" / f"tiny__synthetic__coop-ce__1__{row['config']}.npy")
    assert probs.shape == (900, 6)  # the synthetic test split: 6 classes of 150 tiles


class _Exploding(LogitMethod):
    def fit(self, data):
        raise FloatingPointError("loss is nan")


@pytest.fixture()
def exploding_method():
    with METHODS.temporarily("exploding", MethodSpec("exploding", "test double", _Exploding)) as name:
        yield name


@pytest.mark.e2e
def test_a_failing_method_is_a_failed_row_and_the_grid_goes_on(tmp_path, cache_dir, exploding_method):
    result = run_compare(
        CompareRequest(
            grid=Grid(["exploding", "exploding+ts", "zero-shot"], [1]),
            context=RunContext(cache_dir=cache_dir),
            out=tmp_path,
        )
    )
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

    real = models.availability
    monkeypatch.setattr(
        models,
        "availability",
        lambda name: (False, "weights not found; run `calbench models fetch ghost`") if name == "ghost" else real(name),
    )
    with MODELS.temporarily("ghost", dataclasses.replace(MODELS.get("tiny"), name="ghost", build=build)) as name:
        yield name


@pytest.mark.e2e
def test_all_runs_available_pairs_and_lists_the_rest(tmp_path, cache_dir, missing_model):
    skipped = []
    result = run_compare(
        CompareRequest(
            grid=Grid(["zero-shot"], [1]), context=RunContext(cache_dir=cache_dir), out=tmp_path, all_pairs=True
        ),
        on_skip=lambda *s: skipped.append(s),
    )
    assert ("ghost", "synthetic", "weights not found; run `calbench models fetch ghost`") in skipped
    assert {(r["model"], r["dataset"]) for r in result.rows} >= {("tiny", "synthetic")}


@pytest.mark.e2e
def test_compare_all_cli_then_rerun_recomputes_nothing(tmp_path, cache_dir, missing_model):
    args = [
        "compare",
        "--all",
        "--methods",
        "zero-shot,coop-ls",
        "--seeds",
        "1",
        "--out",
        str(tmp_path),
        "--cache-dir",
        str(cache_dir),
        "--bootstrap",
        "50",
    ]
    first = runner.invoke(app, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "skipped ghost · synthetic: weights not found; run `calbench models fetch ghost`" in " ".join(
        first.output.split()
    )
    assert "2 run(s) computed" in first.output
    second = runner.invoke(app, args, catch_exceptions=False)
    assert "0 run(s) computed, 2 reused" in second.output
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").is_file()


@pytest.mark.e2e
def test_report_marks_the_best_ece_and_embeds_the_diagrams(tmp_path, cache_dir):
    run_compare(
        CompareRequest(
            grid=Grid(["zero-shot", "zero-shot+ts", "coop-ce"], [1, 2], method_params=FAST, bootstrap=50),
            context=RunContext(cache_dir=cache_dir),
            out=tmp_path,
        )
    )
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
    # a reliability diagram per method, and the pair's risk–coverage plot
    assert page.count("data:image/png;base64,") == 3 + 1 and "<b>ECE" in page


def test_report_of_a_missing_folder_is_one_line(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "does not exist; run `calbench compare" in result.output


@pytest.mark.e2e
def test_report_pivots_the_certification_table(tmp_path, cache_dir):
    run_compare(
        CompareRequest(
            grid=Grid(["zero-shot"], [1], bootstrap=0), context=RunContext(cache_dir=cache_dir), out=tmp_path
        )
    )
    header = "model,dataset,method,seed,shots,sigma,n0,n,alpha,subset,radius,certified_accuracy,abstain_rate\n"
    lines = [
        f"tiny,synthetic,promptsmooth,1,16,0.25,10,100,0.001,300,{r},{a},0.36\n"
        for r, a in [(0.0, 0.387), (0.25, 0.17), (0.5, 0.0)]
    ]
    (tmp_path / "certification.csv").write_text(header + "".join(lines))
    runner.invoke(app, ["report", str(tmp_path)], catch_exceptions=False)
    md = (tmp_path / "report.md").read_text()
    assert "| model | dataset | method | seed | sigma | n0 | n | alpha | subset | r=0 | r=0.25 | r=0.5 |" in md
    assert "| tiny | synthetic | promptsmooth | 1 | 0.25 | 10 | 100 | 0.001 | 300 | 38.7 | 17.0 | 0.0 |" in md


@pytest.mark.e2e
def test_report_shows_only_each_methods_latest_settings(tmp_path, cache_dir):
    base = dict(context=RunContext(cache_dir=cache_dir), out=tmp_path)
    old = run_compare(
        CompareRequest(grid=Grid(["zero-shot+ts"], [1], fewshot=FewShot(val_shots=2), bootstrap=0), **base)
    ).rows[0]
    new = run_compare(
        CompareRequest(grid=Grid(["zero-shot+ts"], [1], fewshot=FewShot(val_shots=8), bootstrap=0), **base)
    ).rows[0]
    assert old["config"] != new["config"] and old["ece"] != new["ece"]
    runner.invoke(app, ["report", str(tmp_path)], catch_exceptions=False)
    md = (tmp_path / "report.md").read_text()
    assert (
        f"| zero-shot+ts | **ECE {100 * new['ece']:.2f} / Acc {100 * new['accuracy']:.2f}** |" in md
    )  # one seed: no ± at all
    assert "1 older run(s) with other settings are in results.csv but not shown" in md


@pytest.mark.e2e
def test_going_back_to_earlier_settings_puts_them_back_in_the_report(tmp_path, cache_dir):
    base = dict(context=RunContext(cache_dir=cache_dir), out=tmp_path)
    grid = Grid(["zero-shot+ts"], [1], fewshot=FewShot(val_shots=2), bootstrap=0)
    old = run_compare(CompareRequest(grid=grid, **base)).rows[0]
    run_compare(CompareRequest(grid=replace(grid, fewshot=FewShot(val_shots=8)), **base))
    again = run_compare(CompareRequest(grid=grid, **base))  # nothing to compute: reused, and now the latest
    assert again.computed == 0 and again.rows[0]["config"] == old["config"]
    runner.invoke(app, ["report", str(tmp_path)], catch_exceptions=False)
    assert (
        f"| zero-shot+ts | **ECE {100 * old['ece']:.2f} / Acc {100 * old['accuracy']:.2f}** |"
        in (tmp_path / "report.md").read_text()
    )


@pytest.mark.e2e
def test_spelled_out_validation_shots_are_the_same_config(tmp_path, cache_dir):
    base = dict(context=RunContext(cache_dir=cache_dir), out=tmp_path)
    run_compare(CompareRequest(grid=Grid(["zero-shot+ts"], [1], bootstrap=0), **base))
    assert (
        run_compare(
            CompareRequest(grid=Grid(["zero-shot+ts"], [1], FewShot(val_shots=8), bootstrap=0), **base)
        ).computed
        == 0
    )


@pytest.mark.parametrize(
    "grid, message",
    [
        (Grid(["zero-shot", "zero-shot"], [1]), "--methods names zero-shot more than once; name each once"),
        (Grid(["zero-shot"], [1, 2, 1]), "--seeds names 1 more than once; name each once"),
    ],
)
def test_a_repeated_method_or_seed_is_refused(tmp_path, grid, message):
    with pytest.raises(CalbenchError, match=message):
        run_compare(CompareRequest(grid=grid, out=tmp_path))
    assert not (tmp_path / "results.csv").exists()


class _Spy(LogitMethod):
    """Records what it is fitted on, and predicts like zero-shot."""

    seen: list = []

    def fit(self, data):
        _Spy.seen.append(data)
        self._zero_shot = METHODS.get("zero-shot").factory().fit(data)
        return self

    def predict_logits(self, inputs):
        return self._zero_shot.predict_logits(inputs)


@pytest.mark.e2e
def test_fitting_never_sees_a_test_image(tmp_path, cache_dir):
    from calbench.session import Session

    with METHODS.temporarily("spy", MethodSpec("spy", "test double", _Spy)):
        run_compare(
            CompareRequest(
                grid=Grid(["spy", "spy+ts"], [1, 2], bootstrap=0), context=RunContext(cache_dir=cache_dir), out=tmp_path
            )
        )
    test = Session("tiny", "synthetic", RunContext(cache_dir=cache_dir)).test_features()
    assert len(_Spy.seen) == 2  # one fit per seed; +ts reuses it
    for data in _Spy.seen:
        seen = [data.train_features.flatten(0, 1), data.val_features, *(t.flatten(0, -2) for t in data.extra.values())]
        for features in seen:  # no row of what fitting sees is a test image's features
            assert not (torch.cdist(features.float(), test.float()) < 1e-6).any()


@pytest.mark.e2e
def test_spelling_out_a_default_is_the_same_config_and_changing_one_is_not(tmp_path, cache_dir):
    base = dict(context=RunContext(cache_dir=cache_dir), out=tmp_path)
    first = run_compare(
        CompareRequest(grid=Grid(["coop-ls"], [1], bootstrap=0, method_params={"coop-ls": {"epochs": 2}}), **base)
    )
    same = run_compare(
        CompareRequest(
            grid=Grid(
                ["coop-ls"], [1], bootstrap=0, method_params={"coop-ls": {"epochs": 2, "alpha": 0.05, "lr": 0.002}}
            ),
            **base,
        )
    )
    other = run_compare(
        CompareRequest(
            grid=Grid(["coop-ls"], [1], bootstrap=0, method_params={"coop-ls": {"epochs": 2, "alpha": 0.1}}), **base
        )
    )
    assert same.computed == 0 and other.computed == 1
    assert other.rows[0]["config"] != first.rows[0]["config"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "params, message",
    [
        ({"coop-lss": {"alpha": 0.1}}, "--params names 'coop-lss', which is not a base method"),
        ({"coop-ls": {"alpha": "x"}}, "coop-ls alpha must be a number, got 'x'"),
        ({"coop-ce": {"epochs": "2"}}, "training option epochs='2' must be int"),
    ],
)
def test_bad_parameters_are_refused_before_any_work(tmp_path, cache_dir, params, message):
    with pytest.raises(CalbenchError, match=message):
        run_compare(
            CompareRequest(
                grid=Grid(["coop-ce"], [1], method_params=params), context=RunContext(cache_dir=cache_dir), out=tmp_path
            )
        )
    assert not (tmp_path / "results.csv").exists()


@pytest.fixture()
def broken_calibrator():
    from calbench.base import CALIBRATORS

    class Broken:
        def fit(self, logits, labels):
            raise ValueError("calibrator exploded")

    with CALIBRATORS.temporarily("broken", Broken) as name:
        yield name


@pytest.mark.e2e
def test_a_failing_calibrator_fails_only_its_own_row(tmp_path, cache_dir, broken_calibrator):
    result = run_compare(
        CompareRequest(
            grid=Grid(["zero-shot+broken", "zero-shot+ts", "zero-shot"], [1], bootstrap=0),
            context=RunContext(cache_dir=cache_dir),
            out=tmp_path,
        )
    )
    status = {r["method"]: (r["status"], r["error"]) for r in result.rows}
    assert status == {
        "zero-shot+broken": ("failed", "ValueError: calibrator exploded"),
        "zero-shot+ts": ("ok", ""),
        "zero-shot": ("ok", ""),
    }


@pytest.mark.e2e
def test_failed_rows_are_retried_on_the_next_run(tmp_path, cache_dir, exploding_method):
    args = dict(
        grid=Grid(["exploding", "zero-shot"], [1], bootstrap=0), context=RunContext(cache_dir=cache_dir), out=tmp_path
    )
    assert run_compare(CompareRequest(**args)).computed == 2
    assert run_compare(CompareRequest(**args)).computed == 1  # zero-shot is reused, the failed run is tried again


def test_two_runs_writing_one_results_file_keep_each_others_rows(tmp_path):
    from calbench.results import ResultsStore

    a, b = ResultsStore(tmp_path), ResultsStore(tmp_path)  # both opened before either writes
    row = {
        "model": "m",
        "dataset": "d",
        "seed": 1,
        "config": "c",
        "status": "ok",
        "error": "",
        "ece_ci_low": 0.0,
        "ece_ci_high": 0.0,
    }
    row.update(
        {k: 0.5 for k in ("accuracy", "ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier", "macro_f1")}
    )
    a.put({**row, "method": "x"})
    b.put({**row, "method": "y"})
    assert sorted(r["method"] for r in read_results(tmp_path / "results.csv")) == ["x", "y"]


def test_a_foreign_csv_is_not_a_results_file(tmp_path):
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "is not a calbench results.csv (no column 'model')" in result.output
