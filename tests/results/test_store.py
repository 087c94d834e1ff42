"""The results store: damaged results.csv / certification.csv rows and prediction files, and dataset labels."""

import numpy as np
import pytest
from cli_checks import cli

from calbench.errors import CalbenchWarning
from calbench.results import ResultsStore, dataset_labels, read_certification, read_results

# --- results.csv and certification.csv ----------------------------------------------------------------


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
    result = cli("report", tmp_path)
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


# --- damaged prediction files -----------------------------------------------------------------------


def test_predictions_never_unpickle(tmp_path):
    store = ResultsStore(tmp_path)
    row = _row("x")
    store.predictions_path(row).parent.mkdir(parents=True)
    np.save(store.predictions_path(row), np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.warns(CalbenchWarning, match="Object arrays cannot be loaded when allow_pickle=False"):
        assert store.predictions(row) is None
    assert store.predictions_damaged(row) and not store.predictions_damaged(_row("missing"))


# --- dataset labels when two folders share a name ---------------------------------------------


def test_dataset_labels_name_a_dataset_plainly_unless_another_shares_its_name():
    rows = [
        {"dataset": "kather", "dataset_id": "aaaaaa"},
        {"dataset": "data", "dataset_id": ""},  # written before the column: joins the one identified "data"
        {"dataset": "data", "dataset_id": "bbbbbb"},
        {"dataset": "other", "dataset_id": "cccccc"},
        {"dataset": "other", "dataset_id": "dddddd"},
        {"dataset": "other", "dataset_id": ""},
    ]
    assert dataset_labels(rows) == {
        ("kather", "aaaaaa"): "kather",
        ("data", ""): "data",
        ("data", "bbbbbb"): "data",
        ("other", "cccccc"): "other (cccccc)",
        ("other", "dddddd"): "other (dddddd)",
        ("other", ""): "other (unknown)",
    }
