"""`calbench tune`: search spaces, the enqueued paper settings, best-trial selection under the
accuracy constraint, pruning checkpoints, resuming, reports, and a search that never reads the test split."""

import json
import math

import numpy as np
import optuna
import pytest
import torch
from cli_checks import cli, one_error
from optuna.trial import TrialState
from typer.testing import CliRunner

from calbench.cli.app import app
from calbench.compare import CompareRequest, Grid, run_compare
from calbench.errors import CalbenchError
from calbench.methods import METHODS, make_method, read_params_file, resolve
from calbench.metrics import ece
from calbench.results import ResultsStore
from calbench.session import FewShot, RunContext
from calbench.train import logits_for
from calbench.tune import TuneConfig, TuneRequest, modality_pairs, parse_space, run_tune, search
from calbench.tune.config import ACCURACY, select_best
from calbench.tune.space import SPACES, base_space, first_trials, method_params
from calbench.tune.storage import open_storage
from calbench.tune.worker import Worker

EPOCHS = 4  # fast trials; the demo itself keeps the paper's 50


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: one torch thread per process is faster than two fighting ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", [m for m in SPACES if m in METHODS])
def test_space_defaults_build_the_methods_own_defaults(method):
    """The enqueued first trial is the untuned method: same objective and training config."""
    defaults = method_params({k: p.default for k, p in base_space(method).items()}, None)
    plain, explicit = make_method(method), make_method(method, **defaults)
    assert all(p.default is not None for p in base_space(method).values())
    assert explicit.config == plain.config and explicit.objective == plain.objective
    assert resolve(method, overrides=defaults).config_hash() == resolve(method).config_hash()


def test_paper_setting_is_enqueued_first_then_the_defaults():
    space = base_space("calibprompt")
    default = {"alpha": 0.05, "w_as": 0.01, "w_smac": 1.0, "n_ctx": 16, "lr": 0.002}
    assert first_trials("calibprompt", [("tiny", "synthetic")], space) == [("default", default)]
    assert first_trials("calibprompt", [("plip", "digestpath")], space) == [
        ("paper plip/digestpath", {**default, "alpha": 0.03, "w_as": 0.001}),
        ("default", default),
    ]
    # PLIP on Kather is the paper's default setting: enqueued once
    assert first_trials("calibprompt", [("plip", "kather")], space) == [("paper plip/kather", default)]
    assert first_trials("calibprompt", [("quiltnet", "kather")], space)[0] == (
        "paper quiltnet/kather",
        {**default, "alpha": 0.01, "w_as": 1.0},
    )
    # a narrowed space drops values it excludes instead of enqueueing them
    narrow = parse_space("calibprompt", {"alpha": {"low": 0.1, "high": 0.3}, "w_smac": None})
    assert first_trials("calibprompt", [("biomedclip", "covid")], narrow) == [
        ("paper biomedclip/covid", {"alpha": 0.1, "w_as": 3.0, "n_ctx": 16, "lr": 0.002}),
        ("default", {"w_as": 0.01, "n_ctx": 16, "lr": 0.002}),
    ]
    # MedCLIP's published warm-up lr is part of its paper setting when the space searches it
    warm = parse_space("calibprompt", {"warmup_lr": {"low": 1e-6, "high": 1e-2, "log": True}})
    assert first_trials("calibprompt", [("medclip", "rsna18")], warm)[0][1]["warmup_lr"] == 1e-3


def test_space_file_narrows_extends_and_rejects():
    space = parse_space(
        "calibprompt",
        {"alpha": {"high": 0.1}, "w_smac": None, "epochs": {"choices": [20, 50]}, "batch_size": {"low": 8, "high": 32}},
    )
    assert (space["alpha"].low, space["alpha"].high, space["alpha"].log, space["alpha"].default) == (
        0.005,
        0.1,
        True,
        0.05,
    )
    assert "w_smac" not in space
    assert space["epochs"].choices == (20, 50) and space["batch_size"].kind == "int"
    with pytest.raises(CalbenchError, match="alpha needs 0 < low < high"):
        parse_space("calibprompt", {"alpha": {"low": 0.0, "high": 0.1}})
    with pytest.raises(CalbenchError, match="unknown key"):
        parse_space("calibprompt", {"alpha": {"lo": 0.1}})
    with pytest.raises(CalbenchError, match="no search space for 'coop-ce'"):
        parse_space("coop-ce", {})


def _trial(number, value, violation, state=TrialState.COMPLETE):
    return optuna.trial.FrozenTrial(
        number=number,
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        datetime_start=None,
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs={},
        system_attrs={f"constraints:{ACCURACY}": violation},
        intermediate_values={},
        trial_id=number,
    )


def test_best_is_the_lowest_feasible_value_else_the_smallest_violation():
    trials = [
        _trial(0, 0.05, 0.02),
        _trial(1, 0.09, -0.01),
        _trial(2, 0.07, 0.0),
        _trial(3, 0.01, -0.5, TrialState.PRUNED),
    ]
    assert select_best(trials, "ece").number == 2  # 0.05 breaks the constraint, pruned trials never win
    assert select_best([_trial(0, 0.05, 0.02), _trial(1, 0.01, 0.03)], "ece").number == 0
    assert select_best([], "ece") is None


def test_checkpoint_reports_the_validation_ece_and_prunes(tiny, synthetic, cache_dir):
    """Each tenth of training reports the validation ECE of the prompt as it is at that epoch."""
    config = TuneConfig(epochs=20)
    worker = Worker(config, RunContext(device="cpu", cache_dir=cache_dir))
    fit = worker.fit_data(("tiny", "synthetic"), 1)
    worker.reference = {"tiny/synthetic": 0.5}

    class Trial:
        reported: list = []
        constraints: dict = {}

        def report(self, value, step):
            self.reported.append((value, step))

        def should_prune(self):
            return len(self.reported) == 3

        def set_user_attr(self, key, value):
            setattr(self, key, value)

        def set_constraint(self, key, value):
            self.constraints[key] = value

    trial = Trial()
    method = make_method("calibprompt", epochs=20)
    method.on_epoch = worker.checkpoint(trial, method, fit, ("tiny", "synthetic"), "ece", step0=40)
    with pytest.raises(optuna.TrialPruned):
        method.fit(fit)
    assert [step for _, step in trial.reported] == [42, 44, 46]  # every 2 epochs of 20, after the third run's offset
    with torch.no_grad():  # training stopped right after epoch 6: the learner is that prompt
        probs = torch.softmax(logits_for(fit.val_features, method.learner.text_features(), fit.vlm.logit_scale), dim=1)
    assert trial.reported[-1][0] == pytest.approx(ece(probs.double().numpy(), fit.val_labels.numpy()), abs=1e-12)
    assert trial.pruned_at == "epoch 6 of 20 (split seed 1, tiny/synthetic)"
    accuracy = float((probs.argmax(1) == fit.val_labels).double().mean())
    assert trial.constraints[ACCURACY] == pytest.approx(0.5 - 0.01 - accuracy)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("tune")
    torch.set_num_threads(1)  # set up before the per-test fixture; retraining must match bit for bit
    context = RunContext(device="cpu", cache_dir=cache_dir)
    first = run_tune(TuneRequest(TuneConfig(epochs=EPOCHS), 8, out=out, final_seeds=[1], context=context, heartbeat=1))
    again = run_tune(
        TuneRequest(TuneConfig(epochs=EPOCHS), 10, out=out, search_only=True, context=context, heartbeat=1)
    )
    return out, first, again


@pytest.mark.e2e
def test_demo_writes_study_best_params_test_table_and_reports(demo):
    out, first, _ = demo
    trials = first.search.trials
    assert first.search.ran == 8  # (the study now also holds the re-run's trials)
    assert trials[0].params == {"alpha": 0.05, "w_as": 0.01, "w_smac": 1.0, "n_ctx": 16, "lr": 0.002}
    assert trials[0].user_attrs["enqueued"] == "default"
    document = json.loads((out / "best_params.json").read_text())
    assert read_params_file(out / "best_params.json") == {"calibprompt": document["params"]}
    assert document["params"]["epochs"] == EPOCHS
    assert (out / "study.db").is_file()
    for name in ("report.md", "report.html"):
        assert (out / name).is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "plots/" not in html
    report = (out / "report.md").read_text()
    assert "## Best setting" in report and "## Did the search help?" in report and "Verdict: " in report
    assert "trials (validation)" in report and "Parallel coordinates" not in report
    assert "## Validation to test" in report


@pytest.mark.e2e
def test_best_params_retrain_to_the_trials_validation_numbers(demo, cache_dir, tmp_path):
    """`calbench train --params best_params.json` reproduces the chosen trial on the same split: its first fold,
    whose held-out images are the plain split's validation images (the trial keeps their predictions)."""
    from calbench.single_runs import train_one

    out, first, _ = demo
    document = json.loads((out / "best_params.json").read_text())
    context = RunContext(device="cpu", cache_dir=cache_dir)
    _, metrics = train_one(
        "calibprompt", "tiny", "synthetic", 1, FewShot(8, None, 10), context, tmp_path, params=document["params"]
    )
    trial = next(t for t in first.search.trials if t.number == document["trial"])
    stored = trial.user_attrs["predictions"]["tiny/synthetic#1"]
    fold0 = np.asarray(stored["probs"]["clean"])[:48], np.asarray(stored["labels"])[:48]
    assert metrics["ece"] == pytest.approx(ece(*fold0), abs=1e-5)  # stored to 6 decimals
    assert metrics["accuracy"] == float((fold0[0].argmax(axis=1) == fold0[1]).mean())


@pytest.mark.e2e
def test_best_meets_the_accuracy_constraint_against_coop_ce(demo):
    _, first, again = demo
    complete = [t for t in again.search.trials if t.state == TrialState.COMPLETE]
    # best_params.json was written by the first run (the re-run is --search-only): the rule on its 8 trials
    verdict = first.search.judged.verdict
    document = json.loads((demo[0] / "best_params.json").read_text())
    assert document["trial"] == verdict.chosen and document["selection"]["reason"] == verdict.reason()
    chosen = next(t for t in complete if t.number == verdict.chosen)
    assert (
        document["val"]["ece"] == chosen.value
        and document["feasible"] == first.search.judged.summaries[chosen.number].feasible
    )
    assert verdict.reference == 0 and complete[0].user_attrs["enqueued"] == "default"
    for t in complete:  # the objective is the validation ECE the trial recorded, on both folds' held-out images
        assert t.value == t.user_attrs["val"]["ece"] == t.user_attrs["pairs"]["tiny/synthetic"]["ece"]


@pytest.mark.e2e
def test_rerun_with_a_larger_total_runs_exactly_the_missing_trials(demo):
    out, _, again = demo
    assert again.search.ran == 2 and len(again.search.trials) == 10
    rows = (out / "results.csv").read_text().splitlines()
    assert sorted(line.split(",")[2] for line in rows[1:]) == ["calibprompt:default", "calibprompt:tuned", "coop-ce"]


def test_results_are_appended_replacing_the_same_method_and_seed(tmp_path):
    path = tmp_path / "results.csv"
    row = {
        "model": "tiny",
        "dataset": "synthetic",
        "seed": 1,
        "config": "c",
        "accuracy": 0.5,
    }  # results.csv rows are keyed by config too
    ResultsStore(tmp_path).put_rows([{**row, "method": "coop-ce"}, {**row, "method": "calibprompt:tuned"}])
    ResultsStore(tmp_path).put_rows(
        [{**row, "method": "calibprompt:tuned", "accuracy": 0.75}, {**row, "method": "calibprompt:paper"}]
    )
    lines = path.read_text().splitlines()
    assert [(line.split(",")[2], line.split(",")[4]) for line in lines[1:]] == [
        ("coop-ce", "0.5"),
        ("calibprompt:tuned", "0.75"),
        ("calibprompt:paper", "0.5"),
    ]


@pytest.mark.e2e
def test_search_never_loads_the_test_split(monkeypatch, cache_dir, tmp_path):
    from calbench.cache import FeatureCache
    from calbench.data.folder import ImageFolderDataset

    files, features = ImageFolderDataset.files, FeatureCache.features

    def no_test_files(self, split):
        if split == "test":
            raise AssertionError("the search listed the test split")
        return files(self, split)

    def no_test_features(self, dataset, split, *args, **kwargs):
        if split == "test":
            raise AssertionError("the search encoded or read test features")
        return features(self, dataset, split, *args, **kwargs)

    monkeypatch.setattr(ImageFolderDataset, "files", no_test_files)
    monkeypatch.setattr(FeatureCache, "features", no_test_features)
    result = search(
        TuneConfig(epochs=2, split_seeds=[1, 2]),
        3,
        "honest",
        f"journal:{tmp_path / 'j.log'}",
        RunContext(device="cpu", cache_dir=cache_dir),
    )
    assert sum(t.state == TrialState.COMPLETE for t in result.trials) == 3
    with pytest.raises(AssertionError, match="test split"):  # the guard does bite on a test evaluation
        run_compare(
            CompareRequest(
                grid=Grid(["zero-shot"], [1]), context=RunContext(device="cpu", cache_dir=cache_dir), out=tmp_path / "c"
            )
        )


@pytest.fixture()
def second_demo_dataset(tmp_path):
    """A second demo-modality dataset (another draw of the synthetic tiles), registered for one test."""
    from dataclasses import replace

    from calbench.data import DATASETS
    from calbench.data.synthetic import write_synthetic

    other = replace(
        DATASETS.get("synthetic"),
        name="synthetic-b",
        locate=lambda root, cache: write_synthetic(tmp_path / "synthetic-b", seed=1),
    )
    with DATASETS.temporarily("synthetic-b", other) as name:
        yield name


@pytest.mark.e2e
def test_modality_search_averages_pairs_and_reports_each_pairs_optimum(second_demo_dataset, cache_dir, tmp_path):
    pairs = modality_pairs("demo", None)
    assert pairs == [("tiny", "synthetic"), ("tiny", "synthetic-b")]
    config = TuneConfig(pairs=pairs, modality="demo", epochs=2, objective="pareto", split_seeds=[1])
    result = search(
        config, 3, "modality", f"journal:{tmp_path / 'j.log'}", RunContext(device="cpu", cache_dir=cache_dir)
    )
    for t in result.trials:
        per_pair = t.user_attrs["pairs"]
        assert t.values[0] == pytest.approx(
            np.mean([per_pair[k]["ece"] for k in ("tiny/synthetic", "tiny/synthetic-b")]), abs=1e-15
        )
        assert t.values[1] == pytest.approx(np.mean([per_pair[k]["accuracy"] for k in per_pair]), abs=1e-15)
    from calbench.tune import best_params_document

    document = best_params_document(result)
    assert set(document["per_pair"]) == {"tiny/synthetic", "tiny/synthetic-b"}
    for _key, info in document["per_pair"].items():
        # a pair's own optimum is chosen among the trials feasible on that pair: at least as good as the shared
        # best there, unless the shared best (the least violating trial when none is feasible on every pair) is not
        assert info["val"]["ece"] <= info["shared_val"]["ece"] or info["shared_val"]["constraint"] > 0
    assert document["pareto_front"] and all(math.isfinite(p["ece"]) for p in document["pareto_front"])


runner = CliRunner()


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args, message",
    [
        (["tune", "--modality", "demo", "--model", "tiny"], "error: give either --modality or --model/--data"),
        (["tune", "--method", "zero-shot"], "error: no search space for 'zero-shot'"),
        (
            ["tune", "--objective", "auc"],
            "error: --objective 'auc': choose one of ece, nll, aurc, conformal-size, pareto",
        ),
        (["tune", "--modality", "radiology-x"], "error: no models and datasets of modality 'radiology-x'"),
        (["tune", "--space", "/no/such/space.yaml"], "error: --space file /no/such/space.yaml does not exist"),
    ],
)
def test_bad_tune_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = runner.invoke(app, [*args, "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.e2e
def test_a_search_whose_every_trial_fails_stops_with_one_line(monkeypatch, cache_dir, tmp_path):
    """Failed trials are replaced, so a space where every trial diverges would search for ever: a worker
    stops after MAX_FAILED_IN_A_ROW failures in a row, saying why; each failed trial keeps its reason."""
    from calbench.tune import limits

    monkeypatch.setattr(limits, "MAX_FAILED_IN_A_ROW", 3)
    space = parse_space("calibprompt", {"lr": {"choices": [1e12]}})
    storage = f"journal:{tmp_path / 'j.log'}"
    with pytest.raises(CalbenchError) as stopped:
        search(TuneConfig(epochs=3, space=space), 2, "diverge", storage, RunContext(device="cpu", cache_dir=cache_dir))
    assert str(stopped.value) == (
        "the search stopped: 3 trials in a row failed (the last, trial 2: diverged (split seed 1 fold 1/2, "
        "tiny/synthetic): "
        "loss became nan at epoch 2; lower the learning rate or loss weights); narrow the search space (--space) "
        "or choose another --objective"
    )
    trials = optuna.load_study(study_name="diverge", storage=open_storage(storage)).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert all(
        t.user_attrs["fail_reason"].startswith("diverged (split seed 1 fold 1/2, tiny/synthetic)") for t in trials
    )


def test_the_failure_streak_counts_a_workers_failures_in_a_row_and_names_a_nan_objective():
    from types import SimpleNamespace

    from calbench.tune.limits import FailureStreak

    stops = []
    study = SimpleNamespace(stop=lambda: stops.append(True))  # Optuna's stop() only works inside optimize
    streak = FailureStreak(2)
    ends = [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.FAIL]
    for number, state in enumerate(ends):
        streak(study, _trial(number, 0.1, 0.0, state))
        streak.check()  # never two failures in a row: it goes on
    assert stops == []
    streak(study, _trial(5, None, 0.0, TrialState.FAIL))
    assert stops == [True]
    with pytest.raises(
        CalbenchError, match=r"2 trials in a row failed \(the last, trial 5: its objective was not a number\)"
    ):
        streak.check()


@pytest.mark.parametrize("alpha, smallest", [(0.1, 9), (0.2, 4), (0.05, 19), (0.5, 1), (0.3, 3)])
def test_the_fewest_calibration_images_give_a_finite_conformal_threshold(alpha, smallest):
    """k = ceil((n + 1)(1 - alpha)) <= n first holds at n = smallest: at 0.1, 9 (k = 9), not 8 (k = 9)."""
    from calbench.deferral.conformal import SplitConformal, min_calibration_size

    assert min_calibration_size(alpha) == smallest
    probs = np.full((smallest, 3), 1 / 3)
    labels = np.arange(smallest) % 3
    assert math.isfinite(SplitConformal("lac", alpha).fit(probs, labels).threshold)
    assert SplitConformal("lac", alpha).fit(probs[:-1], labels[:-1]).threshold == math.inf


@pytest.mark.e2e
@pytest.mark.parametrize("val_shots, has", [(1, 1), (2, 2)])
def test_conformal_size_is_refused_when_the_validation_split_is_too_small(val_shots, has, cache_dir, tmp_path):
    """One image per class leaves a calibration half empty (NaN for every trial); two per class of 6 classes
    calibrate on 6 < 9, so every set holds every class and every trial scores the same. Refused before any trial."""
    config = TuneConfig(objective="conformal-size", epochs=2, val_shots=val_shots)
    storage = f"journal:{tmp_path / 'j.log'}"
    with pytest.raises(CalbenchError) as refused:
        search(config, 1, "small", storage, RunContext(device="cpu", cache_dir=cache_dir))
    assert str(refused.value) == (
        "--objective conformal-size at alpha 0.1 needs 4 validation images per class on tiny/synthetic "
        "(6 classes; each half of them calibrates the other and needs 9), "
        f"but split seed 1 has {has}; use --val-shots 4 or more"
    )
    assert optuna.load_study(study_name="small", storage=open_storage(storage)).trials[0].state == TrialState.WAITING


@pytest.mark.parametrize("url", ["not a url", "study.log", "results/study.db"])
def test_a_storage_that_is_neither_a_url_nor_a_journal_file_is_refused(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CalbenchError) as refused:
        open_storage(url)
    assert str(refused.value) == (
        f"--storage {url} is neither a database URL (sqlite:///PATH, postgresql+psycopg://USER@HOST/DB, "
        "mysql+pymysql://...) nor a journal file (journal:PATH)"
    )
    assert list(tmp_path.iterdir()) == []  # no file of that name was made


def test_trials_left_running_when_every_worker_ended_are_retried_once():
    """What heartbeats do on a database, the launcher does for a journal file once its workers have ended."""
    from calbench.tune.study import requeue_orphans

    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study = optuna.create_study()
    study.tell(study.ask(space), 0.5)
    orphan = study.ask(space)  # its worker was killed
    assert requeue_orphans(study) == [1] and requeue_orphans(study) == []
    states = [(t.number, t.state, t.system_attrs.get("failed_trial")) for t in study.trials]
    assert states == [(0, TrialState.COMPLETE, None), (1, TrialState.FAIL, None), (2, TrialState.WAITING, 1)]
    assert study.trials[2].params == {"x": orphan.params["x"]}


def test_surplus_counts_scored_trials_beyond_the_total():
    from calbench.tune.study import SearchResult

    study = optuna.create_study()
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE):
        study.tell(study.ask(), 0.5 if state == TrialState.COMPLETE else None, state=state)
    result = SearchResult(study, TuneConfig(), "memory", 4, 1.0, 2)
    assert result.surplus == 1  # three scored (complete or pruned), two asked for; a failed one is replaced
    assert SearchResult(study, TuneConfig(), "memory", 4, 1.0, 3).surplus == 0


def test_a_trial_finished_by_another_worker_is_recognised():
    """On SQLite two workers can take the same waiting trial; the second outcome is dropped, other errors raise."""
    from calbench.tune.study import finished_elsewhere

    study = optuna.create_study()
    trial = study.ask()
    study.tell(trial, 1.0)
    with pytest.raises(ValueError) as twice:
        study.tell(trial, 2.0)
    with pytest.raises(ValueError) as mistake:
        study.tell(study.ask(), state=TrialState.RUNNING)
    assert finished_elsewhere(twice.value) and not finished_elsewhere(mistake.value)
    assert finished_elsewhere(optuna.exceptions.UpdateFinishedTrialError("Trial#0 has already finished"))


def test_a_batch_trains_each_trial_once_and_gives_each_thread_its_outcome():
    """Optuna's threads hand their trials in; the last to arrive trains them all, in trial order. A trial two
    threads popped at once (SQLite) trains once, and both threads get its outcome."""
    import threading
    from types import SimpleNamespace

    from calbench.tune.batch import Together

    calls = []

    class FakeWorker:
        def run_trials(self, trials):
            calls.append([t.number for t in trials])
            return [float(t.number) if t.number != 7 else optuna.TrialPruned() for t in trials]

    together = Together(FakeWorker(), 4)
    trials = [SimpleNamespace(number=n) for n in (5, 3, 7)]
    handed = [trials[0], trials[1], trials[2], trials[1]]  # trial 3 popped by two threads
    got = {}

    def thread(i):
        try:
            got[i] = together(handed[i])
        except optuna.TrialPruned as pruned:
            got[i] = pruned

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert calls == [[3, 5, 7]]
    assert (got[0], got[1], got[3]) == (5.0, 3.0, 3.0) and isinstance(got[2], optuna.TrialPruned)


@pytest.mark.e2e
def test_conformal_size_on_too_small_a_validation_split_is_one_line_and_exit_2(cache_dir, tmp_path):
    args = ["tune", "--objective", "conformal-size", "--val-shots", "2", "--epochs", "1", "--trials", "1"]
    args += ["--search-only", "--device", "cpu", "--cache-dir", str(cache_dir), "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line.startswith("error: --objective conformal-size at alpha 0.1 needs 4 validation images per class")


# --- file-system errors ---------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("storage", ["{folder}", "journal:{folder}", "sqlite:///{folder}"])
def test_storage_that_is_a_folder_is_one_line(tmp_path, storage):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    url = storage.format(folder=folder)
    result = cli("tune", "--trials", "1", "--epochs", "1", "--storage", url, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: --storage {url} ") and "folder" in line
    assert list(folder.iterdir()) == []


# --- NaN and infinite options -----------------------------------------------------------------------


@pytest.mark.e2e
def test_a_refused_nan_tolerance_leaves_the_study_usable(tmp_path, cache_dir):
    out = tmp_path / "out"
    common = ["--trials", "1", "--epochs", "1", "--final-seeds", "1", "--search-only", "--out", out]
    one_error(
        cli("tune", "--acc-tolerance", "nan", *common, "--cache-dir", cache_dir),
        message=("--acc-tolerance is accuracy points a trial may lose, from 0 to 100; got nan"),
    )
    result = cli("tune", "--acc-tolerance", "1", *common, "--cache-dir", cache_dir)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("bound", [math.inf, -math.inf, "a"])
def test_a_space_file_bound_must_be_a_finite_number(bound):
    from calbench.tune import parse_space

    with pytest.raises(CalbenchError, match="lr needs finite numbers for low and high"):
        parse_space("calibprompt", {"lr": {"low": 1e-4, "high": bound}})
