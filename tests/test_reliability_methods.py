"""Issue 11 for methods: calibrators on two and on many classes, declared parameter ranges,
degenerate runs, --params shapes, and two datasets that share a name."""

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from calbench import published
from calbench.base import METHODS, Calibrated, LogitMethod, MethodSpec
from calbench.baselines.coop import LOSS_METHODS
from calbench.baselines.promptsmooth import RANGES as PROMPTSMOOTH_RANGES
from calbench.baselines.promptsmooth import default_of as promptsmooth_default
from calbench.calibprompt import RANGES as CALIBPROMPT_RANGES
from calbench.cli.app import app
from calbench.compare import CompareRequest, Grid, degenerate_reason, run_compare, score
from calbench.errors import CalbenchError, CalbenchWarning
from calbench.methods import CALIBRATORS, list_calibrators, list_methods, make_method, read_params_file
from calbench.results import dataset_labels, read_results
from calbench.session import FewShot, RunContext, Session
from calbench.train import TRAIN_RANGES, TrainConfig

runner = CliRunner()
FEWSHOT = FewShot(shots=2, views=1)
TEST_ITEMS = 12  # test images scored per case: enough for every calibrator, fast for test-time tuning
#: one member of every registered method family, with few epochs and noisy copies
FAMILIES = {
    "zero-shot": {},
    "coop-ce": {"epochs": 2},
    "calibprompt": {"epochs": 2},
    "ls+smac": {"epochs": 2},
    "promptsmooth": {"epochs": 2, "n_samples": 2, "train_sigmas": [0.25]},
    "promptsmooth-zs": {"n_samples": 2, "adapt_samples": 2},
}


def _one_line(output: str) -> str:
    return " ".join(output.split())


def _class_copy(source, target, classes, train=12, test=10):
    """The first ``classes`` classes of the synthetic dataset, fewer images: a folder in calbench's layout."""
    lines = (source / "classnames.txt").read_text().splitlines()[:classes]
    for split, count in (("train", train), ("test", test)):
        for line in lines:
            folder = line.split()[0]
            (target / "images" / split / folder).mkdir(parents=True)
            for image in sorted((source / "images" / split / folder).iterdir())[:count]:
                shutil.copy(image, target / "images" / split / folder / image.name)
    (target / "classnames.txt").write_text("".join(f"{line}\n" for line in lines))
    return target


@pytest.fixture(scope="module")
def binary_folder(synthetic, tmp_path_factory):
    return _class_copy(synthetic.root, tmp_path_factory.mktemp("binary") / "binary", 2)


@pytest.fixture(scope="module")
def sessions(synthetic, binary_folder, cache_dir, tmp_path_factory):
    """Two classes and three: netcal's multiclass beta calibration takes 20-40 s per fit on five."""
    three = _class_copy(synthetic.root, tmp_path_factory.mktemp("three") / "three", 3)
    context = RunContext(device="cpu", cache_dir=cache_dir)
    return {
        "two classes": Session("tiny", str(binary_folder), context),
        "three classes": Session("tiny", str(three), context),
    }


@pytest.fixture(scope="module")
def fitted(sessions):
    """Each family fitted once per dataset, shared by the calibrators on top of it."""
    cache = {}

    def get(kind, family):
        if (kind, family) not in cache:
            method = make_method(family, **FAMILIES[family])
            cache[(kind, family)] = method.fit(sessions[kind].fit_data(1, FEWSHOT, method))
        return cache[(kind, family)]

    return get


# --- 1. every calibrator on every method family, two classes and five ----------------------------


def test_the_families_cover_every_registered_method():
    families = set(FAMILIES) | set(LOSS_METHODS) | {"promptsmooth-as"}  # CoOp losses share coop-ce's code
    assert set(list_methods()) <= families
    assert sorted(list_calibrators()) == ["beta", "hist", "iso", "ts", "vs"]


@pytest.mark.parametrize("calibrator", list_calibrators())
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind, n_classes", [("two classes", 2), ("three classes", 3)])
def test_every_calibrator_on_every_family_gives_distributions(sessions, fitted, kind, n_classes, family, calibrator):
    session = sessions[kind]
    method = Calibrated(fitted(kind, family), CALIBRATORS.get(calibrator)(), base_is_fitted=True)
    method.fit(session.fit_data(1, FEWSHOT, method))
    inputs = session.test_features(method)
    inputs = inputs[:, :TEST_ITEMS] if inputs.dim() == 3 else inputs[:TEST_ITEMS]
    items = min(TEST_ITEMS, len(session.test_labels))
    with torch.no_grad():
        probs = method.predict_proba(inputs)
    assert probs.shape == (items, n_classes)
    assert torch.isfinite(probs).all() and torch.all(probs >= 0)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(items, dtype=probs.dtype))


@pytest.mark.parametrize("name", ["hist", "iso", "beta"])
def test_two_class_netcal_output_is_one_minus_p_and_p(name):
    """netcal calibrates the positive class alone on two columns; the wrapper gives [1 - p, p]."""
    rng = np.random.default_rng(0)
    labels = torch.tensor(rng.integers(0, 2, 200))
    logits = torch.tensor(rng.normal(size=(200, 2)) * 3.0)
    logits[torch.arange(200), labels] += 1.0
    ours = CALIBRATORS.get(name)().fit(logits, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        positive = np.ravel(ours.model.transform(torch.softmax(logits.double(), dim=1).numpy()))
    probs = ours.predict_proba(logits).numpy()
    np.testing.assert_allclose(probs[:, 1], np.clip(positive, 0, 1), atol=1e-12)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)


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


# --- 2. every parameter inside its declared range -------------------------------------------------

NAN, INF = float("nan"), float("inf")
OUT_OF_RANGE = [
    ("coop-ce", {"epochs": 0}, "coop-ce epochs=0 is outside [1, 10000]"),
    ("coop-ce", {"epochs": 1e12}, "coop-ce epochs=1000000000000 is outside [1, 10000]"),  # killed at 22 GB
    ("calibprompt", {"epochs": 10_001}, "calibprompt epochs=10001 is outside [1, 10000]"),
    ("coop-ce", {"n_ctx": 0}, "coop-ce n_ctx=0 is outside [1, inf)"),
    ("coop-ce", {"batch_size": 0}, "coop-ce batch_size=0 is outside [1, inf)"),
    ("coop-ce", {"shots": 0}, "coop-ce shots=0 is outside [1, inf)"),
    ("coop-ce", {"lr": -0.002}, "coop-ce lr=-0.002 is outside (0, inf)"),
    ("coop-ce", {"lr": NAN}, "coop-ce lr=nan is outside (0, inf)"),
    ("coop-ce", {"lr": INF}, "coop-ce lr=inf is outside (0, inf)"),
    ("coop-ce", {"momentum": 1.0}, "coop-ce momentum=1.0 is outside [0, 1)"),
    ("coop-ce", {"weight_decay": -1e-4}, "coop-ce weight_decay=-0.0001 is outside [0, inf)"),
    ("coop-ce", {"warmup_epochs": -1}, "coop-ce warmup_epochs=-1 is outside [0, inf)"),
    ("coop-ce", {"warmup_lr": -1e-5}, "coop-ce warmup_lr=-1e-05 is outside [0, inf)"),
    ("coop-ls", {"alpha": 1.5}, "coop-ls alpha=1.5 is outside [0, 1)"),
    ("coop-ls", {"alpha": 1.0}, "coop-ls alpha=1.0 is outside [0, 1)"),
    ("coop-ls", {"alpha": NAN}, "coop-ls alpha=nan is outside [0, 1)"),
    ("coop-mbls", {"margin": 0.0}, "coop-mbls margin=0.0 is outside (0, inf)"),
    ("coop-mbls", {"alpha": -0.1}, "coop-mbls alpha=-0.1 is outside [0, inf)"),
    ("coop-focal", {"gamma": -1.0}, "coop-focal gamma=-1.0 is outside [0, inf)"),
    ("coop-mdca", {"beta": -1}, "coop-mdca beta=-1 is outside [0, inf)"),
    ("coop-mmce", {"weight": INF}, "coop-mmce weight=inf is outside [0, inf)"),
    ("coop-logitnorm", {"temperature": 0}, "coop-logitnorm temperature=0 is outside (0, inf)"),
    ("coop-mmv", {"beta": -0.01}, "coop-mmv beta=-0.01 is outside [0, inf)"),
    ("ls+smac", {"w_smac": -1.0}, "ls+smac w_smac=-1.0 is outside [0, inf)"),
    ("calibprompt-focal", {"alpha": 2}, "calibprompt-focal alpha=2 is outside [0, 1)"),
    ("calibprompt", {"alpha": 1.5}, "calibprompt alpha=1.5 is outside [0, 1)"),
    ("calibprompt", {"w_smac": -1.0}, "calibprompt w_smac=-1.0 is outside [0, inf)"),
    ("calibprompt", {"w_as": NAN}, "calibprompt w_as=nan is outside [0, inf)"),
    ("calibprompt", {"epochs": 0}, "calibprompt epochs=0 is outside [1, 10000]"),
    ("promptsmooth", {"sigma": 0.0}, "promptsmooth sigma=0.0 is outside (0, inf)"),
    ("promptsmooth", {"train_sigmas": [0.25, -1.0]}, "promptsmooth train_sigmas=-1.0 is outside (0, inf)"),
    ("promptsmooth", {"n_samples": 0}, "promptsmooth n_samples=0 is outside [1, inf)"),
    ("promptsmooth-zs", {"adapt_samples": 0}, "promptsmooth-zs adapt_samples=0 is outside [1, inf)"),
    ("promptsmooth", {"epochs": 0}, "promptsmooth epochs=0 is outside [1, 10000]"),
    ("promptsmooth-as", {"w_as": -0.01}, "promptsmooth-as w_as=-0.01 is outside [0, inf)"),
    ("promptsmooth-zs", {"tta_lr": 0.0}, "promptsmooth-zs tta_lr=0.0 is outside (0, inf)"),
    ("promptsmooth-zs", {"tta_steps": -1}, "promptsmooth-zs tta_steps=-1 is outside [0, inf)"),
    ("promptsmooth-zs", {"sigma": INF}, "promptsmooth-zs sigma=inf is outside (0, inf)"),
]


@pytest.mark.parametrize("method, params, message", OUT_OF_RANGE)
def test_a_parameter_outside_its_range_is_one_line_naming_it(method, params, message):
    with pytest.raises(CalbenchError) as caught:
        make_method(method, **params)
    assert str(caught.value) == f"{message}; pass a value in that range"


def test_counts_must_be_whole_numbers():
    with pytest.raises(CalbenchError) as caught:
        make_method("promptsmooth", n_samples=2.5)
    assert str(caught.value) == "promptsmooth n_samples=2.5 must be a whole number in [1, inf)"
    with pytest.raises(CalbenchError) as caught:
        make_method("promptsmooth", train_sigmas=[])
    assert str(caught.value) == "promptsmooth train_sigmas is empty; give at least one noise level, e.g. [0.25]"


def test_a_training_config_built_directly_is_checked_too():
    with pytest.raises(CalbenchError) as caught:
        TrainConfig(epochs=0)
    assert str(caught.value) == "training option epochs=0 is outside [1, 10000]; pass a value in that range"


def test_every_default_lies_inside_its_declared_range():
    numeric = {"epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs", "warmup_lr", "n_ctx", "shots"}
    assert set(TRAIN_RANGES) == numeric
    for name, allowed in TRAIN_RANGES.items():
        assert getattr(TrainConfig(), name) in allowed, name
    for method, spec in LOSS_METHODS.items():
        for name, param in spec.params.items():
            assert published.default(method, name) in param.allowed, (method, name)
    assert set(CALIBPROMPT_RANGES) == {"alpha", "w_smac", "w_as"}
    for name, allowed in PROMPTSMOOTH_RANGES.items():
        defaults = promptsmooth_default(
            "promptsmooth-zs" if name in ("adapt_samples", "tta_steps", "tta_lr") else "promptsmooth-as", name
        )
        assert all(d in allowed for d in (defaults if isinstance(defaults, tuple) else [defaults])), name


def test_boundaries_inside_the_range_are_accepted():
    assert make_method("coop-ls", alpha=0.0).objective.terms["ls"].kwargs == {"alpha": 0.0}
    assert make_method("coop-ce", momentum=0.0, weight_decay=0, warmup_epochs=0, warmup_lr=0).config.momentum == 0.0
    assert make_method("promptsmooth-zs", tta_steps=0).tta_steps == 0


def test_an_out_of_range_parameter_stops_compare_before_any_work(tmp_path, cache_dir):
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"coop-ls": {"alpha": 1.5}}))
    out = tmp_path / "out"
    args = ["compare", "--methods", "coop-ls", "--seeds", "1", "--params", str(params), "--out", str(out)]
    result = runner.invoke(app, [*args, "--cache-dir", str(cache_dir)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: coop-ls alpha=1.5 is outside [0, 1); pass a value in that range" in _one_line(result.output)
    assert not (out / "results.csv").exists()


# --- 2b. degenerate runs --------------------------------------------------------------------------


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
    assert "warning: tiny · synthetic · uniform (seed 1) is degenerate: near-uniform predictions" in _one_line(
        result.output
    )
    assert "failed:" not in result.output


# --- 3. --params shapes ---------------------------------------------------------------------------

BAD_SHAPES = [
    ({"coop-ce": [1]}, 'coop-ce must map to an object of parameters like {"alpha": 0.1}, got [1]'),
    ({"coop-ce": 0.1}, 'coop-ce must map to an object of parameters like {"alpha": 0.1}, got 0.1'),
    ({"coop-ce": {"alpha": [1]}}, "coop-ce alpha must be one number, text or true/false, got [1]"),
    ({"coop-ce": {"lr": {"a": 1}}}, 'coop-ce lr must be one number, text or true/false, got {"a": 1}'),
    ({"promptsmooth": {"sigma": [0.5]}}, "promptsmooth sigma must be one number, text or true/false, got [0.5]"),
    ({"promptsmooth": {"train_sigmas": ["a"]}}, 'promptsmooth train_sigmas must be a list of numbers, got ["a"]'),
    (
        {"promptsmooth": {"train_sigmas": {"a": 1}}},
        'promptsmooth train_sigmas must be one number, text or true/false (or a list of numbers), got {"a": 1}',
    ),
    ({"method": "coop-ce", "params": [1]}, 'coop-ce must map to an object of parameters like {"alpha": 0.1}, got [1]'),
]


@pytest.mark.parametrize("content, message", BAD_SHAPES)
def test_a_params_file_of_the_wrong_shape_is_one_line(tmp_path, content, message):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(content))
    with pytest.raises(CalbenchError) as caught:
        read_params_file(path)
    assert str(caught.value) == f"{path}: {message}"


def test_lists_of_numbers_are_read_where_a_method_declares_them(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"promptsmooth": {"sigma": 0.5, "train_sigmas": [0.5, 1]}, "coop-ce": {}}))
    assert read_params_file(path) == {"promptsmooth": {"sigma": 0.5, "train_sigmas": [0.5, 1]}, "coop-ce": {}}
    path.write_text(json.dumps({"method": "coop-ls", "params": {"alpha": 0.1, "ctx_init": None}, "value": 0.03}))
    assert read_params_file(path) == {"coop-ls": {"alpha": 0.1, "ctx_init": None}}


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
    assert line in _one_line(result.output)
    assert not (tmp_path / "out").exists()


# --- 5. two dataset folders with one name ---------------------------------------------------------


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
    assert "0 run(s) computed, 2 reused" in _one_line(_compare(b, out, cache_dir).output)
    assert "| method | tiny · data |" in (out / "report.md").read_text()


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
