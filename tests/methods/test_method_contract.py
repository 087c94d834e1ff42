"""One contract battery over every registered method, as scikit-learn's ``check_estimator`` runs one
over every estimator: a method added to the registry is checked without a line of test code.

The contract (:mod:`calbench.base`): building stores parameters and does no work, ``fit(FitData)``
returns self, ``predict_proba`` gives (N, C) finite probabilities whose rows sum to 1, a fixed seed
gives the same numbers, a second fit forgets the first, the declared ``Capabilities`` are what fit and
predict need, and what a method fits on holds no test image. Each check runs on every base method
(``promptsmooth`` included) and on post-hoc calibrated variants, on the ``tiny`` model and the
``synthetic`` dataset with the fewest epochs, views and noisy copies that still run every code path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace

import numpy as np
import pytest
import torch
from torch import Tensor

from calbench.base import METHODS, Calibrated, FitData, Method, base_of, fit_requests
from calbench.calibprompt import PromptMethod
from calbench.methods import list_calibrators, make_method
from calbench.prompts import PromptLearner
from calbench.session import FewShot, Session

#: 4 shots of 6 classes and 2 cached views: the smallest few-shot draw a trainer batches over
FEWSHOT = FewShot(shots=4, views=2)
#: predictions are checked on this many validation images (zero-shot PromptSmooth tunes per image)
IMAGES = 8
#: a method that trains (its default build declares epochs) trains for this many: 2 still run a scheduler
#: step after the first
EPOCHS = 2
#: fewer noisy copies and tuning steps where the defaults are slow for a test (3 copies still average,
#: 1 tuning step still moves the context); every other registered method needs no entry here
FAST = {
    "promptsmooth": {"n_samples": 3},
    "promptsmooth-as": {"n_samples": 3},
    "promptsmooth-zs": {"n_samples": 3, "adapt_samples": 2, "tta_steps": 1},
}
#: every calibrator on the cheapest base, and one on a trained and on a smoothed base
VARIANTS = [f"zero-shot+{c}" for c in list_calibrators()] + ["coop-ce+ts", "promptsmooth+ts"]
NAMES = METHODS.names() + VARIANTS


def settings(name: str) -> dict[str, object]:
    """The battery's parameters for ``name`` (a base method or ``<base>+<calibrator>``)."""
    base = name if name in METHODS else name.rpartition("+")[0]
    trains = make_method(base).capabilities.epochs > 0
    return {**FAST.get(base, {}), **({"epochs": EPOCHS} if trains else {})}


def build(name: str) -> Method:
    return make_method(name, **settings(name))


@pytest.fixture(scope="module")
def fit_data(session: Session) -> Callable[[Method], FitData]:
    """The FitData a run of seed 1 gives ``method``: the declared extra features, nothing more."""
    return lambda method: session.fit_data(1, FEWSHOT, method)


@pytest.fixture(scope="module")
def inputs(session: Session) -> Callable[[Method], Tensor]:
    """Validation images in the form ``method`` predicts from: (N, D) features or (S, N, D) noisy copies."""

    def form(method: Method) -> Tensor:
        return session.fit_data(1, FEWSHOT, method, score_val=True).val_inputs(base_of(method))[..., :IMAGES, :]

    return form


@pytest.fixture(scope="module")
def test_sample(session: Session) -> Tensor:
    """Clean features of every 15th test image (60 of the 900, all classes): enough to catch a test image
    in what a method fits on without encoding the whole test split."""
    return session.test_views("eval", range(1), np.arange(0, len(session.test_labels), 15))[0]


@dataclass
class Fit:
    """What fitting a freshly built method once showed: what ``fit`` returned, which of its data's
    tensors it wrote to, and the probabilities it then gave."""

    method: Method
    returned: object
    written: list[str]
    probs: Tensor


def tensors_of(data: FitData) -> dict[str, Tensor]:
    named = {f.name: getattr(data, f.name) for f in fields(data)}
    return {
        **{key: value for key, value in named.items() if isinstance(value, Tensor)},
        **{f"extra[{key}]": value for key, value in data.extra.items()},
    }


@pytest.fixture(scope="module")
def fitted(fit_data, inputs) -> Callable[[str], Fit]:
    """Each method fitted once, shared by the checks that only read what the fit showed."""
    memo: dict[str, Fit] = {}

    def get(name: str) -> Fit:
        if name not in memo:
            method = build(name)
            data = fit_data(method)
            before = {key: value.clone() for key, value in tensors_of(data).items()}
            returned = method.fit(data)
            written = [key for key, value in tensors_of(data).items() if not torch.equal(value, before[key])]
            with torch.no_grad():
                memo[name] = Fit(method, returned, written, method.predict_proba(inputs(method)))
        return memo[name]

    return get


def copies_of(method: Method) -> int:
    """How many noisy copies a smoothed method averages over (1 for a method of plain features)."""
    caps = base_of(method).capabilities
    return caps.test_copies.views if caps.test_copies is not None else 1


def held_tensors(method: object) -> Iterator[str]:
    """Names of tensors or modules a built method holds, in itself or in the methods and calibrators inside it."""
    for key, value in vars(method).items():
        if isinstance(value, (Tensor, torch.nn.Module)):
            yield f"{type(method).__name__}.{key}"
        elif hasattr(value, "__dict__") and (hasattr(value, "capabilities") or key == "calibrator"):
            yield from held_tensors(value)


def settings_of(method: object) -> dict[str, object]:
    """A built method's plain settings, in itself and in the methods and calibrators inside it."""
    out: dict[str, object] = {"class": type(method).__name__}
    for key, value in vars(method).items():
        if isinstance(value, (int, float, str, bool, tuple, type(None))) or key in ("config", "objective"):
            out[key] = value
        elif hasattr(value, "__dict__") and (hasattr(value, "capabilities") or key == "calibrator"):
            out[key] = settings_of(value)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_building_does_no_work(name):
    torch_rng, numpy_rng = torch.get_rng_state(), np.random.get_state()
    method = build(name)
    assert torch.equal(torch.get_rng_state(), torch_rng), "building drew from torch's random generator"
    assert np.random.get_state()[1].tolist() == numpy_rng[1].tolist(), "building drew from numpy's generator"
    assert list(held_tensors(method)) == []  # parameters only: no prompt, weights or features yet
    assert settings_of(build(name)) == settings_of(method)  # building twice gives the same method


@pytest.mark.parametrize("name", NAMES)
def test_predicting_before_fit_says_to_fit(name, inputs):
    method = build(name)
    with pytest.raises(RuntimeError, match=r"fit\(\)"):
        method.predict_proba(inputs(method))


@pytest.mark.parametrize("name", NAMES)
def test_fit_returns_the_method_itself(name, fitted):
    fit = fitted(name)
    assert fit.returned is fit.method


@pytest.mark.parametrize("name", NAMES)
def test_fit_leaves_its_data_unchanged(name, fitted):
    """The session hands the same cached tensors to every method of a grid: fitting must not write to them."""
    assert fitted(name).written == []


@pytest.mark.parametrize("name", NAMES)
def test_probabilities_are_finite_rows_that_sum_to_one(name, fitted, session):
    method, probs = fitted(name).method, fitted(name).probs
    classes = len(session.dataset.classnames)
    assert probs.shape == (IMAGES, classes) and probs.dtype.is_floating_point
    assert torch.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
    # a softmax rounds each of the C entries once (<= 1 ulp each), and a smoothed method's mean over its S
    # copies adds at most one rounding per copy: rows sum to 1 within (C + S) ulp of the dtype
    tolerance = (classes + copies_of(method)) * torch.finfo(probs.dtype).eps
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(IMAGES, dtype=probs.dtype), rtol=0, atol=tolerance)


@pytest.mark.parametrize("name", NAMES)
def test_a_fixed_seed_gives_the_same_probabilities(name, fitted, fit_data, inputs):
    first = fitted(name).probs
    again = build(name)
    again.fit(fit_data(again))
    with torch.no_grad():
        second = again.predict_proba(inputs(again))
    torch.testing.assert_close(second, first, rtol=0, atol=0)  # same data, seed and kernels: bit for bit


@pytest.mark.parametrize("name", NAMES)
def test_a_second_fit_forgets_the_first(name, fitted, fit_data, inputs):
    fresh = fitted(name).probs
    method = build(name)
    data = fit_data(method)
    classes = len(data.classnames)
    relabelled = replace(
        data, train_labels=(data.train_labels + 1) % classes, val_labels=(data.val_labels + 1) % classes
    )
    method.fit(relabelled).fit(data)  # other data first (each class named as the next), then the real data
    with torch.no_grad():
        refitted = method.predict_proba(inputs(method))
    torch.testing.assert_close(refitted, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_declared_capabilities_are_what_fit_and_predict_need(name, fitted, fit_data, inputs):
    method = fitted(name).method
    caps = method.capabilities
    for key in caps.fit_features:  # every declared extra is needed: the session encodes none in vain
        other = build(name)
        data = fit_data(other)
        with pytest.raises(Exception):  # noqa: B017, PT011 - any failure shows the declaration is needed
            other.fit(replace(data, extra={k: v for k, v in data.extra.items() if k != key}))
    if caps.smoothed:  # predicts from noisy copies only
        with pytest.raises(ValueError, match=r"\(.*S, N, D\)"):
            method.predict_proba(inputs(method)[0])
    if caps.learns_prompt:  # `calbench train` saves the learned prompt
        base = base_of(method)
        assert isinstance(base, PromptMethod) and isinstance(base.learner, PromptLearner)
    assert caps.epochs == settings(name).get("epochs", 0)  # the session caches one view per epoch trained
    if caps.epochs == 0:  # a method that declares no training never reads the training views
        trains = build(name)
        data = fit_data(trains)
        data = replace(data, train_features=torch.full_like(data.train_features, float("nan")))
        trains.fit(data)
        with torch.no_grad():
            torch.testing.assert_close(trains.predict_proba(inputs(trains)), fitted(name).probs, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_what_a_method_fits_on_holds_no_test_image(name, session, test_sample):
    method = build(name)
    assert {request.images for request in fit_requests(method, score_val=True).values()} <= {"train", "val"}
    data = session.fit_data(1, FEWSHOT, method, score_val=True)  # with the validation copies scoring reads too
    assert not any("test" in f.name for f in fields(FitData))
    seen = [data.train_features.flatten(0, -2), data.val_features, *(t.flatten(0, -2) for t in data.extra.values())]
    for features in seen:  # the train pool and the test split are distinct images: no feature row in common
        assert not (torch.cdist(features.float(), test_sample.float()) < 1e-6).any()


def test_the_battery_covers_smoothing_and_every_calibrator():
    assert {"promptsmooth", "promptsmooth-zs"} <= set(NAMES)  # once skipped by the contract tests
    assert {name.rpartition("+")[2] for name in VARIANTS} == set(list_calibrators())
    assert any(isinstance(build(name), Calibrated) and build(name).capabilities.smoothed for name in VARIANTS)
