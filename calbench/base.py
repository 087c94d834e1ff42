"""The method contract and the method registry.

Every method (zero-shot, CoOp with any loss, CalibPrompt, PromptSmooth, post-hoc
calibrators on top of any of them) follows one scikit-learn-like contract on cached
features: build with parameters (no work), ``fit(FitData)`` returns self,
``predict_proba(inputs)`` returns (N, C) probabilities. ``FitData`` holds the few-shot
train and validation features only: methods cannot see the test split.

What a method needs beyond that is declared in its :class:`Capabilities`, never probed:
how many epochs it trains (one cached augmented view each), extra few-shot features,
prediction from noisy copies (a smoothed classifier), tuning at test time on copies of
their own, a learned prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Protocol, Union
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import Tensor

from calbench import published
from calbench.errors import CalbenchError
from calbench.models.base import VLMBackend
from calbench.published import Setting
from calbench.registry import Registry
from calbench.train import Range, TrainConfig, TrainViews, check_train_options

#: ``FitData.extra`` key of the validation images in the form a smoothed method predicts from
VAL_COPIES = "val-as-test"
#: ``FitData.extra`` key of the validation copies a method that tunes at test time tunes on
VAL_ADAPT = "val-adapt"


@dataclass(frozen=True)
class FeatureRequest:
    """Cached features of few-shot or test images under a transform kind (e.g. noisy views).

    ``images`` is "train" (the few-shot training images), "val" or "test"; ``kind`` is a
    transform kind of :mod:`calbench.data.transforms` whose role suits the images (the session
    refuses training views of test images); the features come as (views, N, D). ``views`` None
    asks for one view per few-shot training view (one per epoch unless ``--views`` says fewer).
    """

    images: str
    kind: str
    views: Optional[int] = 1


@dataclass(frozen=True)
class Capabilities:
    """What a method asks of the runner beyond clean few-shot features."""

    #: epochs it trains over the few-shot images: the session caches one augmented view per
    #: epoch (CoOp draws a fresh crop each epoch) unless ``--views`` says fewer; 0: no training
    epochs: int = 0
    #: extra few-shot features to fit on, filled into ``FitData.extra`` under these names
    fit_features: Mapping[str, FeatureRequest] = field(default_factory=dict)
    #: a smoothed classifier: it predicts from (S, N, D) noisy copies of each image, not (N, D)
    test_copies: Optional[FeatureRequest] = None
    #: copies of each image it tunes itself on before predicting (see ``adapt``), drawn apart from
    #: ``test_copies`` so it is never scored on the noise it tuned to; it then predicts from
    #: (A + S, N, D): these A copies, then the S ``test_copies`` (:func:`split_copies`)
    adapt_copies: Optional[FeatureRequest] = None
    #: holds a learned prompt (``learner``) that `calbench train` saves
    learns_prompt: bool = False

    @property
    def smoothed(self) -> bool:
        return self.test_copies is not None

    @property
    def adapts_at_test(self) -> bool:
        return self.adapt_copies is not None


def split_copies(caps: Capabilities, inputs: Tensor) -> tuple[Optional[Tensor], Tensor]:
    """(adaptation copies or None, scoring copies) of a smoothed method's (A + S, N, D) inputs."""
    if caps.adapt_copies is None:
        return None, inputs
    count = caps.adapt_copies.views
    if count is None or inputs.dim() != 3 or inputs.shape[0] <= count:
        raise ValueError(
            f"a method that tunes at test time predicts from ({count} + S, N, D) copies, got shape {tuple(inputs.shape)}"
        )
    return inputs[:count], inputs[count:]


#: :meth:`FitData.hand_features` of each loaded model, by prompt list (dropped with the model)
_HAND_FEATURES: WeakKeyDictionary[Any, dict[tuple[str, ...], Tensor]] = WeakKeyDictionary()


@dataclass
class FitData:
    """What a method may learn from: few-shot train views and the validation split."""

    vlm: VLMBackend
    classnames: list[str]
    template: str
    train_features: Union[Tensor, TrainViews]  # (V, N, D) normalised, one augmented view per row block; or online
    train_labels: Tensor  # (N,)
    val_features: Tensor  # (M, D) normalised, eval preprocessing
    val_labels: Tensor  # (M,)
    seed: int
    #: features named by the method's ``Capabilities.fit_features`` (never test images)
    extra: dict[str, Tensor] = field(default_factory=dict)
    #: the dataset's name, for settings published per dataset (PromptSmooth's initial phrase)
    dataset: str = ""

    def hand_prompts(self) -> list[str]:
        return [self.template.format(name) for name in self.classnames]

    def hand_features(self) -> Tensor:
        """The hand prompts' (C, D) text features, encoded once per model and prompt list (the tower is
        frozen): zero-shot and the zero-shot-anchored losses share one encoding over every seed and method."""
        texts = tuple(self.hand_prompts())
        memo = _HAND_FEATURES.setdefault(self.vlm, {})
        if texts not in memo:  # a plain tensor even when first asked under inference mode: losses keep it
            with torch.inference_mode(False), torch.no_grad():
                memo[texts] = self.vlm.encode_texts(list(texts))
        return memo[texts]

    def val_inputs(self, method: Method) -> Tensor:
        """The validation images in the form ``method`` predicts from: noisy copies for a smoothed one."""
        if not method.capabilities.smoothed:
            return self.val_features
        needed = [VAL_ADAPT, VAL_COPIES] if method.capabilities.adapts_at_test else [VAL_COPIES]
        if any(name not in self.extra for name in needed):
            raise CalbenchError(
                "this smoothed method is scored on noisy validation copies; get them with Session.fit_data(..., method=method)"
            )
        return torch.cat([self.extra[name] for name in needed]) if len(needed) > 1 else self.extra[VAL_COPIES]


class Method(Protocol):
    """``predict_*`` take the test inputs in the form ``capabilities`` declares: (N, D) features, or
    (S, N, D) noisy copies for a smoothed method ((A + S, N, D), adaptation copies first, for one
    that tunes at test time). ``base_logits`` is the base classifier on one
    view of each image, (N, D) -> (N, C): what randomized smoothing votes with."""

    capabilities: Capabilities

    def fit(self, data: FitData) -> Method: ...

    def predict_logits(self, inputs: Tensor) -> Tensor: ...

    def predict_proba(self, inputs: Tensor) -> Tensor: ...

    def base_logits(self, features: Tensor) -> Tensor: ...


class LogitMethod:
    """Base for methods whose probabilities are softmax(logits) of (N, D) features."""

    capabilities = Capabilities()

    def predict_logits(self, inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def predict_proba(self, inputs: Tensor) -> Tensor:
        return F.softmax(self.predict_logits(inputs), dim=1)

    def base_logits(self, features: Tensor) -> Tensor:
        return self.predict_logits(features)


class Calibrator(Protocol):
    """A post-hoc map from logits to probabilities, fitted on validation logits."""

    def fit(self, logits: Tensor, labels: Tensor) -> Calibrator: ...

    def predict_proba(self, logits: Tensor) -> Tensor: ...


class Calibrated:
    """``<method>+<calibrator>``: a calibrator fitted on the method's validation logits.

    A smoothed base is calibrated on noisy validation copies, the same kind of output it is
    applied to at test time, so the wrapper asks for those copies.
    """

    def __init__(self, base: Method, calibrator: Calibrator, base_is_fitted: bool = False) -> None:
        self.base = base
        self.calibrator = calibrator
        self.base_is_fitted = base_is_fitted
        caps = base.capabilities
        self.capabilities = replace(caps, fit_features={**caps.fit_features, **_val_copies(caps)})

    def fit(self, data: FitData) -> Calibrated:
        if not self.base_is_fitted:
            self.base.fit(data)
        # ``base_is_fitted`` spares the first fit only (the base was fitted on that data); a later fit may be
        # on other data, so the base is refitted with the calibrator, as a second fit must forget the first
        self.base_is_fitted = False
        with torch.no_grad():
            self.calibrator.fit(self.base.predict_logits(data.val_inputs(self.base)), data.val_labels)
        return self

    def predict_logits(self, inputs: Tensor) -> Tensor:
        return torch.log(self.predict_proba(inputs).clamp_min(1e-12))

    def predict_proba(self, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            return self.calibrator.predict_proba(self.base.predict_logits(inputs))

    def base_logits(self, features: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.log(self.calibrator.predict_proba(self.base.base_logits(features)).clamp_min(1e-12))


def base_of(method: Method) -> Method:
    """The method under a post-hoc calibrator (or the method itself)."""
    return method.base if isinstance(method, Calibrated) else method


def fit_requests(method: Method, score_val: bool = False) -> dict[str, FeatureRequest]:
    """Every extra feature set ``method`` needs to fit; with ``score_val`` also the validation
    images in the form it predicts from (to score a smoothed method on validation)."""
    caps = method.capabilities
    return {**caps.fit_features, **(_val_copies(caps) if score_val else {})}


def _val_copies(caps: Capabilities) -> dict[str, FeatureRequest]:
    """The validation images as noisy copies, for a smoothed method (what it predicts from: the copies it
    is scored on, and those it tunes on first if it adapts); else nothing."""
    if caps.test_copies is None:
        return {}
    copies = {VAL_COPIES: FeatureRequest("val", caps.test_copies.kind, caps.test_copies.views)}
    if caps.adapt_copies is not None:
        copies[VAL_ADAPT] = FeatureRequest("val", caps.adapt_copies.kind, caps.adapt_copies.views)
    return copies


@dataclass(frozen=True)
class MethodSpec:
    """A registered method, described without building it (as scikit-learn's ``get_params`` and tags):
    its own parameters with their ranges, whether it trains a prompt (and so takes the trainer's
    options), and the factory that builds it."""

    name: str
    description: str
    factory: Callable[..., Method]
    #: parameters that take a list of numbers (every other parameter is one number, text or true/false)
    list_params: tuple[str, ...] = ()
    #: the method's own parameters and the range of each numeric one (None: text, a choice or a mapping);
    #: their defaults, with sources, are the method's section of the one table
    params: Mapping[str, Optional[Range]] = field(default_factory=dict)
    #: learns a prompt with the trainer, so every :class:`TrainConfig` field is one of its settings
    learns_prompt: bool = False
    #: (parameters, method): with these parameters a method that learns no prompt itself trains that method's
    #: prompt inside (promptsmooth-zs with init=fewshot trains a few-shot PromptSmooth prompt first)
    trains_inner: Optional[tuple[Mapping[str, Any], str]] = None

    def trainer(self, values: Mapping[str, Any]) -> Optional[str]:
        """The method whose trainer options apply with ``values`` (this one's, or the one it trains inside); None
        when it trains no prompt."""
        if self.learns_prompt:
            return self.name
        if self.trains_inner is not None and all(values.get(k) == v for k, v in self.trains_inner[0].items()):
            return self.trains_inner[1]
        return None

    def defaults(self, values: Optional[Mapping[str, Any]] = None) -> dict[str, Setting]:
        """Every setting the method runs with under ``values`` (its own defaults when None), each with its
        source: the trainer's options where it trains a prompt, then the method's own section of the table."""
        own = published.section(self.name)
        trainer = self.trainer({**{k: s.value for k, s in own.items()}, **dict(values or {})})
        if trainer is None:
            return own
        options = {**published.section("train"), **published.section(trainer)}
        return {**{k: options[k] for k in TRAIN_OPTIONS}, **own}


METHODS: Registry[MethodSpec] = Registry("method")
CALIBRATORS: Registry[Callable[[], Calibrator]] = Registry("calibrator")


def register_method(
    name: str,
    description: str,
    list_params: tuple[str, ...] = (),
    params: Optional[Mapping[str, Optional[Range]]] = None,
    learns_prompt: bool = False,
    trains_inner: Optional[tuple[Mapping[str, Any], str]] = None,
) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
    """Register a method factory under ``name`` with its declared parameters (see :class:`MethodSpec`)."""

    def add(factory: Callable[..., Method]) -> Callable[..., Method]:
        spec = MethodSpec(
            name, description, factory, tuple(list_params), dict(params or {}), learns_prompt, trains_inner
        )
        METHODS.add(name, spec)
        return factory

    return add


TRAIN_OPTIONS = tuple(f.name for f in fields(TrainConfig))


def check_known(method: str, params: Mapping[str, Any], own: Iterable[str], train_options: bool = True) -> None:
    """Refuse parameters a method does not take, listing the ones it does: a typo is never ignored."""
    own = list(own)
    unknown = set(params) - set(own) - (set(TRAIN_OPTIONS) if train_options else set())
    if unknown:
        options = f" and training options ({', '.join(TRAIN_OPTIONS)})" if train_options else ""
        raise CalbenchError(
            f"{method}: unknown parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(own) or 'none'}{options}"
        )


def split_train_params(
    params: Mapping[str, Any], defaults: Optional[TrainConfig] = None, method: str = "training option"
) -> tuple[TrainConfig, dict[str, Any]]:
    """Separate TrainConfig fields (lr, n_ctx, ...) from a method's own parameters, type- and range-checked
    (an error names ``method``)."""
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    train: dict[str, Any] = {}
    for key, value in params.items():
        if key not in types:
            continue
        kind = types[key]
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and (kind is float or float(value).is_integer())
        )
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind not in (int, float):
            ok = value is None or isinstance(value, str)
        if not ok:
            raise CalbenchError(
                f"training option {key}={value!r} must be {'a number' if kind is float else kind.__name__}"
            )
        train[key] = int(value) if kind is int else float(value) if kind is float else value
    check_train_options(train, method)
    return replace(defaults or TrainConfig(), **train), {k: v for k, v in params.items() if k not in types}


def as_number(value: Any, what: str, allowed: Optional[Range] = None) -> float:
    """A method parameter from a JSON/YAML file as a float inside its declared range, or a one-line error naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalbenchError(f"{what} must be a number, got {value!r}")
    if allowed is not None:
        allowed.check(what, value)
    return float(value)
