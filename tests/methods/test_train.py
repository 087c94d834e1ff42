import math
from dataclasses import asdict

import pytest
import torch
from training import train_prompt_learner

from calbench.errors import CalbenchError
from calbench.losses import Objective, Term, calibprompt_objective
from calbench.prompts import PromptLearner, load_prompt, save_prompt
from calbench.session import FewShot
from calbench.train import TrainConfig, TrainingDiverged, learning_rate

NAMES = ["red", "green", "blue"]


def _features(seed=0, views=2, n=12, dim=128):  # the width of `tiny`
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.nn.functional.normalize(torch.randn(3, dim, generator=g), dim=1)
    feats = centres[labels][None].repeat(views, 1, 1) + 0.3 * torch.randn(views, n, dim, generator=g)
    return torch.nn.functional.normalize(feats, dim=2), labels


def test_paper_defaults_live_in_the_config():
    cfg = TrainConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (50, 16, 0.002, 0.9, 5e-4)
    assert (cfg.warmup_epochs, cfg.warmup_lr, cfg.n_ctx, cfg.shots) == (1, 1e-5, 16, 8)


def test_schedule_is_constant_warmup_then_cosine():
    cfg = TrainConfig(epochs=10)
    assert learning_rate(0, cfg) == 1e-5
    assert learning_rate(1, cfg) == pytest.approx(0.002)  # the cosine's first step comes after warm-up
    assert learning_rate(2, cfg) == pytest.approx(0.001 * (1 + math.cos(math.pi / 10)))
    assert learning_rate(6, cfg) == pytest.approx(0.001)
    assert learning_rate(9, cfg) == pytest.approx(0.001 * (1 + math.cos(math.pi * 0.8)))


def test_training_is_deterministic_and_lowers_the_loss(tiny, synthetic, session):
    fit = session.fit_data(1, FewShot(shots=8, views=4))
    cfg = TrainConfig(epochs=12, n_ctx=4)
    runs = []
    for _ in range(2):
        learner = PromptLearner(tiny, synthetic.classnames, n_ctx=4, seed=1)
        history = train_prompt_learner(
            learner,
            calibprompt_objective(alpha=0.05, w_smac=1.0, w_as=0.01),
            fit.train_features,
            fit.train_labels,
            cfg,
            seed=1,
        )
        runs.append((learner.ctx.detach().clone(), history))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=0, rtol=0)
    history = runs[0][1]
    assert len(history) == 12 and set(history[0]) == {"loss", "ls", "smac", "as"}
    assert history[-1]["loss"] < history[0]["loss"] - 0.05


def test_views_rotate_per_epoch(tiny):
    """Epoch e must read view e mod V: with one poisoned view, training on that epoch explodes."""
    feats, labels = _features(views=3)
    feats[1] = float("nan")
    cfg = TrainConfig(epochs=3, n_ctx=2)
    learner = PromptLearner(tiny, NAMES, n_ctx=2, seed=0)
    with pytest.raises(TrainingDiverged, match="at epoch 2"):
        train_prompt_learner(learner, Objective({"ce": Term("cross_entropy")}), feats, labels, cfg, seed=0)


def test_saved_context_reloads_exactly(tiny, tmp_path):
    feats, labels = _features()
    cfg = TrainConfig(epochs=2, n_ctx=4)
    learner = PromptLearner(tiny, NAMES, n_ctx=4, seed=2)
    train_prompt_learner(learner, calibprompt_objective(alpha=0.05, w_smac=1.0, w_as=0.01), feats, labels, cfg, seed=2)
    save_prompt(tmp_path / "p.safetensors", learner, asdict(cfg), {"method": "calibprompt"})
    loaded = load_prompt(tmp_path / "p.safetensors", tiny)
    torch.testing.assert_close(loaded.text_features(), learner.text_features(), atol=0, rtol=0)


# --- parameters outside their declared range -------------------------------------------------


def test_a_training_config_built_directly_is_checked_too():
    with pytest.raises(CalbenchError) as caught:
        TrainConfig(epochs=0)
    assert str(caught.value) == "training option epochs=0 is outside [1, 10000]; pass a value in that range"
