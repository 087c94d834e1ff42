"""PromptSmooth (Hussein et al., MICCAI 2024): prompts that make a frozen VLM a good base classifier for randomized smoothing.

- ``promptsmooth`` (few-shot): CoOp prompt learning with cross-entropy on few-shot
  images with Gaussian pixel noise; one prompt for several sigmas (the noisy views of
  all training sigmas are interleaved, so epoch e sees sigma number e mod S).
- ``promptsmooth-as``: the same plus w_as * angular separation (CalibPrompt's
  "PromptSmooth + AS").
- ``promptsmooth-zs`` (zero-shot): per test image, a few AdamW steps on the context
  minimising the entropy of the mean prediction over that image's noisy copies
  (TPT's marginal entropy, Shu et al., NeurIPS 2022), from the hand prompt or from
  the few-shot PromptSmooth prompt; the context is reset before every image.

All three are smoothed classifiers (``Capabilities.test_copies``): ``predict_proba`` takes
(S, N, D) features of S noisy copies of each image and returns the mean softmax over the
copies; ``base_logits`` is the base classifier on one (N, D) view. Their noisy views come
from the feature cache (transform kinds ``train-noise<sigma>`` and ``noise<sigma>``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from calbench.base import (
    Capabilities,
    FeatureRequest,
    FitData,
    LogitMethod,
    Method,
    as_number,
    check_known,
    register_method,
    split_train_params,
)
from calbench.calibprompt import PromptMethod
from calbench.data.transforms import noise_kind
from calbench.errors import CalbenchError
from calbench.losses import Objective, Term
from calbench.prompts import PromptLearner
from calbench.smoothing import smoothed_proba
from calbench.train import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Range, TrainConfig

PROMPTSMOOTH = "Hussein et al., MICCAI 2024 (PromptSmooth configs)"
#: every default of the three methods: name -> (value, where it comes from)
DEFAULTS: dict[str, tuple[Any, str]] = {
    "n_ctx": (5, PROMPTSMOOTH + ": n_ctx 5"),
    "epochs": (50, PROMPTSMOOTH + ": 50 epochs"),
    "shots": (
        16,
        PROMPTSMOOTH
        + ": 16 shots; used by `calbench certify`, while `compare --shots` applies one value to every method",
    ),
    "sigma": (0.25, "noise of the smoothed classifier at test time; PromptSmooth reports sigma 0.25, 0.5 and 1.0"),
    "train_sigmas": ((0.25, 0.5, 1.0), PROMPTSMOOTH + ": one prompt serves several noise levels"),
    "views_per_sigma": (10, "calbench: as many noisy views per sigma as `--views` augmented views"),
    "n_samples": (32, "calbench: noisy copies per test image averaged for the probabilities"),
    "w_as": (0.01, "Basu et al., BMVC 2025 (CalibPrompt's AS weight)"),
    "tta_steps": (1, PROMPTSMOOTH + " zero-shot: one test-time step, as TPT"),
    "tta_lr": (5e-3, PROMPTSMOOTH + " zero-shot: AdamW, lr 5e-3, as TPT"),
    "init": (
        "hand",
        "promptsmooth-zs starts from the hand prompt ('hand') or the few-shot PromptSmooth prompt ('fewshot')",
    ),
}
#: the range of each numeric parameter of the three methods (training options: TrainConfig's);
#: sigma and each of train_sigmas are noise levels (> 0), the counts are whole numbers
RANGES: dict[str, Range] = {
    "sigma": POSITIVE,
    "train_sigmas": POSITIVE,
    "views_per_sigma": AT_LEAST_ONE,
    "n_samples": AT_LEAST_ONE,
    "w_as": NON_NEGATIVE,
    "tta_steps": NON_NEGATIVE,
    "tta_lr": POSITIVE,
}
COUNTS = ("views_per_sigma", "n_samples", "tta_steps")
#: the one parameter that takes a list of numbers (in a --params file too)
LIST_PARAMS = ("train_sigmas",)
FEWSHOT_PARAMS = ("sigma", "train_sigmas", "views_per_sigma", "n_samples")
ZEROSHOT_PARAMS = ("sigma", "n_samples", "tta_steps", "tta_lr", "init")


def _checked(method: str, name: str, value: Any) -> Any:
    """One own parameter, checked against its declared range (each element for train_sigmas)."""
    what = f"{method} {name}"
    if name == "train_sigmas":
        sigmas = value if isinstance(value, (list, tuple)) else [value]
        if not sigmas:
            raise CalbenchError(f"{what} is empty; give at least one noise level, e.g. [0.25]")
        return tuple(as_number(sigma, what, RANGES[name]) for sigma in sigmas)
    if name not in RANGES:
        return value
    number = as_number(value, what, RANGES[name])
    if name in COUNTS and not number.is_integer():
        raise CalbenchError(f"{what}={value!r} must be a whole number in {RANGES[name]}")
    return int(number) if name in COUNTS else number


def _settings(
    method: str, params: dict[str, Any], own: tuple[str, ...], trains: bool
) -> tuple[TrainConfig, dict[str, Any]]:
    """Split user parameters into a TrainConfig (PromptSmooth's training defaults) and the method's own ones."""
    check_known(method, params, own, train_options=trains)
    defaults = replace(TrainConfig(), **{name: DEFAULTS[name][0] for name in ("n_ctx", "epochs", "shots")})
    cfg, rest = split_train_params(params if trains else {}, defaults, method=method)
    given = rest if trains else params
    return cfg, {name: _checked(method, name, given.get(name, DEFAULTS[name][0])) for name in own}


class PromptSmooth(PromptMethod):
    """Few-shot PromptSmooth: a prompt trained on noisy views, used as the base classifier of a smoothed classifier."""

    def __init__(
        self,
        objective: Objective,
        config: TrainConfig,
        sigma: float,
        train_sigmas: tuple[float, ...],
        views_per_sigma: int,
        n_samples: int,
    ) -> None:
        super().__init__(objective, config)
        self.sigma = float(sigma)
        train = {
            noise_kind(s, train=True): FeatureRequest("train", noise_kind(s, train=True), int(views_per_sigma))
            for s in train_sigmas
        }
        copies = FeatureRequest("test", noise_kind(self.sigma), int(n_samples))
        self.capabilities = Capabilities(fit_features=train, test_copies=copies, learns_prompt=True)

    def fit(self, data: FitData) -> PromptSmooth:
        views = torch.stack([data.extra[name] for name in self.capabilities.fit_features], dim=1)  # (V, S, N, D)
        return super().fit(replace(data, train_features=views.flatten(0, 1)))  # v0s0, v0s1, ..., v1s0, ...

    def base_logits(self, features: Tensor) -> Tensor:
        """The base classifier: logits of the learned prompt on (N, D) features of one view."""
        return super().predict_logits(features)

    def predict_proba(self, inputs: Tensor) -> Tensor:
        """The smoothed classifier: mean softmax of the base classifier over (S, N, D) noisy copies."""
        return smoothed_proba(self.base_logits(_copies(inputs)))

    def predict_logits(self, inputs: Tensor) -> Tensor:
        return torch.log(self.predict_proba(inputs).clamp_min(1e-12))


def _copies(inputs: Tensor) -> Tensor:
    if inputs.dim() != 3:
        raise ValueError(
            f"a smoothed classifier predicts from (S, N, D) noisy copies, got shape {tuple(inputs.shape)}; use base_logits for (N, D) features"
        )
    return inputs


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the mean softmax over the rows of (S, C) logits (TPT, Shu et al., NeurIPS 2022)."""
    log_mean = torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])
    return -(log_mean.exp() * log_mean).sum()


def hand_context(template: str) -> str:
    """The words of a prompt template before the class name, to start the context from ("a photo of a")."""
    prefix = template.split("{}")[0].strip()
    if "{}" not in template or not prefix:
        raise CalbenchError(
            f"promptsmooth-zs: the prompt template {template!r} has no words before '{{}}' to start from; pass init=fewshot"
        )
    return prefix


class PromptSmoothZeroShot(LogitMethod):
    """Zero-shot PromptSmooth: test-time prompt tuning on each image's noisy copies, then smoothing."""

    def __init__(
        self, sigma: float, n_samples: int, tta_steps: int, tta_lr: float, fewshot: Optional[PromptSmooth] = None
    ) -> None:
        self.sigma = float(sigma)
        self.tta_steps = int(tta_steps)
        self.tta_lr = float(tta_lr)
        self.fewshot = fewshot
        copies = FeatureRequest("test", noise_kind(self.sigma), int(n_samples))
        train = fewshot.capabilities.fit_features if fewshot is not None else {}
        self.capabilities = Capabilities(fit_features=train, test_copies=copies, adapts_at_test=True)
        self.learner: Optional[PromptLearner] = None

    def fit(self, data: FitData) -> PromptSmoothZeroShot:
        if self.fewshot is not None:
            self.learner = self.fewshot.fit(data).learner
        else:
            self.learner = PromptLearner(data.vlm, data.classnames, ctx_init=hand_context(data.template))
        self._start = self.learner.ctx.detach().clone()
        self._scale = data.vlm.logit_scale
        return self

    def adapt(self, copies: Tensor) -> Callable[[Tensor], Tensor]:
        """Tune the context on each image's (S, N, D) noisy ``copies``; return the tuned base classifier.

        The classifier maps (V, N, D) features of the same N images to (V, N, C) logits.
        """
        if self.learner is None:
            raise RuntimeError("call fit() first")
        ctx = self.learner.ctx
        texts = []
        with torch.enable_grad():
            for i in range(copies.shape[1]):
                with torch.no_grad():
                    ctx.copy_(self._start)
                optimizer = torch.optim.AdamW([ctx], lr=self.tta_lr)
                image = copies[:, i].to(ctx.device)
                for _ in range(self.tta_steps):
                    loss = marginal_entropy(self._scale * image @ self.learner.text_features().T)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                with torch.no_grad():
                    texts.append(self.learner.text_features())
        with torch.no_grad():
            ctx.copy_(self._start)
        text = torch.stack(texts)  # (N, C, D), one tuned prompt set per image
        return lambda views: self._scale * torch.einsum("vnd,ncd->vnc", views.to(text.device), text)

    def predict_proba(self, inputs: Tensor) -> Tensor:
        """Mean softmax over (S, N, D) noisy copies after tuning on them."""
        copies = _copies(inputs)
        return smoothed_proba(self.adapt(copies)(copies))

    def predict_logits(self, inputs: Tensor) -> Tensor:
        return torch.log(self.predict_proba(inputs).clamp_min(1e-12))

    def base_logits(self, features: Tensor) -> Tensor:
        """Tuning needs an image's copies: the base classifier exists only after :meth:`adapt`."""
        raise TypeError("promptsmooth-zs tunes on each image's noisy copies first; classify with adapt(copies)")


@register_method(
    "promptsmooth",
    "few-shot PromptSmooth: CoOp on noisy views, smoothed prediction (Hussein et al., MICCAI 2024)",
    LIST_PARAMS,
)
def promptsmooth(**params: Any) -> Method:
    cfg, values = _settings("promptsmooth", params, FEWSHOT_PARAMS, trains=True)
    return PromptSmooth(Objective({"ce": Term("cross_entropy")}), cfg, **values)


@register_method(
    "promptsmooth-as", "few-shot PromptSmooth + angular separation (the CalibPrompt paper's combination)", LIST_PARAMS
)
def promptsmooth_as(**params: Any) -> Method:
    cfg, values = _settings("promptsmooth-as", params, (*FEWSHOT_PARAMS, "w_as"), trains=True)
    w_as = float(values.pop("w_as"))
    return PromptSmooth(Objective({"ce": Term("cross_entropy"), "as": Term("angular_separation", w_as)}), cfg, **values)


@register_method(
    "promptsmooth-zs",
    "zero-shot PromptSmooth: test-time prompt tuning on noisy copies (Hussein et al., MICCAI 2024)",
    LIST_PARAMS,
)
def promptsmooth_zs(**params: Any) -> Method:
    init = params.get("init", DEFAULTS["init"][0])
    if init not in ("hand", "fewshot"):
        raise CalbenchError(f"promptsmooth-zs: init must be 'hand' or 'fewshot', got {init!r}")
    _, values = _settings(
        "promptsmooth-zs", {k: v for k, v in params.items() if k in ZEROSHOT_PARAMS}, ZEROSHOT_PARAMS, trains=False
    )
    values.pop("init")
    others = {k: v for k, v in params.items() if k not in ZEROSHOT_PARAMS}
    if init == "hand" and others:
        raise CalbenchError(
            f"promptsmooth-zs: {', '.join(sorted(others))} only apply with init=fewshot; known: {', '.join(ZEROSHOT_PARAMS)}"
        )
    fewshot = (
        promptsmooth(sigma=values["sigma"], n_samples=values["n_samples"], **others) if init == "fewshot" else None
    )
    return PromptSmoothZeroShot(fewshot=fewshot, **values)
