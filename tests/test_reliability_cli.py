"""Issue 11, section 2: every user-facing failure is one line and a non-zero exit, never a traceback.

File-system errors (read-only or full disks are simulated by monkeypatching: the tests run as
root, which ignores chmod), bad seeds, NaN options, damaged results.csv / certification.csv
rows and damaged prediction files, warnings under PYTHONWARNINGS=ignore, and real bugs.
"""

from __future__ import annotations

import errno
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import calbench.atomic
from calbench.cli.app import app
from calbench.errors import CalbenchError, CalbenchWarning, check_seed, describe_os_error
from calbench.results import ResultsStore, read_certification, read_results

runner = CliRunner()
FAST = ["--methods", "zero-shot", "--seeds", "1", "--bootstrap", "0"]
SEED_RANGE = "takes seeds from 0 to 4294967295 (2**32 - 1)"


def _cli(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _one_error(result, message: str, code: int = 2) -> None:
    """Exactly one ``error:`` line with ``message``, the exit code, and no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [f"error: {message}"]


# --- 1. file-system errors ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, cache_dir):
    (tmp_path / "taken").write_text("mine\n")
    result = _cli("compare", *FAST, "--out", tmp_path / "taken", "--cache-dir", cache_dir)
    _one_error(
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
    result = _cli("compare", *FAST, "--out", paths["--out"], "--cache-dir", paths["--cache-dir"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line.startswith("error: cannot ") and f"{tmp_path / 'taken'} is a file, not a folder" in line
    assert line.endswith(f"move that file away or pass {option} elsewhere")


@pytest.mark.parametrize("command", [["compare", *FAST], ["train", "--method", "coop-ce", "--shots", "1"]])
@pytest.mark.parametrize("link", ["loop", "dangling"])
def test_an_out_that_is_a_broken_symbolic_link_is_one_line(tmp_path, cache_dir, command, link):
    if link == "loop":
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
        why = "it is a symbolic link loop"
    else:
        (tmp_path / "a").symlink_to(tmp_path / "nowhere" / "x")
        why = f"it is a symbolic link to {tmp_path / 'nowhere' / 'x'}, which does not exist"
    result = _cli(*command, "--out", tmp_path / "a", "--cache-dir", cache_dir)
    _one_error(result, f"cannot use {tmp_path / 'a'}: {why}; remove the link, or pass --out elsewhere")


@pytest.mark.e2e
def test_read_only_out_folder_is_refused_before_any_work(tmp_path, cache_dir, monkeypatch):
    out = tmp_path / "ro"
    real = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == out or out in self.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    result = _cli("compare", *FAST, "--out", out, "--cache-dir", cache_dir)
    _one_error(result, f"cannot write {out}: read-only file system; pass --out on a writable disk")
    assert "image views encoded" not in result.output


def _fail_temp_files(monkeypatch, under: Path, code: int) -> None:
    """Atomic writes under ``under`` fail as on a read-only (or full) disk: mkstemp raises, naming its temp file."""
    real = tempfile.mkstemp

    def failing(suffix=None, prefix=None, dir=None, text=False):
        if dir is not None and (Path(dir) == under or under in Path(dir).parents):
            raise OSError(code, os.strerror(code), str(Path(dir) / f"{prefix}abcd1234{suffix}"))
        return real(suffix=suffix, prefix=prefix, dir=dir, text=text)

    monkeypatch.setattr(calbench.atomic.tempfile, "mkstemp", failing)


@pytest.mark.e2e
def test_read_only_cache_with_a_miss_names_the_cache_file(tmp_path, cache_dir, monkeypatch):
    cache = tmp_path / "cache"
    _cli("datasets", "check", "synthetic", "--cache-dir", cache)  # the dataset is there; its features are not
    _fail_temp_files(monkeypatch, cache / "features", errno.EROFS)
    result = _cli("compare", *FAST, "--out", tmp_path / "out", "--cache-dir", cache)
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: cannot write {cache / 'features'}{os.sep}")
    assert ".tmp" not in line  # the file being written, not the temp file
    assert line.endswith(": read-only file system; pass --cache-dir on a writable disk")
    assert read_results(tmp_path / "out" / "results.csv") == []


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    """A results folder with one finished run (zero-shot, seed 1) and its prediction file."""
    out = tmp_path_factory.mktemp("finished") / "out"
    result = _cli("compare", *FAST, "--out", out, "--cache-dir", cache_dir)
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
    result = _cli(
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


@pytest.mark.e2e
@pytest.mark.parametrize("storage", ["{folder}", "journal:{folder}", "sqlite:///{folder}"])
def test_storage_that_is_a_folder_is_one_line(tmp_path, storage):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    url = storage.format(folder=folder)
    result = _cli("tune", "--trials", "1", "--epochs", "1", "--storage", url, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: --storage {url} ") and "folder" in line
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(
    "code, culprit, message",
    [
        (
            errno.ENOSPC,
            "r/.results.csv-abcd1234.tmp",
            "cannot write r/results.csv: no space left on device; free space or pass --out on another disk",
        ),
        (errno.EROFS, "r/x.npy", "cannot write r/x.npy: read-only file system; pass --out on a writable disk"),
        (errno.EACCES, "r", "cannot access r: permission denied; fix its permissions or pass --out you can write to"),
        (errno.EISDIR, "r", "cannot use r: it is a folder, not a file; pass --out a file path instead"),
        (errno.EMFILE, "r", "cannot open r: too many open files; raise the limit with `ulimit -n`"),
        (errno.EXDEV, "r", "cannot use r: invalid cross-device link; check the path"),
    ],
)
def test_each_os_error_says_what_failed_and_what_to_do(code, culprit, message):
    assert describe_os_error(OSError(code, os.strerror(code), culprit), "--out") == message


def _cpu_allocation_error() -> RuntimeError:
    """What torch itself raises when the CPU allocator fails: a RuntimeError, not a MemoryError."""
    import torch

    try:
        torch.empty(10**14)  # 400 TB: refused at once
    except RuntimeError as exc:
        return exc
    raise AssertionError("torch allocated 400 TB")


@pytest.mark.parametrize(
    "exc, message",
    [
        (OSError("cannot identify image file 'a.png'"), "cannot identify image file 'a.png'; check the file it names"),
        (
            ConnectionError("Connection refused"),
            "network error (Connection refused); check the connection and try again",
        ),
    ],
)
def test_an_os_error_of_a_library_keeps_its_own_words(exc, message):
    assert describe_os_error(exc) == message


def test_an_os_error_without_a_path_still_says_what_to_do():
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device")) == (
        "cannot write a file: no space left on device; free space or choose a folder on another disk"
    )


# --- bugs and memory -----------------------------------------------------------------------------------


def test_a_bug_stays_a_traceback_then_says_how_to_report_it(monkeypatch, capsys):
    import calbench.cli.app as cli_app

    def buggy() -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli_app, "app", buggy)
    monkeypatch.setattr(sys, "argv", ["calbench", "compare", "--seeds", "1"])
    with pytest.raises(SystemExit) as exit_info:
        cli_app.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err
    assert err.strip().splitlines()[-1] == (
        "this is a bug in calbench, not in your input: please report it with the command line "
        "(calbench compare --seeds 1) and the traceback above"
    )


@pytest.mark.parametrize(
    "exc, message",
    [
        (MemoryError(), "out of memory; close other programs, or run on a machine with more memory"),
        (_cpu_allocation_error(), "out of memory; close other programs, or run on a machine with more memory"),
        (
            type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"),
            "the GPU ran out of memory; free it from other jobs, or pass --device cpu",
        ),
    ],
)
def test_running_out_of_memory_is_one_line(monkeypatch, exc, message):
    import calbench.compare

    def run_compare(*args, **kwargs):
        raise exc

    monkeypatch.setattr(calbench.compare, "run_compare", run_compare)
    _one_error(_cli("compare", *FAST), message)


def test_an_unrelated_runtime_error_is_still_a_bug(monkeypatch):
    import calbench.compare

    def run_compare(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(calbench.compare, "run_compare", run_compare)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        _cli("compare", *FAST)


# --- 2. seeds ------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args, option, value",
    [
        (["compare", "--seeds", "1,-1"], "--seeds", "-1"),
        (["compare", "--seeds", str(10**20)], "--seeds", str(10**20)),
        (["train", "--seed", "-5"], "--seed", "-5"),
        (["train", "--seed", str(2**32)], "--seed", str(2**32)),
        (["cache", "--seeds", "-1"], "--seeds", "-1"),
        (["certify", "--seed", "-1"], "--seed", "-1"),
        (["tune", "--split-seeds", "-1"], "--split-seeds", "-1"),
        (["tune", "--final-seeds", str(10**20)], "--final-seeds", str(10**20)),
        (["data", "prepare", "covid", "--archive", "/no/such.zip", "--seed", "-1"], "--seed", "-1"),
    ],
)
def test_a_seed_out_of_range_is_refused_before_any_work(tmp_path, cache_dir, args, option, value):
    out = tmp_path / "out"
    extra = {"cache": ["--cache-dir", cache_dir], "data": ["--out", out]}.get(
        args[0], ["--out", out, "--cache-dir", cache_dir]
    )
    result = _cli(*args, *extra)
    _one_error(result, f"{option} {SEED_RANGE}; got {value}")
    assert not out.exists()


def test_library_entry_points_check_seeds_too():
    from calbench.compare import Grid
    from calbench.tune import TuneConfig

    with pytest.raises(CalbenchError, match=r"^--seeds takes seeds from 0 to 4294967295 \(2\*\*32 - 1\); got -1$"):
        Grid(["zero-shot"], [-1]).check()
    with pytest.raises(CalbenchError, match=r"^--split-seeds takes seeds .*; got 100000000000000000000$"):
        TuneConfig(split_seeds=[10**20])
    assert check_seed(2**32 - 1) == 2**32 - 1 and check_seed(np.int64(0)) == 0
    for bad in (True, 1.5, "1", -1, 2**32):
        with pytest.raises(CalbenchError):
            check_seed(bad)


# --- 3. results.csv and certification.csv ----------------------------------------------------------------


def _row(method: str, **overrides: object) -> dict:
    row = {"model": "m", "dataset": "d", "method": method, "seed": 1, "config": "c", "status": "ok", "error": ""}
    row.update(
        {k: 0.5 for k in ("accuracy", "ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier", "macro_f1")}
    )
    row.update({"ece_ci_low": 0.25, "ece_ci_high": 0.75})
    return {**row, **overrides}


DAMAGES = {
    "not UTF-8": (lambda line: line.replace(b"broken", b"br\xff\xfeoken"), "bytes that are not UTF-8"),
    "seed": (lambda line: line.replace(b",broken,1,", b",broken,one,"), "seed 'one' is not a whole number"),
    "metric": (lambda line: line.replace(b",broken,1,0.5,", b",broken,1,high,"), "accuracy 'high' is not a number"),
    "cut short": (lambda line: line[: len(line) // 2], "cut short: no line break at the end of the file"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_results_row_is_dropped_with_a_warning_and_rewritten_away(tmp_path, damage):
    ResultsStore(tmp_path).put_rows([_row("a"), _row("b"), _row("broken")])
    path = tmp_path / "results.csv"
    lines = path.read_bytes().splitlines(keepends=True)
    edit, why = DAMAGES[damage]
    damaged = b"".join(lines[:-1]) + edit(lines[-1])
    path.write_bytes(damaged)
    with pytest.warns(CalbenchWarning) as caught:
        store = ResultsStore(tmp_path)
    assert [str(w.message) for w in caught] == [
        f"{path} line 4 is damaged ({why}); dropped it, so its run is computed again"
    ]
    assert [r["method"] for r in store.rows] == ["a", "b"]  # the sound rows are kept, parsed
    assert store.rows[0]["seed"] == 1 and store.rows[0]["ece"] == 0.5
    with pytest.warns(CalbenchWarning, match="dropped 1 damaged row"):
        store.put_rows([_row("broken")])  # its run, computed again
    assert [r["method"] for r in read_results(path)] == ["a", "b", "broken"]
    assert (tmp_path / "results.csv.damaged").read_bytes() == damaged  # the file as it was is kept


@pytest.mark.parametrize("content", [b"a,b\n1,2\n", b"\x89PNG\r\n\x1a\n\x00\x00garbage\xff", b""])
def test_a_file_that_is_not_a_results_csv_keeps_its_one_line_error(tmp_path, content):
    (tmp_path / "results.csv").write_bytes(content)
    result = _cli("report", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is not a calbench results.csv (no column 'model')" in result.output
    assert (tmp_path / "results.csv").read_bytes() == content


def test_a_damaged_certification_row_is_dropped_with_a_warning(tmp_path):
    from calbench.results import put_certification

    base = {"model": "m", "dataset": "d", "method": "p", "seed": 1, "shots": 16, "sigma": 0.25, "n0": 10, "n": 100}
    base.update({"alpha": 0.001, "subset": 50, "certified_accuracy": 0.5, "abstain_rate": 0.1})
    path = put_certification(tmp_path, [{**base, "radius": r} for r in (0.0, 0.25, 0.5)])
    text = path.read_text().replace(",50,0.5,0.5,", ",50,oops,0.5,")  # the radius of the third row
    path.write_text(text)
    with pytest.warns(CalbenchWarning, match=r"line 4 is damaged \(radius 'oops' is not a number\)"):
        rows = read_certification(path)
    assert [row["radius"] for row in rows] == ["0.0", "0.25"]


@pytest.mark.e2e
def test_compare_recomputes_a_run_whose_row_was_cut_short(finished, tmp_path, cache_dir):
    out = _copy(finished, tmp_path)
    path = out / "results.csv"
    path.write_bytes(path.read_bytes()[:-7])
    result = _cli("compare", *FAST, "--out", out, "--cache-dir", cache_dir)
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert f"warning: {path} line 2 is damaged (cut short: no line break at the end of the file)" in result.output
    assert "1 run(s) computed, 0 reused" in result.output
    assert path.read_bytes() == (finished / "results.csv").read_bytes()


# --- 4. damaged prediction files -----------------------------------------------------------------------


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
    result = _cli("compare", *FAST, "--out", out, "--cache-dir", cache_dir)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output
    assert f"warning: predictions file {npy} is damaged (" in result.output
    assert "computing its run again" in result.output and "1 run(s) computed, 0 reused" in result.output
    assert np.array_equal(np.load(npy, allow_pickle=False), good)
    assert (out / "results.csv").read_bytes() == (finished / "results.csv").read_bytes()


def test_predictions_never_unpickle(tmp_path):
    store = ResultsStore(tmp_path)
    row = _row("x")
    store.predictions_path(row).parent.mkdir(parents=True)
    np.save(store.predictions_path(row), np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.warns(CalbenchWarning, match="Object arrays cannot be loaded when allow_pickle=False"):
        assert store.predictions(row) is None
    assert store.predictions_damaged(row) and not store.predictions_damaged(_row("missing"))


# --- 5. NaN and infinite options -----------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["tune", "--acc-tolerance", "nan"],
            "--acc-tolerance is accuracy points a trial may lose, from 0 to 100; got nan",
        ),
        (
            ["tune", "--acc-tolerance", "inf"],
            "--acc-tolerance is accuracy points a trial may lose, from 0 to 100; got inf",
        ),
        (
            ["tune", "--acc-tolerance", "-1"],
            "--acc-tolerance is accuracy points a trial may lose, from 0 to 100; got -1.0",
        ),
        (["certify", "--sigma", "inf"], "--sigma must be a positive finite number, got inf"),
        (["certify", "--sigma", "nan"], "--sigma must be a positive finite number, got nan"),
        (["certify", "--alpha", "nan"], "--alpha must be in (0, 1), got nan"),
    ],
)
def test_nan_and_infinite_options_are_refused_before_a_study_exists(tmp_path, args, message):
    out = tmp_path / "out"
    _one_error(_cli(*args, "--out", out), message)
    assert not out.exists()  # no study was created, so a later valid run is not "created with other settings"


@pytest.mark.e2e
def test_a_refused_nan_tolerance_leaves_the_study_usable(tmp_path, cache_dir):
    out = tmp_path / "out"
    common = ["--trials", "1", "--epochs", "1", "--final-seeds", "1", "--search-only", "--out", out]
    _one_error(
        _cli("tune", "--acc-tolerance", "nan", *common, "--cache-dir", cache_dir),
        message=("--acc-tolerance is accuracy points a trial may lose, from 0 to 100; got nan"),
    )
    result = _cli("tune", "--acc-tolerance", "1", *common, "--cache-dir", cache_dir)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("bound", [math.inf, -math.inf, "a"])
def test_a_space_file_bound_must_be_a_finite_number(bound):
    from calbench.tune import parse_space

    with pytest.raises(CalbenchError, match="lr needs finite numbers for low and high"):
        parse_space("calibprompt", {"lr": {"low": 1e-4, "high": bound}})


# --- 6. warnings the user must see -----------------------------------------------------------------------


@pytest.mark.e2e
def test_warnings_show_even_under_pythonwarnings_ignore(finished, tmp_path, cache_dir):
    out = _copy(finished, tmp_path)
    (npy,) = (out / "predictions").glob("*.npy")
    npy.write_bytes(b"")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CALBENCH_CACHE": str(cache_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "calbench.cli.app", "compare", *FAST, "--out", str(out), "--cache-dir", str(cache_dir)],
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
    result = _cli(
        "compare", "--methods", "zero-shot,zero-shot+ts", "--seeds", "1,2", "--shots", "2", "--val-shots", "1",
        "--bootstrap", "0", "--out", tmp_path / "out", "--cache-dir", cache_dir,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert lines == [
        "warning: --conformal-alpha 0.1 needs at least 9 validation cases and this run has 6: no finite threshold, "
        "so every conformal set holds every class; pass more --val-shots or a larger --conformal-alpha"
    ]
