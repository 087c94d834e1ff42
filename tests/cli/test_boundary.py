"""The CLI's error boundary: every user-facing failure is one line and a non-zero exit, never a traceback;
a real bug stays a traceback and says how to report it. Bad seeds and NaN options are refused before any work."""

import sys

import pytest
from cli_checks import FAST_ARGS, cli, one_error

# --- bugs and memory -----------------------------------------------------------------------------------


def _cpu_allocation_error() -> RuntimeError:
    """What torch itself raises when the CPU allocator fails: a RuntimeError, not a MemoryError."""
    import torch

    try:
        torch.empty(10**14)  # 400 TB: refused at once
    except RuntimeError as exc:
        return exc
    raise AssertionError("torch allocated 400 TB")


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
    one_error(cli("compare", *FAST_ARGS), message)


def test_an_unrelated_runtime_error_is_still_a_bug(monkeypatch):
    import calbench.compare

    def run_compare(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(calbench.compare, "run_compare", run_compare)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli("compare", *FAST_ARGS)


# --- seeds ------------------------------------------------------------------------------------------

SEED_RANGE = "takes seeds from 0 to 4294967295 (2**32 - 1)"


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
    result = cli(*args, *extra)
    one_error(result, f"{option} {SEED_RANGE}; got {value}")
    assert not out.exists()


# --- NaN and infinite options -----------------------------------------------------------------------


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
    one_error(cli(*args, "--out", out), message)
    assert not out.exists()  # no study was created, so a later valid run is not "created with other settings"
