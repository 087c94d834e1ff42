"""`calbench tune`'s choice under noise: bootstrap intervals by hand, the paired accuracy constraint, the rule
that keeps the hand-set setting unless a trial beats it beyond the noise, k-fold splits that never train on
their own validation images, and --val-shift copies that are read once and only ever scored."""

import numpy as np
import optuna
import pytest
import torch

from calbench.data import few_shot_split, fold_count
from calbench.metrics import ece, ece_weighted
from calbench.session import FewShot, RunContext
from calbench.tune import TuneConfig, search
from calbench.tune.config import auto_split_seeds, parse_val_shift
from calbench.tune.report_verdict import worse_on_test
from calbench.tune.selection import (
    Plan,
    Predictions,
    accuracy_gap_draws,
    accuracy_violation,
    confidence_better,
    decide,
    interval,
    judge,
    make_plan,
    objective_draws,
    reference_trial,
    unit_plan,
)

CLASSES = 6


def _probs(conf: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Top-label ``conf`` on ``predicted``, the rest spread evenly."""
    p = np.repeat(((1 - conf) / (CLASSES - 1))[:, None], CLASSES, axis=1)
    p[np.arange(len(conf)), predicted] = conf
    return p


def _one_group(probs: np.ndarray, labels: np.ndarray, **shifted: np.ndarray) -> Predictions:
    return Predictions({"a/b#1": labels}, {"a/b#1": {"clean": probs, **shifted}})


# four items of two classes, each in its own ECE bin: confidences 0.95 (right), 0.85 (wrong), 0.75, 0.65 (right)
FOUR = np.array([[0.95, 0.05], [0.85, 0.15], [0.25, 0.75], [0.35, 0.65]])
FOUR_LABELS = np.array([0, 1, 1, 1])


def test_weighted_ece_and_bootstrap_draws_match_a_hand_computation():
    counts = np.array([[1.0, 1, 1, 1], [2, 0, 1, 1], [0, 0, 0, 4]])
    # row 1: |1-.95| + |0-.85| + |1-.75| + |1-.65| = 1.5 over 4; row 2: item 0 twice: |2-1.9| + .25 + .35 = .7;
    # row 3: item 3 four times: |4-2.6| = 1.4
    assert ece_weighted(FOUR, FOUR_LABELS, counts) == pytest.approx([0.375, 0.175, 0.35], abs=1e-12)
    assert ece_weighted(FOUR, FOUR_LABELS, counts[:1])[0] == pytest.approx(ece(FOUR, FOUR_LABELS), abs=1e-12)
    plan = Plan({"a/b#1": counts}, {"a/b": np.ones((3, 1))}, {"a/b": ["a/b#1"]})
    assert objective_draws(_one_group(FOUR, FOUR_LABELS), plan, "ece") == pytest.approx([0.375, 0.175, 0.35])
    accuracy = objective_draws(_one_group(FOUR, FOUR_LABELS), plan, "accuracy")
    assert accuracy == pytest.approx([0.75, 1.0, 1.0])
    # a shifted copy where item 0 is wrong at 0.85 too: bin (0.8, 0.9] holds 0 hits against 1.7 confidence
    corrupted = FOUR.copy()
    corrupted[0] = [0.15, 0.85]
    shifted = _one_group(FOUR, FOUR_LABELS, **{"stain-3": corrupted})
    shifted_ece = np.array([(1.7 + 0.25 + 0.35) / 4, (3.4 - 1.7 + 0.25 + 0.35) / 4, 0.35])
    assert objective_draws(shifted, plan, "ece", "worst") == pytest.approx(shifted_ece)
    assert objective_draws(shifted, plan, "ece", "mean") == pytest.approx((shifted_ece + [0.375, 0.175, 0.35]) / 2)


def test_split_seeds_are_resampled_before_their_items():
    labels = {"a/b#1": FOUR_LABELS, "a/b#2": FOUR_LABELS}
    wrong = FOUR[[1, 1, 1, 1]]  # seed 2: every item predicted class 0 at 0.85; items 1-3 are class 1
    predictions = Predictions(labels, {"a/b#1": {"clean": FOUR}, "a/b#2": {"clean": wrong}})
    items = np.ones((3, 4))
    plan = Plan({g: items for g in labels}, {"a/b": np.array([[1.0, 1], [2, 0], [0, 2]])}, {"a/b": list(labels)})
    assert objective_draws(predictions, plan, "accuracy") == pytest.approx([(0.75 + 0.25) / 2, 0.75, 0.25])
    drawn = make_plan({"a/b#1": 4, "a/b#2": 4, "c/d#1": 5}, 200, seed=3)
    assert (drawn.items["c/d#1"].sum(axis=1) == 5).all() and (drawn.seeds["a/b"].sum(axis=1) == 2).all()
    assert (drawn.seeds["c/d"] == 1).all()  # one seed: nothing to resample
    again = make_plan({"a/b#1": 4, "a/b#2": 4, "c/d#1": 5}, 200, seed=3)
    assert all((again.items[g] == drawn.items[g]).all() for g in drawn.items)  # every worker draws the same
    assert interval(np.arange(101.0)) == pytest.approx((5.0, 95.0), abs=1e-12)


def test_accuracy_constraint_is_paired_and_one_image_cannot_break_it():
    counts = np.array([[1.0, 1, 1, 1], [2, 0, 2, 0]])
    plan = Plan({"a/b#1": counts}, {"a/b": np.ones((2, 1))}, {"a/b": ["a/b#1"]})
    gaps = accuracy_gap_draws(_one_group(FOUR, FOUR_LABELS), {"a/b#1": [1, 1, 1, 1]}, plan)
    # the trial is wrong on item 1 only, CoOp-CE right on all: (3 - 4) / 4, then items 0 and 2 twice: (4 - 4) / 4
    assert gaps["a/b"] == pytest.approx([-0.25, 0.0])
    # the 90% quantile of (-0.25, 0) is -0.025: below CoOp-CE by more than 1 point even at the optimistic end
    assert accuracy_violation(gaps, 0.01, 0.9) == pytest.approx(-0.01 + 0.025)

    labels = np.repeat(np.arange(CLASSES), 8)  # 48 images, as the demo's validation split
    coop = np.ones(48, dtype=int)
    big = make_plan({"a/b#1": 48}, 1000)
    for wrong, feasible in ((1, True), (10, False)):
        predicted = labels.copy()
        predicted[:wrong] = (labels[:wrong] + 1) % CLASSES
        gaps = accuracy_gap_draws(_one_group(_probs(np.full(48, 0.9), predicted), labels), {"a/b#1": coop}, big)
        # one image is 2.1 points: the old point rule (at most 1 point below) broke on it
        assert (accuracy_violation(gaps, 0.01, 0.9) <= 0) == feasible, wrong


def _demo_like() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """96 validation predictions (16 per class): the hand-set setting overconfident (ECE 0.20); a candidate
    3 points better but right and wrong on other images (noisy); one calibrated (ECE 0.03, clearly better)."""
    labels = np.repeat(np.arange(CLASSES), 16)
    i = np.arange(len(labels))
    other = (labels + 1) % CLASSES
    hand = _probs(np.full(len(i), 0.95), np.where(i % 4 == 0, other, labels))
    wrong = (i % 4 == 1) | (i % 8 == 0)
    noisy = _probs(np.where(wrong, 0.4, 0.97), np.where(wrong, other, labels))
    clear = _probs(np.full(len(i), 0.78), np.where(i % 4 == 0, other, labels))
    return labels, {"hand": hand, "noisy": noisy, "clear": clear}


def test_a_noisy_better_trial_is_rejected_and_a_clearly_better_one_taken():
    labels, probs = _demo_like()
    plan = make_plan({"a/b#1": len(labels)}, 1000)
    draws = {k: objective_draws(_one_group(p, labels), plan, "ece") for k, p in probs.items()}
    points = {k: ece(p, labels) for k, p in probs.items()}
    assert points["noisy"] == pytest.approx(0.16875) and points["hand"] == pytest.approx(0.2)
    assert 0.5 < confidence_better(draws["noisy"], draws["hand"]) < 0.9
    assert confidence_better(draws["clear"], draws["hand"]) > 0.99
    numbers = {"hand": 0, "noisy": 1, "clear": 2}
    by_number = {numbers[k]: v for k, v in draws.items()}
    feasible = dict.fromkeys(numbers.values(), True)
    noisy_only = decide({0: points["hand"], 1: points["noisy"]}, by_number, feasible, 0, 0.9)
    assert (noisy_only.best, noisy_only.chosen, noisy_only.kept) == (1, 0, True)
    assert "kept" in noisy_only.reason()
    both = decide({numbers[k]: v for k, v in points.items()}, by_number, feasible, 0, 0.9)
    assert (both.best, both.chosen, both.kept) == (2, 2, False)
    # a clearly better trial below CoOp-CE's accuracy cannot be chosen
    assert decide({0: 0.2, 2: 0.03}, by_number, {0: True, 2: False}, 0, 0.9).chosen == 0


def test_a_win_on_one_training_is_not_evidence_once_other_trainings_disagree():
    """One split seed's bootstrap resamples its validation images but keeps its one training: a candidate
    that won on that training looks certain. Split seeds where it lost spread the draws, and the rule keeps
    the hand-set setting (why the data-size rule takes at least 3 seeds)."""
    labels, probs = _demo_like()
    runs = {1: ("clear", "hand"), 2: ("hand", "clear"), 3: ("hand", "clear")}  # seed -> (candidate, hand-set)

    def judged(seeds: list[int]) -> tuple[dict[int, float], dict[int, np.ndarray]]:
        groups = {f"a/b#{s}": labels for s in seeds}
        sizes = {g: len(labels) for g in groups}
        plan, unit = make_plan(sizes, 1000), unit_plan(sizes)
        trials = {n: Predictions(groups, {f"a/b#{s}": {"clean": probs[runs[s][1 - n]]} for s in seeds}) for n in (0, 1)}
        points = {n: float(objective_draws(p, unit, "ece")[0]) for n, p in trials.items()}
        return points, {n: objective_draws(p, plan, "ece") for n, p in trials.items()}

    points, draws = judged([1])
    assert points == pytest.approx({0: 0.2, 1: ece(probs["clear"], labels)}) and points[1] < 0.05
    assert decide(points, draws, {0: True, 1: True}, 0, 0.9).chosen == 1  # certain, on one training
    points, draws = judged([1, 2, 3])
    assert points[1] > points[0]  # over the three trainings the hand-set setting is better
    assert confidence_better(draws[1], draws[0]) < 0.5
    assert decide(points, draws, {0: True, 1: True}, 0, 0.9).chosen == 0


def test_judge_reads_a_studys_trials_and_finds_the_hand_set_one():
    labels, probs = _demo_like()
    config = TuneConfig()
    study = optuna.create_study()
    for name, p in probs.items():
        predictions = _one_group(p, labels)
        attrs = {"predictions": predictions.to_json(), "objective": ece(p, labels)}
        if name == "hand":
            attrs["enqueued"] = "default"
        study.add_trial(optuna.trial.create_trial(value=ece(p, labels), user_attrs=attrs))
    trials = study.get_trials()
    assert reference_trial(trials, config) == 0
    coop = (np.arange(len(labels)) % 4 != 0).astype(int)  # right where the hand-set setting is
    judged = judge(trials, config, {"a/b#1": coop}, 0)
    assert judged.verdict.chosen == 2
    summary = judged.summaries[2]
    low, high = summary.objective_interval
    assert low < summary.objective < high and summary.gap == 0 and summary.feasible
    assert judge(trials, config, {"a/b#1": np.ones(len(labels), dtype=int)}, 0).verdict.chosen == 0  # 25 points below
    assert judged.summaries[0].beats_reference == 0.5  # against itself: every resample a tie


@pytest.mark.parametrize("shots,val", [(8, 8), (8, 4), (8, 3), (2, 1)])
def test_folds_never_train_on_their_own_validation_images(shots, val):
    labels = np.repeat(np.arange(4), 20)
    folds = [few_shot_split(labels, shots, val, seed=5, fold=f) for f in range(fold_count(shots, val))]
    assert len(folds) == (shots + val) // val
    drawn = set(folds[0][0]) | set(folds[0][1])
    for train, held_out in folds:
        assert not set(train) & set(held_out)
        assert len(train) == 4 * shots and len(held_out) == 4 * val
        assert set(train) | set(held_out) == drawn  # the same labelled images, turned
    held = [set(v) for _, v in folds]
    assert sum(len(v) for v in held) == len(set().union(*held))  # every image is validated at most once
    if shots % val == 0:
        assert set().union(*held) == drawn  # ... and exactly once when val shots divide shots
    plain = few_shot_split(labels, shots, val, seed=5)
    assert all((a == b).all() for a, b in zip(plain, folds[0]))  # fold 0 is every other command's split


def test_data_size_rule_and_val_shift_parsing():
    # at least 3 seeds, so a trial's noise includes other draws of shots and other trainings; 8 + 8 shots on two
    # folds already give 16 per class from one seed; 2 and 1 shots need 4 and 8 seeds, capped at 5
    assert TuneConfig().folds == 2 and TuneConfig().split_seeds == [1, 2, 3]
    assert auto_split_seeds(4, 2) == [1, 2, 3] and auto_split_seeds(2, 2) == [1, 2, 3, 4]
    assert auto_split_seeds(1, 2) == [1, 2, 3, 4, 5] and auto_split_seeds(16, 1) == [1, 2, 3]
    assert TuneConfig(shots=4).split_seeds == [1, 2, 3]
    assert TuneConfig(split_seeds=[7], folds=1).splits() == [(7, 0, 1)]
    assert parse_val_shift("stain") == [("stain", 3)]
    assert parse_val_shift("stain,gaussian_blur:1,5") == [
        ("stain", 1),
        ("stain", 5),
        ("gaussian_blur", 1),
        ("gaussian_blur", 5),
    ]
    assert parse_val_shift("none") == []


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"folds": 3}, "--folds must be 1 to 2"),
        ({"shift_objective": "best"}, "choose mean or worst"),
        ({"confidence": 1.0}, "--confidence"),
    ],
)
def test_bad_judging_options_are_one_line_errors(kwargs, message):
    from calbench.errors import CalbenchError

    with pytest.raises(CalbenchError, match=message):
        TuneConfig(**kwargs)
    with pytest.raises(CalbenchError, match="unknown corruption"):
        parse_val_shift("fog:2")
    with pytest.raises(CalbenchError, match="severities"):
        parse_val_shift("stain:7")


def test_val_shift_copies_are_read_once_scored_and_never_trained_on(monkeypatch, session, cache_dir, tmp_path):
    from calbench.cache import FeatureCache
    from calbench.tune import worker

    calls, fitted = [], []
    features, together = FeatureCache.features, worker.fit_together

    def spy(self, dataset, split, indices, kind="eval", *args, **kwargs):
        calls.append((split, kind, tuple(int(i) for i in indices)))
        return features(self, dataset, split, indices, kind, *args, **kwargs)

    def spy_fit(methods, data):
        fitted.extend(data)
        return together(methods, data)

    monkeypatch.setattr(FeatureCache, "features", spy)
    monkeypatch.setattr(worker, "fit_together", spy_fit)
    torch.set_num_threads(1)
    config = TuneConfig(epochs=1, val_shift=parse_val_shift("stain,gaussian_blur:2"), pruner="none", split_seeds=[1])
    context = RunContext(device="cpu", cache_dir=cache_dir)
    result = search(config, 3, "shifted", f"journal:{tmp_path / 'j.log'}", context)
    shifted = [c for c in calls if c[1].startswith("shift-")]
    held_out = {session.split(1, FewShot(8, fold=f))[1].tobytes() for f in (0, 1)}
    # 2 corruptions x 2 folds, read once for all three trials, each on its fold's validation images only
    assert len(shifted) == 4 and len({c[1:] for c in shifted}) == 4
    assert {np.array(c[2], dtype=np.int64).tobytes() for c in shifted} == held_out
    assert len(fitted) == 6 and all(not fit.extra for fit in fitted)  # trained on clean views alone
    trial = result.trials[-1]
    assert set(trial.user_attrs["conditions"]) == {"clean", "stain-2", "gaussian_blur-2"}
    assert trial.value == pytest.approx(np.mean([c["ece"] for c in trial.user_attrs["conditions"].values()]))


def test_a_tuned_setting_worse_on_test_gets_a_plain_warning():
    rows = [
        {"method": method, "seed": seed, "ece": value}
        for method, values in (("coop-ls:tuned", (0.06, 0.08)), ("coop-ls:default", (0.05, 0.05)))
        for seed, value in zip((1, 2), values)
    ]
    warning = worse_on_test(rows, "coop-ls", "coop-ls:default")
    assert warning.startswith("the tuned setting calibrates worse on the test split than the hand-set one")
    assert "(test ECE 7.00% vs 5.00%)" in warning
    assert worse_on_test(rows[2:] + rows[2:], "coop-ls", "coop-ls:default") is None  # no tuned rows
    better = [{**r, "ece": 0.01} if r["method"].endswith(":tuned") else r for r in rows]
    assert worse_on_test(better, "coop-ls", "coop-ls:default") is None
