"""The comparison grid: resume, failures, --all with skipped pairs, and the report."""

import csv
import errno
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import FAST_ARGS, cli, one_error, one_line
from typer.testing import CliRunner

from calbench.base import METHODS, LogitMethod, MethodSpec
from calbench.cli.app import app
from calbench.compare import CompareRequest, Grid, degenerate_reason, run_compare, score
from calbench.errors import CalbenchError, CalbenchWarning
from calbench.methods import list_calibrators
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


# --- file-system errors ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, cache_dir):
    (tmp_path / "taken").write_text("mine\n")
    result = cli("compare", *FAST_ARGS, "--out", tmp_path / "taken", "--cache-dir", cache_dir)
    one_error(
        result,
        f"cannot create {tmp_path / 'taken'}: it is a file, not a folder; move that file away or pass --out elsewhere",
    )
    assert (tmp_path / "taken").read_text() == "mine\n"
    assert "run(s) computed" not in result.output and "image views encoded" not in result.output


@pytest.mark.e2e
@pytest.mark.parametrize("option", ["--out", "--cache-dir"])
def test_a_file_in_the_path_names_the_file_and_the_option(tmp_path, cache_dir, option):
    (tmp_path / "taken").write_text("mine\n")
    paths = {"--out": tmp_path / "out", "--cache-dir": cache_dir}
    paths[option] = tmp_path / "taken" / "inside"
    result = cli("compare", *FAST_ARGS, "--out", paths["--out"], "--cache-dir", paths["--cache-dir"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line.startswith("error: cannot ") and f"{tmp_path / 'taken'} is a file, not a folder" in line
    assert line.endswith(f"move that file away or pass {option} elsewhere")


@pytest.mark.parametrize("command", [["compare", *FAST_ARGS], ["train", "--method", "coop-ce", "--shots", "1"]])
@pytest.mark.parametrize("link", ["loop", "dangling"])
def test_an_out_that_is_a_broken_symbolic_link_is_one_line(tmp_path, cache_dir, command, link):
    if link == "loop":
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
        why = "it is a symbolic link loop"
    else:
        (tmp_path / "a").symlink_to(tmp_path / "nowhere" / "x")
        why = f"it is a symbolic link to {tmp_path / 'nowhere' / 'x'}, which does not exist"
    result = cli(*command, "--out", tmp_path / "a", "--cache-dir", cache_dir)
    one_error(result, f"cannot use {tmp_path / 'a'}: {why}; remove the link, or pass --out elsewhere")


@pytest.mark.e2e
def test_read_only_out_folder_is_refused_before_any_work(tmp_path, cache_dir, monkeypatch):
    out = tmp_path / "ro"
    real = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == out or out in self.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    result = cli("compare", *FAST_ARGS, "--out", out, "--cache-dir", cache_dir)
    one_error(result, f"cannot write {out}: read-only file system; pass --out on a writable disk")
    assert "image views encoded" not in result.output


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    """A results folder with one finished run (zero-shot, seed 1) and its prediction file."""
    out = tmp_path_factory.mktemp("finished") / "out"
    result = cli("compare", *FAST_ARGS, "--out", out, "--cache-dir", cache_dir)
    assert result.exit_code == 0, result.output
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["results.csv", "predictions"])
def test_full_disk_is_one_line_and_results_csv_stays_intact(finished, tmp_path, cache_dir, monkeypatch, target):
    out = _copy(finished, tmp_path)
    before = (out / "results.csv").read_bytes()
    real_write = pathlib.Path.write_text

    def full_text(self, *args, **kwargs):  # a write to an open file names no path, as on a real full disk
        if self.name.startswith(".results.csv-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    def full_npy(file, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if target == "results.csv":
        monkeypatch.setattr(pathlib.Path, "write_text", full_text)
    else:
        monkeypatch.setattr(np, "save", full_npy)
    result = cli(
        "compare",
        "--methods",
        "zero-shot",
        "--seeds",
        "1,2",
        "--bootstrap",
        "0",
        "--out",
        out,
        "--cache-dir",
        cache_dir,
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    culprit = out / "results.csv" if target == "results.csv" else out / "predictions"
    assert line.startswith(f"error: cannot write {culprit}")
    assert line.endswith(": no space left on device; free space or pass --out on another disk")
    assert (out / "results.csv").read_bytes() == before  # the finished run is kept, byte for byte
    assert not [p for p in out.rglob("*.tmp")]  # no temp file left behind


# --- results.csv and certification.csv ----------------------------------------------------------------


@pytest.mark.e2e
def test_compare_recomputes_a_run_whose_row_was_cut_short(finished, tmp_path, cache_dir):
    out = _copy(finished, tmp_path)
    path = out / "results.csv"
    path.write_bytes(path.read_bytes()[:-7])
    result = cli("compare", *FAST_ARGS, "--out", out, "--cache-dir", cache_dir)
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert f"warning: {path} line 2 is damaged (cut short: no line break at the end of the file)" in result.output
    assert "1 run(s) computed, 0 reused" in result.output
    assert path.read_bytes() == (finished / "results.csv").read_bytes()


# --- damaged prediction files -----------------------------------------------------------------------

PREDICTION_DAMAGES = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:200]),
    "random bytes": lambda path: path.write_bytes(np.random.default_rng(0).bytes(400)),
    "wrong shape": lambda path: np.save(path, np.full((7, 5), 0.2, dtype=np.float32)),
    "object array": lambda path: np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True),
    "empty": lambda path: path.write_bytes(b""),
}


@pytest.mark.e2e
@pytest.mark.parametrize("damage", PREDICTION_DAMAGES)
def test_a_damaged_prediction_file_is_recomputed_not_blocking(finished, tmp_path, cache_dir, damage):
    out = _copy(finished, tmp_path)
    (npy,) = (out / "predictions").glob("*.npy")
    good = np.load(npy)
    PREDICTION_DAMAGES[damage](npy)
    result = cli("compare", *FAST_ARGS, "--out", out, "--cache-dir", cache_dir)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output
    assert f"warning: predictions file {npy} is damaged (" in result.output
    assert "computing its run again" in result.output and "1 run(s) computed, 0 reused" in result.output
    assert np.array_equal(np.load(npy, allow_pickle=False), good)
    assert (out / "results.csv").read_bytes() == (finished / "results.csv").read_bytes()


# --- warnings the user must see -----------------------------------------------------------------------


@pytest.mark.e2e
def test_warnings_show_even_under_pythonwarnings_ignore(finished, tmp_path, cache_dir):
    out = _copy(finished, tmp_path)
    (npy,) = (out / "predictions").glob("*.npy")
    npy.write_bytes(b"")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CALBENCH_CACHE": str(cache_dir)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "calbench.cli.app",
            "compare",
            *FAST_ARGS,
            "--out",
            str(out),
            "--cache-dir",
            str(cache_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert lines == [
        f"warning: predictions file {npy} is damaged (unreadable: No data left in file); computing its run again"
    ]
    assert "Traceback" not in done.stderr


def test_a_warning_every_run_of_a_grid_gives_is_shown_once(tmp_path, cache_dir):
    """Six validation cases cannot calibrate sets at alpha 0.1 (nine are needed): said once, not once per run."""
    result = cli(
        "compare", "--methods", "zero-shot,zero-shot+ts", "--seeds", "1,2", "--shots", "2", "--val-shots", "1",
        "--bootstrap", "0", "--out", tmp_path / "out", "--cache-dir", cache_dir,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert lines == [
        "warning: --conformal-alpha 0.1 needs at least 9 validation cases and this run has 6: no finite threshold, "
        "so every conformal set holds every class; pass more --val-shots or a larger --conformal-alpha"
    ]


# --- every calibrator on two classes -----------------------------------------------------------


@pytest.mark.e2e
def test_compare_on_a_two_class_dataset_gives_ok_rows_for_every_calibrator(tmp_path, binary_folder, cache_dir):
    methods = ["coop-ce", *(f"coop-ce+{c}" for c in list_calibrators())]
    result = run_compare(
        CompareRequest(
            model="tiny",
            data=str(binary_folder),
            grid=Grid(methods, [1], FewShot(shots=4, views=1), bootstrap=0, method_params={"coop-ce": {"epochs": 2}}),
            context=RunContext(device="cpu", cache_dir=cache_dir),
            out=tmp_path,
        )
    )
    assert {r["method"]: r["status"] for r in result.rows} == dict.fromkeys(methods, "ok")


# --- parameters outside their declared range -------------------------------------------------


def test_an_out_of_range_parameter_stops_compare_before_any_work(tmp_path, cache_dir):
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"coop-ls": {"alpha": 1.5}}))
    out = tmp_path / "out"
    args = ["compare", "--methods", "coop-ls", "--seeds", "1", "--params", str(params), "--out", str(out)]
    result = runner.invoke(app, [*args, "--cache-dir", str(cache_dir)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: coop-ls alpha=1.5 is outside [0, 1); pass a value in that range" in one_line(result.output)
    assert not (out / "results.csv").exists()


# --- degenerate runs --------------------------------------------------------------------------


class _Uniform(LogitMethod):
    """A method whose prompt learned nothing: the same logit for every class."""

    def fit(self, data):
        self.n_classes = len(data.classnames)
        return self

    def predict_logits(self, features):
        return torch.zeros(features.shape[0], self.n_classes)


@pytest.fixture()
def uniform_method():
    with METHODS.temporarily("uniform", MethodSpec("uniform", "test double", _Uniform)) as name:
        yield name


def test_near_uniform_predictions_are_degenerate_and_keep_their_metrics():
    uniform = np.full((6, 5), 0.2)
    uniform[:, 0] += 0.0009  # within 1e-3 of 1/C
    uniform[:, 1:] -= 0.0009 / 4
    row = score(uniform, np.arange(6) % 5, 1, 10, 0)
    assert row["status"] == "degenerate" and math.isfinite(row["ece"]) and row["accuracy"] == pytest.approx(2 / 6)
    assert row["error"] == (
        "near-uniform predictions: every test item's top probability is within 0.001 of 1/5; "
        "the method learned nothing (check epochs, lr and loss weights)"
    )
    one_sure = uniform.copy()
    one_sure[0] = [0.9, 0.025, 0.025, 0.025, 0.025]
    assert degenerate_reason(one_sure) == "" and score(one_sure, np.arange(6) % 5, 1, 10, 0)["status"] == "ok"


@pytest.mark.e2e
def test_a_degenerate_run_is_flagged_reused_and_never_the_best_ece(tmp_path, cache_dir, uniform_method):
    args = dict(grid=Grid(["uniform", "zero-shot"], [1], bootstrap=0), context=RunContext(cache_dir=cache_dir))
    with pytest.warns(CalbenchWarning, match=r"tiny · synthetic · uniform \(seed 1\) is degenerate: near-uniform"):
        first = run_compare(CompareRequest(out=tmp_path, **args))
    status = {r["method"]: r["status"] for r in first.rows}
    assert status == {"uniform": "degenerate", "zero-shot": "ok"}
    assert [r["method"] for r in first.degenerate] == ["uniform"] and first.failures == []
    (uniform,) = first.degenerate
    assert uniform["ece"] < min(r["ece"] for r in first.rows if r["method"] == "zero-shot")  # lowest ECE, at chance
    with pytest.warns(CalbenchWarning):
        assert (
            run_compare(CompareRequest(out=tmp_path, **args)).computed == 0
        )  # reused: the same settings collapse again
    result = runner.invoke(app, ["report", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0
    md = (tmp_path / "report.md").read_text()
    assert next(line for line in md.splitlines() if line.startswith("| uniform |")).endswith("(degenerate) |")
    assert "**ECE" in next(line for line in md.splitlines() if line.startswith("| zero-shot |"))
    assert "| degenerate: near-uniform predictions" in md
    assert (tmp_path / "reliability" / "tiny_synthetic_uniform.png").is_file()


@pytest.mark.e2e
def test_the_cli_prints_a_degenerate_run_as_degenerate(tmp_path, cache_dir, uniform_method):
    args = ["compare", "--methods", "uniform", "--seeds", "1", "--bootstrap", "0", "--out", str(tmp_path)]
    result = runner.invoke(app, [*args, "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert "warning: tiny · synthetic · uniform (seed 1) is degenerate: near-uniform predictions" in one_line(
        result.output
    )
    assert "failed:" not in result.output


# --- --params shapes ---------------------------------------------------------------------------


def _folder(tmp_path):
    (tmp_path / "params").mkdir()
    return tmp_path / "params", "is a folder; pass a JSON file such as best_params.json"


def _latin1(tmp_path):
    path = tmp_path / "params.json"
    path.write_bytes('{"coop-ce": {"ctx_init": "caf\u00e9"}}'.encode("latin-1"))
    return path, "is not UTF-8 text; save it as UTF-8 JSON"


def _nested(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"coop-ce": [1]}))
    return path, None


@pytest.mark.parametrize("make", [_folder, _latin1, _nested])
def test_a_bad_params_file_stops_the_cli_with_one_line(tmp_path, cache_dir, make):
    path, problem = make(tmp_path)
    line = (
        f"error: parameter file {path} {problem}"
        if problem
        else f'error: {path}: coop-ce must map to an object of parameters like {{"alpha": 0.1}}, got [1]'
    )
    args = ["compare", "--methods", "coop-ce", "--seeds", "1", "--params", str(path), "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--cache-dir", str(cache_dir)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert line in one_line(result.output)
    assert not (tmp_path / "out").exists()


# --- two dataset folders with one name ---------------------------------------------------------


def _same_name_pair(binary_folder, tmp_path, copy=shutil.copy):
    """a/data and b/data: the same layout, b with one test image changed (so other files)."""
    a, b = tmp_path / "a" / "data", tmp_path / "b" / "data"
    shutil.copytree(binary_folder, a, copy_function=copy)
    shutil.copytree(binary_folder, b, copy_function=copy)
    if copy is shutil.copy:
        image = sorted((b / "images" / "test").rglob("*.png"))[0]
        image.write_bytes(sorted((b / "images" / "test").rglob("*.png"))[1].read_bytes())
    return a, b


def _compare(data, out, cache_dir):
    args = ["compare", "--data", str(data), "--methods", "zero-shot,zero-shot+ts", "--seeds", "1"]
    result = runner.invoke(
        app,
        [*args, "--shots", "2", "--views", "1", "--bootstrap", "0", "--out", str(out), "--cache-dir", str(cache_dir)],
    )
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.e2e
def test_two_datasets_with_one_name_get_two_columns_and_two_diagrams(tmp_path, binary_folder, cache_dir):
    a, b = _same_name_pair(binary_folder, tmp_path)
    out = tmp_path / "out"
    _compare(a, out, cache_dir)
    assert "| method | tiny · data |" in (out / "report.md").read_text()  # alone: the plain name
    assert sorted(p.name for p in (out / "reliability").iterdir()) == [
        "tiny_data_zero-shot.png",
        "tiny_data_zero-shot_ts.png",
    ]
    _compare(b, out, cache_dir)
    rows = read_results(out / "results.csv")
    ids = list(dict.fromkeys(r["dataset_id"] for r in rows))  # a's, then b's
    assert len(rows) == 4 and len(ids) == 2 and all(len(i) == 6 for i in ids)
    md = (out / "report.md").read_text()
    assert f"| method | tiny · data ({ids[0]}) | tiny · data ({ids[1]}) |" in md
    assert sorted(p.name for p in (out / "reliability").iterdir()) == sorted(
        f"tiny_data-{i}_{m}.png" for i in ids for m in ("zero-shot", "zero-shot_ts")
    )
    assert f"![tiny · data ({ids[0]}) · zero-shot+ts]" in md.replace("\\", "")


@pytest.mark.e2e
def test_exact_copies_are_one_dataset(tmp_path, binary_folder, cache_dir):
    """Same files (names, sizes, modification times) give the same numbers: one identity, rows shared."""
    a, b = _same_name_pair(binary_folder, tmp_path, copy=shutil.copy2)
    out = tmp_path / "out"
    _compare(a, out, cache_dir)
    assert "0 run(s) computed, 2 reused" in one_line(_compare(b, out, cache_dir).output)
    assert "| method | tiny · data |" in (out / "report.md").read_text()


@pytest.mark.e2e
def test_results_written_before_the_identity_column_are_computed_again(tmp_path, binary_folder, cache_dir):
    """No migration code: a row that does not name its dataset's files cannot be told apart from another
    dataset's of the same name, so its run is computed again (and the row then names them)."""
    out = tmp_path / "out"
    _compare(binary_folder, out, cache_dir)
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    old_columns = [c for c in RESULT_COLUMNS if c != "dataset_id"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, old_columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    assert {r["dataset_id"] for r in read_results(out / "results.csv")} == {""}
    again = _compare(binary_folder, out, cache_dir)
    assert again.exit_code == 0 and "2 run(s) computed, 0 reused" in one_line(again.output)
    assert {r["dataset_id"] for r in read_results(out / "results.csv")} == {rows[0]["dataset_id"]}
