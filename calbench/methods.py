"""The method contract, the method registry, and CalibPrompt itself.

Every method (zero-shot, CoOp with any loss, CalibPrompt, post-hoc calibrators
on top of any of them) follows one scikit-learn-like contract on cached
features: build with parameters (no work), ``fit(FitData)`` returns self,
``predict_proba(features)`` returns (N, C) probabilities. ``FitData`` holds the
few-shot train and validation features only: methods cannot see the test split.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from calbench.errors import CalbenchError
from calbench.losses import Objective, calibprompt_objective
from calbench.models.base import VLMBackend
from calbench.prompts import PromptLearner
from calbench.registry import Registry
from calbench.train import TrainConfig, logits_for, train_prompt_learner


@dataclass(frozen=True)
class FeatureRequest:
    """Extra cached features a method asks the runner for (e.g. noisy views for smoothing).

    ``images`` is "train" (the few-shot training images), "val" or "test"; ``kind`` is a
    transform kind of :mod:`calbench.data.transforms`; the runner returns (views, N, D).
    """

    images: str
    kind: str
    views: int = 1


@dataclass
class FitData:
    """What a method may learn from: few-shot train views and the validation split."""

    vlm: VLMBackend
    classnames: list[str]
    template: str
    train_features: Tensor  # (V, N, D) normalised, one augmented view per row block
    train_labels: Tensor  # (N,)
    val_features: Tensor  # (M, D) normalised, eval preprocessing
    val_labels: Tensor  # (M,)
    seed: int
    #: features asked for by the method's ``fit_requests`` (never test images)
    extra: dict[str, Tensor] = field(default_factory=dict)

    def hand_prompts(self) -> list[str]:
        return [self.template.format(name) for name in self.classnames]


class Method(Protocol):
    """Optional attributes: ``fit_requests: dict[str, FeatureRequest]`` (filled into
    ``FitData.extra``) and ``test_request: FeatureRequest`` (then ``predict_proba``
    receives (views, N, D) features of the test images instead of (N, D))."""

    def fit(self, data: FitData) -> "Method": ...

    def predict_logits(self, features: Tensor) -> Tensor: ...

    def predict_proba(self, features: Tensor) -> Tensor: ...


class LogitMethod:
    """Base for methods whose probabilities are softmax(logits)."""

    def predict_logits(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def predict_proba(self, features: Tensor) -> Tensor:
        return F.softmax(self.predict_logits(features), dim=1)


class PromptMethod(LogitMethod):
    """CoOp prompt learning with any objective: CoOp-CE, its calibration-loss variants, CalibPrompt."""

    def __init__(self, objective: Objective, config: Optional[TrainConfig] = None) -> None:
        self.objective = objective
        self.config = config or TrainConfig()
        self.learner: Optional[PromptLearner] = None
        self.history: list[dict[str, float]] = []
        #: ``on_epoch(epoch, losses)`` after each epoch while ``self.learner`` trains (e.g. to report or prune); may raise to stop
        self.on_epoch: Optional[Callable[[int, dict[str, float]], None]] = None

    def fit(self, data: FitData) -> "PromptMethod":
        cfg = self.config
        torch.manual_seed(data.seed)
        self.learner = PromptLearner(
            data.vlm, data.classnames, n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init, class_specific=cfg.class_specific, seed=data.seed
        )
        zs = None
        if self.objective.inputs & {"zs_logits", "zs_text_features"}:
            with torch.no_grad():
                zs = data.vlm.encode_texts(data.hand_prompts())
        self.history = train_prompt_learner(
            self.learner, self.objective, data.train_features, data.train_labels, cfg, data.seed, zs_text_features=zs, on_epoch=self.on_epoch
        )
        with torch.no_grad():
            self._text = self.learner.text_features()
        self._scale = data.vlm.logit_scale
        return self

    def predict_logits(self, features: Tensor) -> Tensor:
        if self.learner is None:
            raise RuntimeError("call fit() first")
        return logits_for(features.to(self._text.device), self._text, self._scale)


class Calibrator(Protocol):
    """A post-hoc map from logits to probabilities, fitted on validation logits."""

    def fit(self, logits: Tensor, labels: Tensor) -> "Calibrator": ...

    def predict_proba(self, logits: Tensor) -> Tensor: ...


class Calibrated:
    """``<method>+<calibrator>``: a calibrator fitted on the method's validation logits."""

    def __init__(self, base: Method, calibrator: Calibrator, base_is_fitted: bool = False) -> None:
        self.base = base
        self.calibrator = calibrator
        self.base_is_fitted = base_is_fitted

    def fit(self, data: FitData) -> "Calibrated":
        if not self.base_is_fitted:
            self.base.fit(data)
            self.base_is_fitted = True
        # a smoothed base predicts from noisy copies: calibrate on the same kind of output
        val = data.extra.get(VAL_AS_TEST, data.val_features)
        with torch.no_grad():
            self.calibrator.fit(self.base.predict_logits(val), data.val_labels)
        return self

    def predict_logits(self, features: Tensor) -> Tensor:
        return torch.log(self.predict_proba(features).clamp_min(1e-12))

    def predict_proba(self, features: Tensor) -> Tensor:
        with torch.no_grad():
            return self.calibrator.predict_proba(self.base.predict_logits(features))


VAL_AS_TEST = "val-as-test"


def feature_requests(method: Method, validate: bool = False) -> dict[str, FeatureRequest]:
    """Every extra feature set ``method`` needs to fit, post-hoc wrappers included.

    A method that predicts from test-time views (smoothing) is calibrated, and with
    ``validate`` also scored, on the validation images in that same form, under
    ``VAL_AS_TEST``.
    """
    base = method.base if isinstance(method, Calibrated) else method
    requests = dict(getattr(base, "fit_requests", None) or {})
    test = getattr(base, "test_request", None)
    if (validate or isinstance(method, Calibrated)) and test is not None:
        requests[VAL_AS_TEST] = FeatureRequest("val", test.kind, test.views)
    return requests


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    factory: Callable[..., Method]
    trainable: bool


METHODS: Registry[MethodSpec] = Registry("method")
CALIBRATORS: Registry[Callable[[], Calibrator]] = Registry("calibrator")


def register_method(name: str, description: str, trainable: bool = True) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
    def add(factory: Callable[..., Method]) -> Callable[..., Method]:
        METHODS.add(name, MethodSpec(name, description, factory, trainable))
        return factory

    return add


def split_train_params(params: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """Separate TrainConfig fields (lr, n_ctx, ...) from a method's own parameters."""
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    train: dict[str, Any] = {}
    for key, value in params.items():
        if key not in types:
            continue
        kind = types[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or float(value).is_integer())
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind not in (int, float):
            ok = value is None or isinstance(value, str)
        if not ok:
            raise CalbenchError(f"training option {key}={value!r} must be {'a number' if kind is float else kind.__name__}")
        train[key] = int(value) if kind is int else float(value) if kind is float else value
    return replace(TrainConfig(), **train), {k: v for k, v in params.items() if k not in types}


def list_methods() -> list[str]:
    """Registered base methods; any of them takes a post-hoc calibrator as ``<method>+<calibrator>``."""
    return METHODS.names()


def list_calibrators() -> list[str]:
    return CALIBRATORS.names()


def make_method(name: str, **params: Any) -> Method:
    """Build a method by id; ``base+cal`` wraps base in post-hoc calibrator ``cal``."""
    base_name, calibrator = parse_method(name)
    method = METHODS.get(base_name).factory(**params)
    return method if calibrator is None else Calibrated(method, CALIBRATORS.get(calibrator)())


def parse_method(name: str) -> tuple[str, Optional[str]]:
    """Split ``base+cal`` into its parts, checking both against their registries.

    Base ids may contain '+' themselves (the ablation ``ls+smac``), so a registered
    base id wins, and otherwise the text after the last '+' names the calibrator.
    """
    if name in METHODS:
        return name, None
    base, plus, calibrator = name.rpartition("+")
    if not plus:
        METHODS.get(name)  # raises with the list of valid ids
    METHODS.get(base)
    CALIBRATORS.get(calibrator)
    return base, calibrator


@register_method("calibprompt", "CoOp + label smoothing + SMAC + angular separation (Basu et al., BMVC 2025)")
def calibprompt(**params: Any) -> Method:
    """Parameters: alpha, w_smac, w_as (defaults in :func:`calbench.losses.calibprompt_objective`) and TrainConfig fields."""
    cfg, rest = split_train_params(params)
    known = set(inspect.signature(calibprompt_objective).parameters)
    if set(rest) - known:
        raise CalbenchError(
            f"calibprompt: unknown parameter(s) {', '.join(sorted(set(rest) - known))}; "
            f"known: {', '.join(sorted(known))} and training options ({', '.join(f.name for f in fields(TrainConfig))})"
        )
    return PromptMethod(calibprompt_objective(**{k: as_number(v, f"calibprompt {k}") for k, v in rest.items()}), cfg)


def as_number(value: Any, what: str) -> float:
    """A method parameter from a JSON/YAML file as a float, or a one-line error naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalbenchError(f"{what} must be a number, got {value!r}")
    return float(value)


import calbench.baselines  # noqa: E402,F401  (registers the comparison methods)
