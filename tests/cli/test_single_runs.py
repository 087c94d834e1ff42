"""`calbench train` -> a prompt file -> `calbench evaluate`, on its own dataset and on a shifted copy."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from typer.testing import CliRunner

from calbench.cli.app import app
from calbench.errors import CalbenchError, CalbenchWarning
from calbench.methods import list_calibrators, list_methods, make_method
from calbench.metrics import evaluate
from calbench.session import FewShot, RunContext, Session
from calbench.single_runs import evaluate_prompt, train_one

pytestmark = pytest.mark.e2e
runner = CliRunner()
FEW = FewShot(shots=4, views=2)


@pytest.fixture(scope="module")
def context(cache_dir):
    return RunContext(device="cpu", cache_dir=cache_dir)


@pytest.mark.parametrize("method", ["coop-ce", "coop-ce+ts"])
def test_a_saved_prompt_scores_as_the_trained_method(tmp_path, context, method):
    path, _ = train_one(method, "tiny", "synthetic", 2, FEW, context, tmp_path, {"epochs": 3})
    scored = evaluate_prompt(path, "synthetic", context=context)
    session = Session("tiny", "synthetic", context)
    trained = make_method(method, epochs=3).fit(session.fit_data(2, FEW))
    with torch.no_grad():
        direct = evaluate(trained.predict_proba(session.test_features(trained)).double().numpy(), session.test_labels)
    assert scored.method == method and scored.note == "" and scored.trained_on == "synthetic"
    assert {k: scored.metrics[k] for k in direct} == pytest.approx(direct, rel=1e-6, abs=1e-9)
    assert "lac_size" in scored.metrics  # and the deferral measures, fitted on its validation split


def test_a_calibrator_that_is_not_stored_is_named(tmp_path, context):
    path, _ = train_one("coop-ce+iso", "tiny", "synthetic", 1, FEW, context, tmp_path, {"epochs": 2})
    scored = evaluate_prompt(path, "synthetic", context=context)
    assert scored.method == "coop-ce" and "+iso calibrator is not stored" in scored.note


def test_shift_test_on_a_dataset_with_the_same_classes(tmp_path, context, synthetic):
    path, _ = train_one("calibprompt", "tiny", "synthetic", 1, FEW, context, tmp_path / "p", {"epochs": 2})
    shifted = tmp_path / "hospital-b"
    shutil.copytree(synthetic.root, shifted)
    scored = evaluate_prompt(path, str(shifted), context=context)
    assert scored.session.dataset.name == "hospital-b" and scored.trained_on == "synthetic"
    (shifted / "classnames.txt").write_text(
        "".join(
            f"{line.split()[0]} other {i}\n"
            for i, line in enumerate((synthetic.root / "classnames.txt").read_text().splitlines())
        )
    )
    with pytest.raises(
        CalbenchError, match="was trained for the classes .* evaluate on a dataset with the same classes"
    ):
        evaluate_prompt(path, str(shifted), context=context)


def test_train_refuses_a_method_without_a_prompt(tmp_path, context):
    with pytest.raises(
        CalbenchError, match="zero-shot learns no prompt, so there is nothing to train; pick one of: .*calibprompt"
    ):
        train_one("zero-shot", "tiny", "synthetic", 1, FEW, context, tmp_path)
    assert not tmp_path.joinpath("zero-shot-tiny-synthetic-seed1.safetensors").exists()


def test_evaluate_and_methods_commands(tmp_path, cache_dir):
    trained = runner.invoke(
        app,
        [
            "train",
            "--method",
            "coop-ls",
            "--shots",
            "4",
            "--views",
            "2",
            "--out",
            str(tmp_path),
            "--cache-dir",
            str(cache_dir),
            "--device",
            "cpu",
        ],
    )
    assert trained.exit_code == 0, trained.output
    prompt = next(tmp_path.glob("coop-ls-tiny-synthetic-seed1.safetensors"))
    shown = runner.invoke(
        app,
        ["evaluate", "--prompt", str(prompt), "--data", "synthetic", "--cache-dir", str(cache_dir), "--device", "cpu"],
    )
    assert shown.exit_code == 0, shown.output
    assert "coop-ls · tiny · synthetic · test split, 900 images" in shown.output and "ECE %" in shown.output
    for junk in (b"hello", b"model,dataset\n"):  # not safetensors at all
        bogus = tmp_path / "bogus.safetensors"
        bogus.write_bytes(junk)
        refused = runner.invoke(app, ["evaluate", "--prompt", str(bogus), "--cache-dir", str(cache_dir)])
        assert refused.exit_code == 2 and "Traceback" not in refused.output
        assert "is not a prompt file written by `calbench train`" in refused.output
    missing = runner.invoke(
        app, ["evaluate", "--prompt", str(tmp_path / "none.safetensors"), "--cache-dir", str(cache_dir)]
    )
    assert missing.exit_code == 2 and "does not exist; train one with `calbench train`" in missing.output
    listed = runner.invoke(app, ["methods"])
    assert listed.exit_code == 0
    for name in list_methods():
        assert name in listed.output
    assert ", ".join(list_calibrators()) in listed.output.replace("\n", " ")
    assert "smoothed over 32 noisy copies" in listed.output and "tunes at test time" in listed.output


def _with_extra(path, tmp_path, **changes):
    """A copy of prompt file ``path`` with its ``extra`` record changed."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, ctx = f.metadata(), f.get_tensor("ctx")
    meta["extra"] = json.dumps({**json.loads(meta["extra"]), **changes})
    copy = tmp_path / f"changed-{len(list(tmp_path.iterdir()))}.safetensors"
    save_file({"ctx": ctx}, str(copy), meta)
    return copy


@pytest.fixture(scope="module")
def ts_prompt(tmp_path_factory, context):
    folder = tmp_path_factory.mktemp("ts")
    return train_one("coop-ce+ts", "tiny", "synthetic", 1, FewShot(2, views=1), context, folder, {"epochs": 1})[0]


@pytest.mark.parametrize("temperature", [float("nan"), 0.0, -1.0, float("inf"), "hot"])
def test_a_stored_temperature_that_no_fit_gives_is_refused(tmp_path, context, ts_prompt, temperature):
    damaged = _with_extra(ts_prompt, tmp_path, temperature=temperature)
    with pytest.raises(CalbenchError, match="stores temperature .*a fitted temperature is a positive finite number"):
        evaluate_prompt(damaged, "synthetic", context=context)


def test_a_prompt_file_records_the_shots_it_was_trained_on(context, ts_prompt):
    from calbench.prompts import read_prompt_info

    info = read_prompt_info(ts_prompt)
    assert json.loads(info["train_config"])["shots"] == 2 and info["extra"]["shots"] == 2


def test_evaluate_from_another_folder_keeps_the_threshold_and_conformal_columns(
    tmp_path, context, synthetic, monkeypatch
):
    shutil.copytree(synthetic.root, tmp_path / "data" / "site-a")
    monkeypatch.chdir(tmp_path / "data")
    path, _ = train_one("coop-ce", "tiny", "site-a", 1, FewShot(2, views=1), context, tmp_path / "p", {"epochs": 1})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalbenchWarning)
        scored = evaluate_prompt(path, str(tmp_path / "data" / "site-a"), context=context)
    assert "lac_size" in scored.metrics and "sel_threshold" in scored.metrics
    # the validation split is found by the dataset's identity, not only by its path
    shutil.move(tmp_path / "data" / "site-a", tmp_path / "moved")
    assert "lac_size" in evaluate_prompt(path, str(tmp_path / "moved"), context=context).metrics


def test_a_missing_validation_split_is_a_warning(tmp_path, context, ts_prompt):
    gone = _with_extra(ts_prompt, tmp_path, data=str(tmp_path / "gone"), train_fingerprint="0" * 16)
    with pytest.warns(CalbenchWarning, match="no validation split to fit a threshold or conformal sets on for"):
        scored = evaluate_prompt(gone, "synthetic", context=context)
    assert "lac_size" not in scored.metrics and "aurc" in scored.metrics and scored.note == ""
