"""Dataset shift through `evaluate` (thresholds and conformal sets fitted on the training dataset's
validation split, applied to another dataset's test split) and the deferral objectives of `tune`."""

import shutil

import numpy as np
import pytest
import torch

from calbench.deferral import DeferralSettings, deferral_metrics
from calbench.deferral.conformal import halves_set_size
from calbench.deferral.selective import aurc
from calbench.errors import CalbenchError
from calbench.prompts import read_prompt_info
from calbench.session import FewShot, RunContext, Session
from calbench.single_runs import evaluate_prompt, restore_method, train_one
from calbench.tune.config import TuneConfig
from calbench.tune.worker import val_metrics


def site(synthetic, root, offset):
    """A copy of the synthetic dataset's classes with 6 train and 3 test images per class from ``offset`` on."""
    (root / "images").mkdir(parents=True)
    shutil.copy(synthetic.root / "classnames.txt", root / "classnames.txt")
    for split, keep in (("train", 6), ("test", 3)):
        for folder in sorted((synthetic.root / "images" / split).iterdir()):
            (root / "images" / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[offset : offset + keep]:
                shutil.copy(image, root / "images" / split / folder.name / image.name)
    return root


@pytest.mark.e2e
def test_evaluate_fits_on_the_training_sites_validation_split(synthetic, cache_dir, tmp_path):
    home, other = site(synthetic, tmp_path / "home", 0), site(synthetic, tmp_path / "other", 10)
    context = RunContext(device="cpu", cache_dir=cache_dir)
    fewshot = FewShot(2, 2, 2)
    path, _ = train_one("coop-ce+ts", "tiny-random", str(home), 1, fewshot, context, tmp_path / "p", {"epochs": 2})
    shifted = evaluate_prompt(path, str(other), context=context)
    assert shifted.note == "" and shifted.trained_on == "home"
    # by hand: the same method's validation probabilities on the home site, its test ones on the other site
    session = Session("tiny-random", str(home), context)
    target = Session("tiny-random", str(other), context)
    _, method, _ = restore_method(read_prompt_info(path), session, path)
    fit = session.fit_data(1, fewshot, method, score_val=True)
    with torch.no_grad():
        val = method.predict_proba(fit.val_features).double().numpy()
        test = method.predict_proba(target.test_features(method)).double().numpy()
    expected = deferral_metrics(val, fit.val_labels.numpy(), test, target.test_labels, seed=1)
    assert {k: shifted.metrics[k] for k in expected} == pytest.approx(expected, nan_ok=True)


def test_tune_objectives_include_aurc_and_conformal_size():
    rng = np.random.default_rng(0)
    probs = torch.as_tensor(rng.dirichlet(np.ones(4), size=40))
    labels = torch.as_tensor(np.arange(40) % 4)
    measured = val_metrics(probs, labels)
    assert measured["aurc"] == aurc(probs.numpy(), labels.numpy())
    assert measured["conformal-size"] == halves_set_size(probs.numpy(), labels.numpy(), DeferralSettings.alpha)
    assert TuneConfig(objective="aurc").metric == "aurc"
    assert TuneConfig(objective="conformal-size").metric == "conformal-size"
    with pytest.raises(CalbenchError, match="conformal-size"):
        TuneConfig(objective="coverage")
