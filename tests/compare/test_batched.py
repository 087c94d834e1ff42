"""Prompt learners trained together in one text-tower pass equal their separate runs (calbench.batched)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calbench.base import FitData
from calbench.batched import fit_together, max_prompts, text_groups
from calbench.methods import make_method
from calbench.prompts import PromptLearner, text_features_together
from calbench.train import logits_for

CLASSES = ["tumor", "stroma", "immune cells", "debris"]


@pytest.fixture(scope="module")
def vlm():
    from calbench.models import load_vlm

    return load_vlm("tiny-random", device="cpu")


def _data(vlm, seed: int, views: int = 3, n: int = 24) -> FitData:
    g = torch.Generator().manual_seed(100 + seed)
    labels = torch.arange(n) % len(CLASSES)
    # features near their class's direction, so the losses have something to learn
    centres = F.normalize(torch.randn(len(CLASSES), vlm.embed_dim, generator=g), dim=-1)
    train = F.normalize(centres[labels] + 0.8 * torch.randn(views, n, vlm.embed_dim, generator=g), dim=-1)
    val = F.normalize(centres[labels] + 0.8 * torch.randn(n, vlm.embed_dim, generator=g), dim=-1)
    return FitData(vlm, CLASSES, "a photo of {}.", train, labels, val, labels, seed)


def _method(name: str, **params):
    return make_method(name, **{"epochs": 3, "batch_size": 8, "lr": 0.5, "n_ctx": 4, **params})


# CoOp-CE, CalibPrompt (LS + SMAC + AS on the text features) and a zero-shot-anchored loss (text moment
# matching to the hand prompts), each on its own seed; one with other epochs and one with another
# context length, which takes its own pass
RUNS = [
    ("coop-ce", 1, {}),
    ("calibprompt", 2, {"w_smac": 1.0, "w_as": 0.5}),
    ("coop-tmm", 3, {"weight": 5.0}),
    ("coop-penalty", 1, {"epochs": 5}),
    ("coop-ce", 2, {"n_ctx": 6}),
]


def test_runs_trained_together_equal_their_separate_runs(vlm):
    alone = [_method(name, **params).fit(_data(vlm, seed)) for name, seed, params in RUNS]
    methods = [_method(name, **params) for name, seed, params in RUNS]
    together = fit_together(methods, [_data(vlm, seed) for _, seed, _ in RUNS])
    assert all(outcome.ok for outcome in together)
    for single, shared in zip(alone, (outcome.fitted() for outcome in together)):
        assert shared is not single
        assert len(shared.history) == len(single.history) == single.config.epochs
        torch.testing.assert_close(shared.learner.ctx, single.learner.ctx, rtol=0, atol=2e-6)
        with torch.no_grad():
            torch.testing.assert_close(
                shared.learner.text_features(), single.learner.text_features(), rtol=0, atol=2e-6
            )
        for epoch_shared, epoch_single in zip(shared.history, single.history):
            assert epoch_shared == pytest.approx(epoch_single, abs=1e-5)
        val = _data(vlm, 1).val_features  # scored with the features of the shared pass that ended training
        torch.testing.assert_close(shared.predict_logits(val), single.predict_logits(val), rtol=0, atol=1e-4)
    # training moved every context away from its start, so equality is not that of untouched prompts
    start = PromptLearner(vlm, CLASSES, n_ctx=4, seed=1).ctx
    assert (alone[0].learner.ctx - start).abs().max() > 1e-3


def test_trained_features_come_from_one_shared_pass(vlm, monkeypatch):
    calls = []
    own = PromptLearner.text_features
    monkeypatch.setattr(PromptLearner, "text_features", lambda self: calls.append(self) or own(self))
    outcomes = fit_together([_method("coop-ce"), _method("calibprompt")], [_data(vlm, 1), _data(vlm, 2)])
    fitted = [outcome.fitted() for outcome in outcomes]
    assert calls == []  # trained together, and their class features computed together after
    val = _data(vlm, 1).val_features
    with torch.no_grad():
        for method in fitted:  # features within 1e-6 each: logits within logit_scale * 1e-6 * sqrt(D) (unit images)
            expected = logits_for(val, own(method.learner), vlm.logit_scale)
            atol = vlm.logit_scale * 1e-6 * val.shape[1] ** 0.5
            torch.testing.assert_close(method.predict_logits(val), expected, rtol=0, atol=atol)


def test_one_pass_gives_each_learner_its_own_features(vlm):
    learners = [PromptLearner(vlm, CLASSES, n_ctx=4, seed=seed) for seed in (1, 2, 3)]
    with torch.no_grad():
        stacked = text_features_together(learners)
        for learner, features in zip(learners, stacked):
            torch.testing.assert_close(features, learner.text_features(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="same model and prompt length"):
        text_features_together([learners[0], PromptLearner(vlm, CLASSES, n_ctx=6, seed=1)])


def test_a_run_stopped_by_its_callback_leaves_the_others_untouched(vlm):
    stopped = _method("coop-ce")

    def prune(epoch: int, losses: dict[str, float]) -> None:
        if epoch == 1:
            raise RuntimeError("pruned at epoch 2")

    stopped.on_epoch = prune
    other = _method("calibprompt")
    outcomes = fit_together([stopped, other], [_data(vlm, 1), _data(vlm, 2)])
    assert outcomes[0].method is None and isinstance(outcomes[0].error, RuntimeError)
    assert str(outcomes[0].error) == "pruned at epoch 2"
    with pytest.raises(RuntimeError, match="pruned at epoch 2"):
        outcomes[0].fitted()
    alone = _method("calibprompt").fit(_data(vlm, 2))
    torch.testing.assert_close(outcomes[1].fitted().learner.ctx, alone.learner.ctx, rtol=0, atol=2e-6)


def test_text_groups_split_by_prompt_length_and_cap(vlm):
    methods = [_method("coop-ce"), _method("coop-ce", n_ctx=6), _method("coop-ls"), _method("coop-ce")]
    runs = [m.training_run(_data(vlm, 1)) for m in methods]
    assert text_groups(runs, 128) == [[0, 2, 3], [1]]
    assert text_groups(runs, 2 * len(CLASSES)) == [[0, 2], [3], [1]]
    assert text_groups(runs, 1) == [[0], [2], [3], [1]]  # a run larger than the cap goes alone
    assert max_prompts(torch.device("cpu")) == 128 and max_prompts(torch.device("cuda")) == 512


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore::calbench.errors.CalbenchWarning")  # a random-weight model: degenerate runs
def test_compare_grid_batched_equals_one_by_one(cache_dir, tmp_path):
    from calbench.compare import CompareRequest, Grid, run_compare
    from calbench.session import FewShot, RunContext

    params = {m: {"epochs": 2, "lr": 0.5} for m in ("coop-ce", "coop-tmm")}
    methods = ["coop-ce", "coop-ce+ts", "coop-tmm"]
    context = RunContext(device="cpu", cache_dir=cache_dir)
    grid = Grid(methods, (1, 2), FewShot(shots=4, views=2), bootstrap=0, method_params=params)
    rows, logs = {}, []
    for label, limit in (("batched", 512), ("alone", 0)):
        run = run_compare(
            CompareRequest(
                model="tiny-random",
                data="synthetic",
                grid=replace(grid, max_prompts=limit),
                context=context,
                out=tmp_path / label,
            ),
            log=logs.append,
        )
        assert run.computed == len(methods) * 2 and not run.failures
        rows[label] = {(r["method"], r["seed"]): r for r in run.rows}
    assert sum("each method's 2 seeds share text-tower passes" in line for line in logs) == 1  # once per grid
    assert rows["batched"].keys() == rows["alone"].keys()
    for key, row in rows["batched"].items():
        for metric in ("accuracy", "ece", "nll", "brier"):
            assert row[metric] == pytest.approx(rows["alone"][key][metric], abs=1e-5), (key, metric)


@pytest.mark.e2e
def test_a_runs_numbers_do_not_depend_on_the_methods_trained_beside_it(cache_dir, tmp_path):
    """A shared pass's rounding depends on its shape (how the threads split its reductions); grouped by
    method, coop-logitnorm's runs share passes with its own seeds only, so its probabilities are the same
    bits whatever --methods lists beside it (before: 1e-7 of its context, up to 8e-4 of a probability
    on the demo, LogitNorm amplifying the rounding)."""
    from calbench.compare import CompareRequest, Grid, run_compare
    from calbench.results import ResultsStore
    from calbench.session import FewShot, RunContext

    context = RunContext(device="cpu", cache_dir=cache_dir)
    probs = {}
    for label, others in (
        ("alone", []),
        ("one", ["coop-ce"]),
        ("four", ["coop-ls", "coop-mbls", "coop-focal", "calibprompt"]),
    ):
        methods = ["coop-logitnorm", *others]
        params = {m: {"epochs": 4, "n_ctx": 16} for m in methods}
        grid = Grid(methods, (1,), FewShot(shots=8, views=4), bootstrap=0, method_params=params)
        run = run_compare(CompareRequest(grid, "tiny", "synthetic", context=context, out=tmp_path / label))
        assert not run.failures
        store = ResultsStore(tmp_path / label)
        probs[label] = next(store.predictions(r) for r in run.rows if r["method"] == "coop-logitnorm")
    np.testing.assert_array_equal(probs["one"], probs["alone"])
    np.testing.assert_array_equal(probs["four"], probs["alone"])


@pytest.mark.e2e
def test_tune_batch_trials_give_each_trial_its_own_result(cache_dir, tmp_path):
    """`tune --batch-trials 3`: the same trials (enqueued defaults, then seeded random draws) with the
    same values as one at a time, and the study counts exactly the trials asked for."""
    from optuna.trial import TrialState

    from calbench.session import RunContext
    from calbench.tune import TuneConfig, search

    context = RunContext(device="cpu", cache_dir=cache_dir)
    results = {}
    for batch in (1, 3):
        config = TuneConfig(
            pairs=[("tiny-random", "synthetic")], epochs=2, pruner="none", batch_trials=batch, split_seeds=[1]
        )
        results[batch] = search(config, 4, "batched", f"journal:{tmp_path / f'{batch}.log'}", context, 1, 0)
    one, three = results[1].trials, results[3].trials
    assert len(three) == 4 and results[3].ran == 4  # a batch of 3, then only the 1 still missing
    assert [t.state for t in three] == [TrialState.COMPLETE] * 4
    for alone, together in zip(one, three):
        assert together.params == alone.params
        assert together.value == pytest.approx(alone.value, abs=1e-5)
        assert together.user_attrs["val"] == pytest.approx(alone.user_attrs["val"], abs=1e-5)
