import csv

import pytest
from typer.testing import CliRunner

from calbench.cli.app import app
from calbench.methods import DEFAULT_METHODS
from calbench.results import RESULT_COLUMNS

runner = CliRunner()

pytestmark = pytest.mark.e2e


def _run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("demo")
    first = _run("compare", "--seeds", "1", "--out", str(out / "a"), "--cache-dir", str(cache_dir / "cli"))
    second = _run("compare", "--seeds", "1", "--out", str(out / "b"), "--cache-dir", str(cache_dir / "cli"))
    return out, first, second


def test_compare_prints_every_method_and_writes_results(demo):
    out, first, _ = demo
    assert first.exit_code == 0, first.output
    for method in DEFAULT_METHODS:
        assert method in first.output
    with open(out / "a" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == RESULT_COLUMNS
    assert [r["method"] for r in rows] == DEFAULT_METHODS
    assert all(0.0 <= float(r["ece"]) <= 1.0 and 0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    assert {r["model"] for r in rows} == {"tiny"} and {r["dataset"] for r in rows} == {"synthetic"}
    pngs = sorted(p.name for p in (out / "a" / "reliability").glob("*.png"))
    assert len(pngs) == len(DEFAULT_METHODS) and "tiny_synthetic_coop-ce_ts.png" in pngs
    assert (out / "a" / "report.md").is_file() and (out / "a" / "report.html").is_file()


def test_second_compare_reuses_the_cache_and_repeats_the_numbers(demo):
    out, first, second = demo
    assert "image views encoded" in first.output
    assert "no image encoded" in second.output
    assert (out / "a" / "results.csv").read_text() == (out / "b" / "results.csv").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "--model", "plip2"], "error: unknown model 'plip2'; choose one of: "),
        (["compare", "--methods", "coop-ce,nope"], "error: unknown method 'nope'; choose one of:"),
        (["compare", "--data", "/no/such/folder"], "error: unknown dataset '/no/such/folder'"),
        (
            ["compare", "--shots", "60", "--seeds", "1"],
            "has 80 training images but 60 shots + 60 validation shots need 120",
        ),
        (["compare", "--seeds", "1,x"], "error: --seeds takes comma-separated integers"),
        (["train", "--method", "zero-shot"], "error: zero-shot learns no prompt"),
        (["compare", "--val-shots", "0"], "error: --val-shots must be at least 1"),
        (["compare", "--views", "0"], "error: --views takes 1 to 10000"),
        (["compare", "--views", "1000000000"], "error: --views takes 1 to 10000"),
        (["train", "--shots", "0"], "error: --shots must be at least 1"),
        (["cache", "--views", "-1"], "error: --views takes 1 to 10000"),
        (["compare", "--bootstrap", "-1"], "error: --bootstrap takes 0 (no interval) to 100000 resamples"),
        (["compare", "--bootstrap", "100000000"], "error: --bootstrap takes 0 (no interval) to 100000 resamples"),
        (["compare", "--methods", ""], "error: --methods is empty"),
        (["compare", "--device", "foo"], "error: unknown device 'foo'"),
        (["compare", "--params", "/no/such.json"], "error: parameter file /no/such.json does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cache_dir, args, message):
    result = _run(*args, "--cache-dir", str(cache_dir / "cli"))
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_train_saves_a_prompt_and_never_encodes_the_test_split(tmp_path):
    result = _run(
        "train",
        "--method",
        "calibprompt",
        "--seed",
        "2",
        "--out",
        str(tmp_path / "p"),
        "--cache-dir",
        str(tmp_path / "c"),
    )
    assert result.exit_code == 0, result.output
    assert "validation accuracy" in result.output
    assert (tmp_path / "p" / "calibprompt-tiny-synthetic-seed2.safetensors").is_file()
    written = [p.name for p in (tmp_path / "c" / "features").iterdir()]
    assert written and not [name for name in written if "-test-" in name]


def test_cache_models_and_datasets_commands(cache_dir):
    built = _run("cache", "--seeds", "5", "--cache-dir", str(cache_dir / "cli"))
    assert built.exit_code == 0 and "image views encoded" in built.output
    assert "tiny" in _run("models").output
    assert "synthetic" in _run("datasets").output


def test_rerunning_into_the_same_folder_computes_nothing(demo, cache_dir):
    out, _, _ = demo
    again = _run("compare", "--seeds", "1", "--out", str(out / "a"), "--cache-dir", str(cache_dir / "cli"))
    assert again.exit_code == 0
    assert "nothing to compute: every run is already in" in again.output
    assert "0 run(s) computed, 7 reused" in again.output


def test_epochs_no_machine_can_hold_are_one_line_before_any_work(tmp_path, cache_dir):
    """1e12 epochs asked for 1e12 cached views: the kernel killed the run at 22 GB with no output (exit 137)."""
    params = tmp_path / "params.json"
    params.write_text('{"coop-ce": {"epochs": 1e12}}')
    out = tmp_path / "out"
    result = _run(
        "compare",
        "--methods",
        "coop-ce",
        "--params",
        str(params),
        "--out",
        str(out),
        "--cache-dir",
        str(cache_dir / "cli"),
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (
        result.output.strip() == "error: coop-ce epochs=1000000000000 is outside [1, 10000]; pass a value in that range"
    )
    assert not out.exists()


def test_views_that_do_not_fit_in_memory_are_refused_before_encoding(tmp_path, monkeypatch, session):
    import calbench.errors
    from calbench.errors import CalbenchError
    from calbench.session import FewShot

    monkeypatch.setattr(calbench.errors, "available_memory", lambda: 2**20)  # 1 MiB free
    encoded = session.cache.stats.encoded
    with pytest.raises(
        CalbenchError,
        match=r"^50 view\(s\) of 48 train image\(s\) needs 0.0 GiB of memory and this machine has 0.0 GiB free; pass fewer --views",
    ):
        session.fit_data(7, FewShot(8, views=50))
    assert session.cache.stats.encoded == encoded
