"""CLI: `calbench data prepare` on fake official downloads, then `compare` trains on each; listing and check."""

import csv

import numpy as np
import pytest
from test_datasets_folder import make_folder
from test_datasets_prepare import _dicom, _pannuke_fold, _png, _tree, _zip, fake_kather
from typer.testing import CliRunner

from calbench.cli.app import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _downloads(tmp_path):
    """Each dataset's prepare arguments on a tiny fake of its official download."""
    dl = tmp_path / "dl"
    train, test = fake_kather(dl, train_per_class=2, test_per_class=1)
    covid = _zip(
        dl / "archive.zip",
        {
            f"COVID-19_Radiography_Dataset/{c}/images/{c}-{i}.png": _png((32, 32), (40 * i, 0, 0), mode="L")
            for c in ("COVID", "Normal")
            for i in range(4)
        },
    )
    rsna_images = dl / "stage_2_train_images"
    rsna_images.mkdir()
    rows = ["patientId,class"]
    for k, label in enumerate(["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]):
        for i in range(3):
            _dicom(rsna_images / f"p{k}{i}.dcm", np.full((16, 16), 100 * (i + 1)))
            rows.append(f"p{k}{i},{label}")
    (dl / "labels.csv").write_text("\n".join(rows) + "\n")
    folds = [_pannuke_fold(dl / f"fold_{k}.zip", 4, neoplastic=[0, 1]) for k in (1, 2, 3)]
    tissue = np.full((224, 448, 3), 150, np.uint8)
    mask = np.full((224, 448), 255, np.uint8)
    pos = _tree(
        dl / "tissue-train-pos-v1",
        {f"{i}{suffix}.png": _png_array(a) for i in range(3) for suffix, a in (("", tissue), ("_mask", mask))},
    )
    neg = _tree(dl / "tissue-train-neg", {f"n{i}.png": _png_array(tissue) for i in range(3)})
    return {
        "kather": ["--train", train, "--test", test],
        "covid": ["--archive", covid],
        "rsna18": ["--images", rsna_images, "--labels", dl / "labels.csv", "--test-fraction", "0.34"],
        "pannuke": ["--train", folds[0], "--train", folds[1], "--test", folds[2]],
        "digestpath": ["--pos", pos, "--neg", neg],
    }


def _png_array(array):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("official")
    root = tmp_path / "data"
    outputs = {
        name: _run("data", "prepare", name, *args, "--data-root", root) for name, args in _downloads(tmp_path).items()
    }
    (tmp_path / "params.json").write_text('{"coop-ce": {"epochs": 2}}')  # training runs; its length is not under test
    return root, outputs, tmp_path


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["kather", "covid", "rsna18", "pannuke", "digestpath"])
def test_prepare_then_compare_trains_on_each_paper_dataset(prepared, name):
    root, outputs, tmp_path = prepared
    result = outputs[name]
    assert result.exit_code == 0, result.output
    assert f"wrote {root / name}" in result.output and "train: " in result.output and "test: " in result.output
    compare = _run(
        "compare",
        "--data",
        name,
        "--data-root",
        root,
        "--methods",
        "zero-shot,coop-ce",
        "--seeds",
        "1",
        "--shots",
        "1",
        "--val-shots",
        "1",
        "--views",
        "1",
        "--params",
        tmp_path / "params.json",
        "--out",
        tmp_path / "results" / name,
        "--cache-dir",
        tmp_path / "cache",
    )
    assert compare.exit_code == 0, compare.output
    with open(tmp_path / "results" / name / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["dataset"], r["method"]) for r in rows] == [(name, "zero-shot"), (name, "coop-ce")]


def test_prepare_again_says_nothing_to_do(prepared):
    root, _, tmp_path = prepared
    args = _downloads(tmp_path / "again")["covid"]
    first = _run("data", "prepare", "covid", *args, "--out", tmp_path / "again" / "covid")
    second = _run("data", "prepare", "covid", *args, "--out", tmp_path / "again" / "covid")
    assert first.exit_code == second.exit_code == 0
    assert "is already prepared from these downloads; nothing to do" in second.output
    assert "train: 6 images (covid 3, normal 3)" in second.output


def test_datasets_lists_paper_and_medmnist_sets_with_presence(prepared):
    root, _, _ = prepared
    result = _run("datasets", "--data-root", root)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for name in (
        "kather",
        "pannuke",
        "digestpath",
        "covid",
        "rsna18",
        "pathmnist",
        "pneumoniamnist",
        "dermamnist",
        "bloodmnist",
        "breastmnist",
        "octmnist",
        "retinamnist",
        "organamnist",
    ):
        assert name in text
    assert "chestmnist" not in text
    assert "pathmnist [_64|_128|_224]" in text
    assert "yes: train 18, test 9" in text  # kather: 9 classes x 2 / x 1


def test_prepare_help_states_source_and_licence():
    for name, words in [
        ("kather", ["zenodo.org/records/1214456", "CC BY 4.0"]),
        ("pannuke", ["CC BY-NC-SA 4.0"]),
        ("rsna18", ["kaggle.com/c/rsna-pneumonia-detection-challenge"]),
        ("covid", ["covid19-radiography-database"]),
        ("digestpath", ["digestpath2019.grand-challenge.org"]),
    ]:
        text = " ".join(_run("data", "prepare", name, "--help").output.split())
        assert all(w in text for w in words), (name, text)


def test_datasets_check_reports_counts_and_one_line_errors(tmp_path):
    root = make_folder(tmp_path / "mine", per_class=3)
    ok = _run("datasets", "check", root, "--cache-dir", tmp_path / "c")
    assert ok.exit_code == 0 and "ok: 2 classes" in ok.output
    short = _run("datasets", "check", root, "--shots", "2", "--val-shots", "2", "--cache-dir", tmp_path / "c")
    assert short.exit_code == 2
    assert (
        short.output.strip()
        == "error: class 'class a' has 3 training images but 2 shots + 2 validation shots need 4; lower --shots or add images"
    )
    (root / "images" / "train" / "b" / "b0.png").write_bytes(b"junk")
    warned = _run("datasets", "check", root, "--cache-dir", tmp_path / "c")
    assert warned.exit_code == 0 and f"skippingunreadableimage{root / 'images' / 'train' / 'b' / 'b0.png'}(" in "".join(
        warned.output.split()
    )
    strict = _run("datasets", "check", root, "--strict", "--cache-dir", tmp_path / "c")
    assert (
        strict.exit_code == 2
        and "Traceback" not in strict.output
        and strict.output.startswith("error: cannot read image")
    )
    (root / "classnames.txt").unlink()
    missing = _run("datasets", "check", root, "--cache-dir", tmp_path / "c")
    assert missing.exit_code == 2 and len(missing.output.strip().splitlines()) == 1


def test_unsafe_archive_via_cli_is_one_line(tmp_path):
    bad = _zip(tmp_path / "bad.zip", {"../evil.png": _png()})
    result = _run("data", "prepare", "covid", "--archive", bad, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert (
        " ".join(result.output.split())
        == f"error: {bad}: archive member '../evil.png' contains '..'; refusing to read this archive (nothing was written)"
    )
    assert not (tmp_path / "out").exists()
