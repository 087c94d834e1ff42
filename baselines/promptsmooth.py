"""PromptSmooth (Hussein et al., MICCAI 2024): prompts that make a frozen VLM a good base classifier for randomized smoothing.

- ``promptsmooth`` (few-shot): CoOp prompt learning with cross-entropy on few-shot
  images with Gaussian pixel noise; one prompt for several sigmas: every training view
  of every image draws its sigma from the set (kind ``train-noise0.25+0.5+1``), one view
  per epoch. The published trainer is unpublished code: its checkpoint path names CoOp's
  ``vit_b32_ep50`` config (batch 32, 50 epochs) with 16 shots and 5 context tokens; the
  per-sample draw is inferred (the sources are in the ``promptsmooth`` section of the table).
- ``promptsmooth-as``: the same plus w_as * angular separation (CalibPrompt's
  "PromptSmooth + AS"), with CalibPrompt's AS weight.
- ``promptsmooth-zs`` (zero-shot): per test image, one AdamW step on the context
  minimising the entropy of the mean prediction over 100 noisy copies of that image
  (TPT's marginal entropy, Shu et al., NeurIPS 2022), from the published phrase ("An H&E
  image patch of" on Kather and PanNuke, "a histopathology slide showing" elsewhere, its
  first word-count tokens learnable) or from the few-shot PromptSmooth prompt; the context
  is reset before every image. It is then scored (and certified) on other noisy copies.

All three are smoothed classifiers (``Capabilities.test_copies``): ``predict_proba`` takes
(S, N, D) features of S noisy copies of each image (after A adaptation copies for the
zero-shot one) and returns the mean softmax over the S copies; ``base_logits`` is the base
classifier on one (N, D) view. Their noisy views come from the feature cache, each role
(``train``, ``adapt``, ``score``) its own draw (:mod:`calbench.data.transforms`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Optional, Union

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
    split_copies,
    split_train_params,
)
from calbench.calibprompt import PromptMethod
from calbench.data import DATASETS
from calbench.data.transforms import noise_kind
from calbench.errors import CalbenchError
from calbench.losses import Objective, Term
from calbench.prompts import PromptLearner
from calbench.published import default
from calbench.randomized_smoothing import smoothed_proba
from calbench.train import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Range, TrainConfig, TrainRun

FEWSHOT, ZEROSHOT = "promptsmooth", "promptsmooth-zs"
#: the trainer options few-shot PromptSmooth sets apart from CoOp/CalibPrompt's (table section ``promptsmooth``)
TRAINER = ("n_ctx", "epochs", "shots", "batch_size")
#: ``FitData.extra`` key of the noisy training views
NOISY_VIEWS = "noisy-views"
#: the range of each numeric parameter of the three methods (training options: TrainConfig's);
#: sigma and each of train_sigmas are noise levels (> 0), the counts are whole numbers
RANGES: dict[str, Range] = {
    "sigma": POSITIVE,
    "train_sigmas": POSITIVE,
    "n_samples": AT_LEAST_ONE,
    "adapt_samples": AT_LEAST_ONE,
    "w_as": NON_NEGATIVE,
    "tta_steps": NON_NEGATIVE,
    "tta_lr": POSITIVE,
}
COUNTS = ("n_samples", "adapt_samples", "tta_steps")
#: the one parameter that takes a list of numbers (in a --params file too)
LIST_PARAMS = ("train_sigmas",)
FEWSHOT_PARAMS = ("sigma", "train_sigmas", "n_samples")
ZEROSHOT_PARAMS = ("sigma", "n_samples", "adapt_samples", "tta_steps", "tta_lr", "init", "ctx_init")


def default_of(method: str, name: str) -> Any:
    """A parameter's default from the one table: ``promptsmooth-as`` is few-shot PromptSmooth with
    CalibPrompt's AS weight (the CalibPrompt paper's combination)."""
    if name == "w_as":
        return default("promptsmooth-as", "w_as")
    return default(ZEROSHOT if method == ZEROSHOT else FEWSHOT, name)


def _checked(method: str, name: str, value: Any) -> Any:
    """One own parameter, checked against its declared range (each element for train_sigmas)."""
    what = f"{method} {name}"
    if name == "train_sigmas":
        sigmas = value if isinstance(value, (list, tuple)) else [value]
        if not sigmas:
            raise CalbenchError(f"{what} is empty; give at least one noise level, e.g. [0.25]")
        return tuple(sorted({as_number(sigma, what, RANGES[name]) for sigma in sigmas}))
    if name == "ctx_init" and not (isinstance(value, Mapping) or (isinstance(value, str) and value.strip())):
        raise CalbenchError(
            f"{what} must be the words to start the context from, e.g. 'a histopathology slide showing'"
        )
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
    defaults = replace(TrainConfig(), **{name: default(FEWSHOT, name) for name in TRAINER})
    cfg, rest = split_train_params(params if trains else {}, defaults, method=method)
    given = rest if trains else params
    return cfg, {name: _checked(method, name, given.get(name, default_of(method, name))) for name in own}


class PromptSmooth(PromptMethod):
    """Few-shot PromptSmooth: a prompt trained on noisy views, used as the base classifier of a smoothed classifier."""

    def __init__(
        self, objective: Objective, config: TrainConfig, sigma: float, train_sigmas: tuple[float, ...], n_samples: int
    ) -> None:
        super().__init__(objective, config)
        self.sigma = float(sigma)
        self.train_sigmas = tuple(sorted(float(s) for s in train_sigmas))
        # one noisy view per training view (one per epoch by default), each image's sigma drawn from the set
        views = FeatureRequest("train", noise_kind(self.train_sigmas, "train"), None)
        copies = FeatureRequest("test", noise_kind(self.sigma, "score"), int(n_samples))
        self.capabilities = Capabilities(
            epochs=config.epochs, fit_features={NOISY_VIEWS: views}, test_copies=copies, learns_prompt=True
        )

    def training_run(self, data: FitData) -> TrainRun:
        return super().training_run(replace(data, train_features=data.extra[NOISY_VIEWS]))

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


def context_phrase(ctx_init: Union[str, Mapping[str, str]], dataset: str, template: str) -> str:
    """The words zero-shot PromptSmooth starts from on ``dataset``: a given phrase, the table's phrase
    for the dataset or for its modality, else the words of its prompt template (calbench's choice)."""
    if isinstance(ctx_init, str):
        return ctx_init.strip()
    name = dataset.lower()
    modality = DATASETS.get(name).modality if name in DATASETS else None
    for key in (name, modality):
        if key is not None and key in ctx_init:
            return ctx_init[key]
    return hand_context(template)


class PromptSmoothZeroShot(LogitMethod):
    """Zero-shot PromptSmooth: test-time prompt tuning on each image's noisy copies, then smoothing on others."""

    def __init__(
        self,
        sigma: float,
        n_samples: int,
        adapt_samples: int,
        tta_steps: int,
        tta_lr: float,
        ctx_init: Union[str, Mapping[str, str]],
        fewshot: Optional[PromptSmooth] = None,
    ) -> None:
        self.sigma = float(sigma)
        self.adapt_samples = int(adapt_samples)
        self.tta_steps = int(tta_steps)
        self.tta_lr = float(tta_lr)
        # hashable, as a setting a run is keyed by
        self.ctx_init = ctx_init if isinstance(ctx_init, str) else tuple(sorted(ctx_init.items()))
        self.fewshot = fewshot
        copies = FeatureRequest("test", noise_kind(self.sigma, "score"), int(n_samples))
        adapt = FeatureRequest("test", noise_kind(self.sigma, "adapt"), self.adapt_samples)
        caps = fewshot.capabilities if fewshot is not None else Capabilities()
        self.capabilities = Capabilities(
            epochs=caps.epochs, fit_features=caps.fit_features, test_copies=copies, adapt_copies=adapt
        )
        self.learner: Optional[PromptLearner] = None

    def fit(self, data: FitData) -> PromptSmoothZeroShot:
        if self.fewshot is not None:
            self.learner = self.fewshot.fit(data).learner
        else:
            phrases = self.ctx_init if isinstance(self.ctx_init, str) else dict(self.ctx_init)
            phrase = context_phrase(phrases, data.dataset, data.template)
            # TPT/PromptSmooth: n_ctx = the phrase's word count, its first n_ctx tokens learn (custom_plip.py:88,92)
            self.learner = PromptLearner(data.vlm, data.classnames, ctx_init=phrase, learned=len(phrase.split()))
        self._start = self.learner.ctx.detach().clone()
        self._scale = data.vlm.logit_scale
        return self

    def adapt(self, copies: Tensor) -> Callable[[Tensor], Tensor]:
        """Tune the context on each image's (A, N, D) noisy ``copies``; return the tuned base classifier.

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
                optimizer = torch.optim.AdamW([ctx], lr=self.tta_lr)  # fresh state per image, as published
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
        """Tune on the A adaptation copies of (A + S, N, D) ``inputs``, then the mean softmax over the
        other S copies: never scored on the noise it tuned to."""
        adapt, copies = split_copies(self.capabilities, _copies(inputs))
        assert adapt is not None
        return smoothed_proba(self.adapt(adapt)(copies))

    def predict_logits(self, inputs: Tensor) -> Tensor:
        return torch.log(self.predict_proba(inputs).clamp_min(1e-12))

    def base_logits(self, features: Tensor) -> Tensor:
        """Tuning needs an image's copies: the base classifier exists only after :meth:`adapt`."""
        raise TypeError("promptsmooth-zs tunes on each image's noisy copies first; classify with adapt(copies)")


@register_method(
    "promptsmooth",
    "few-shot PromptSmooth: CoOp on noisy views, smoothed prediction (Hussein et al., MICCAI 2024)",
    LIST_PARAMS,
    params={name: RANGES.get(name) for name in FEWSHOT_PARAMS},
    learns_prompt=True,
)
def promptsmooth(**params: Any) -> Method:
    cfg, values = _settings(FEWSHOT, params, FEWSHOT_PARAMS, trains=True)
    return PromptSmooth(Objective({"ce": Term("cross_entropy")}), cfg, **values)


@register_method(
    "promptsmooth-as",
    "few-shot PromptSmooth + angular separation (the CalibPrompt paper's combination)",
    LIST_PARAMS,
    params={name: RANGES.get(name) for name in (*FEWSHOT_PARAMS, "w_as")},
    learns_prompt=True,
)
def promptsmooth_as(**params: Any) -> Method:
    cfg, values = _settings("promptsmooth-as", params, (*FEWSHOT_PARAMS, "w_as"), trains=True)
    w_as = float(values.pop("w_as"))
    return PromptSmooth(Objective({"ce": Term("cross_entropy"), "as": Term("angular_separation", w_as)}), cfg, **values)


@register_method(
    "promptsmooth-zs",
    "zero-shot PromptSmooth: test-time prompt tuning on noisy copies (Hussein et al., MICCAI 2024)",
    LIST_PARAMS,
    params={name: RANGES.get(name) for name in ZEROSHOT_PARAMS},
    trains_inner=({"init": "fewshot"}, FEWSHOT),
)
def promptsmooth_zs(**params: Any) -> Method:
    init = params.get("init", default_of(ZEROSHOT, "init"))
    if init not in ("hand", "fewshot"):
        raise CalbenchError(f"promptsmooth-zs: init must be 'hand' or 'fewshot', got {init!r}")
    _, values = _settings(ZEROSHOT, {k: v for k, v in params.items() if k in ZEROSHOT_PARAMS}, ZEROSHOT_PARAMS, False)
    values.pop("init")
    others = {k: v for k, v in params.items() if k not in ZEROSHOT_PARAMS}
    if init == "hand" and others:
        raise CalbenchError(
            f"promptsmooth-zs: {', '.join(sorted(others))} only apply with init=fewshot; known: {', '.join(ZEROSHOT_PARAMS)}"
        )
    fewshot = None
    if init == "fewshot":
        fewshot = promptsmooth(sigma=values["sigma"], n_samples=values["n_samples"], **others)
    return PromptSmoothZeroShot(fewshot=fewshot, **values)
