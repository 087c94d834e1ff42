"""A :class:`Session`: one model on one dataset in one run context, and the only way to their features.

Every command builds sessions: ``compare`` one per (model, dataset) pair, ``tune`` one per
pair it searches, ``train``, ``cache``, ``certify`` and ``evaluate`` one each. A session
hands out few-shot data (:meth:`Session.fit_data`: train views and validation images, both
from the train pool) and test features (:meth:`Session.test_features`), always from the
feature cache, so the image encoder runs once per image and view.

Training views are drawn per run seed and one per training epoch by default (CoOp draws a
fresh augmentation every epoch); every noisy view carries its split and role in its seed
(:mod:`calbench.data.transforms`), and the session refuses a kind whose role does not suit
the images asked for, so no noise a method trained or tuned on is reused to score it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from calbench.base import FeatureRequest, FitData, Method, fit_requests
from calbench.cache import FeatureCache, default_cache_dir
from calbench.data import ImageFolderDataset, few_shot_split, load_dataset
from calbench.data.transforms import role_of, uses_run_seed
from calbench.errors import CalbenchError
from calbench.models import VLMBackend, load_vlm
from calbench.online_encoding import OnlineViews
from calbench.published import default
from calbench.train import MAX_EPOCHS, TrainConfig

#: the roles (:func:`calbench.data.transforms.role_of`; None: no random view) each kind of image may take:
#: only few-shot training images get training views, and validation images are only ever scored
ROLES: dict[str, tuple[Optional[str], ...]] = {
    "train": (None, "train"),
    "val": (None, "score", "adapt"),
    "test": (None, "score", "adapt", "select", "estimate"),
}


@dataclass(frozen=True)
class RunContext:
    """Where and how runs happen; the same for every pair of a grid or search."""

    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    cache_dir: Optional[Path] = None  # feature and data cache; default $CALBENCH_CACHE or the user cache dir
    weights: Optional[Path] = None  # a model weights file or folder; only for single-model runs
    data_root: Optional[Path] = None  # folder of the registered datasets; default $CALBENCH_DATA
    strict: bool = False  # an unreadable image is an error instead of a skipped file with a warning
    trust_weights: bool = False  # also load TorchScript weights, running the code embedded in them
    progress: bool = False  # progress bars while encoding

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()


@dataclass(frozen=True)
class FewShot:
    """How few-shot data is drawn from the train pool: ``shots`` training and ``val_shots``
    validation images per class (default: as many), and ``views`` cached augmented views
    of each training image (epoch e reads view e mod views). ``views`` None is one per epoch of
    the method trained (:func:`train_views`): CoOp's fresh crop every epoch. Fewer views encode
    fewer images, but an image is then seen in only ``views`` distinct crops. ``fold`` turns the
    drawn images by that many validation blocks (:func:`calbench.data.few_shot_split`: `tune`'s
    cross-validation); 0 is the split every other command uses."""

    shots: int = TrainConfig.shots
    val_shots: Optional[int] = default("fewshot", "val_shots")
    views: Optional[int] = default("fewshot", "views")
    fold: int = 0

    def __post_init__(self) -> None:
        if self.shots < 1:
            raise CalbenchError(f"--shots must be at least 1, got {self.shots}")
        if self.val_shots is not None and self.val_shots < 1:
            raise CalbenchError(
                f"--val-shots must be at least 1 (post-hoc calibrators fit on the validation split), got {self.val_shots}"
            )
        if self.views is not None and not 1 <= self.views <= MAX_EPOCHS:  # epoch e reads view e mod views
            raise CalbenchError(
                f"--views takes 1 to {MAX_EPOCHS} (the most epochs a run may train, and views past the last "
                f"epoch are never read); got {self.views}"
            )

    @property
    def val(self) -> int:
        return self.shots if self.val_shots is None else self.val_shots


def train_views(fewshot: FewShot, method: Optional[Method] = None) -> int:
    """Cached augmented views of each few-shot training image: ``fewshot.views`` when given, else one
    per epoch ``method`` trains (the default trainer's epochs without a method; one view for a method
    that does not train on them)."""
    if fewshot.views is not None:
        return fewshot.views
    return TrainConfig.epochs if method is None else max(1, method.capabilities.epochs)


def _check_role(images: str, kind: str) -> None:
    role = role_of(kind)
    if role not in ROLES[images]:
        raise ValueError(
            f"{images} images may not take transform kind {kind!r} (role {role}); they take roles {ROLES[images]}"
        )


class Session:
    """A model, a dataset and the model's feature cache, opened once and shared by every run on them.

    Few-shot data (with the extra features methods declare) and the clean test features are
    read from the cache once per split and kept, so a grid of methods on one session fetches
    them once; noisy test copies, large and used by few methods, are read from the cache each
    time they are asked for.
    """

    def __init__(self, model: str, data: str, context: Optional[RunContext] = None) -> None:
        self.context = context or RunContext()
        self.model = model
        self.vlm: VLMBackend = load_vlm(
            model, device=self.context.device, weights=self.context.weights, trust_weights=self.context.trust_weights
        )
        self.dataset: ImageFolderDataset = load_dataset(
            data, self.context.cache_root, self.context.data_root, strict=self.context.strict
        )
        self.cache = FeatureCache(self.context.cache_root, self.vlm, progress=self.context.progress)
        self._fits: dict[tuple[int, FewShot, int], tuple[FitData, np.ndarray, np.ndarray]] = {}
        self._extra: dict[tuple[int, FewShot, FeatureRequest], Tensor] = {}
        self._test: Optional[Tensor] = None

    @property
    def test_labels(self) -> np.ndarray:
        return self.dataset.labels("test")

    def check(self, seed: int, fewshot: FewShot = FewShot(), method: Optional[Method] = None) -> None:
        """Read the test split and split ``seed``'s few-shot data (with ``method``'s training views) now, so
        that a data problem (too few images for the shots asked, an unreadable file) stops a run with one
        line before any training, not as a failed row per method. Both stay cached for the run."""
        self.test_features()
        self.fit_data(seed, fewshot, method)

    def split(self, seed: int, fewshot: FewShot = FewShot()) -> tuple[np.ndarray, np.ndarray]:
        """Indices into the train pool of seed ``seed``'s few-shot training and validation images."""
        labels, names = self.dataset.labels("train"), self.dataset.classnames
        return few_shot_split(labels, fewshot.shots, fewshot.val, seed, names, fewshot.fold)

    def fit_data(
        self,
        seed: int = 1,
        fewshot: FewShot = FewShot(),
        method: Optional[Method] = None,
        score_val: bool = False,
        online: bool = False,
    ) -> FitData:
        """Few-shot train views and validation features of split ``seed``: all a method may learn from.

        Training views are drawn per ``seed``, as many as :func:`train_views` resolves for ``method``.
        With ``method``, the extra features it declares (``Capabilities.fit_features``) come
        too; with ``score_val`` also the validation images in the form it predicts from. ``online``
        (``--online-encoding``): the trainer encodes each batch's fresh view itself (:mod:`calbench.online_encoding`).
        """
        views = train_views(fewshot, method)
        base, train_idx, val_idx = self._base_fit(seed, fewshot, 1 if online else views)
        if online:
            views_now = OnlineViews(self.dataset, "train", train_idx, "train", seed, self.vlm)
            base = replace(base, train_features=views_now)
        requests = fit_requests(method, score_val) if method is not None else {}
        extra = {}
        for name, request in requests.items():
            if request.images not in ("train", "val"):
                raise ValueError(
                    f"fit request {name!r} asks for {request.images!r} images; fitting may only see train and val"
                )
            _check_role(request.images, request.kind)
            request = replace(request, views=views) if request.views is None else request
            key = (seed, fewshot, request)
            if key not in self._extra:
                chosen = train_idx if request.images == "train" else val_idx
                self._extra[key] = self._features("train", chosen, request.kind, request.views, seed)
            extra[name] = self._extra[key]
        return replace(base, extra=extra) if extra else base

    def _base_fit(self, seed: int, fewshot: FewShot, views: int) -> tuple[FitData, np.ndarray, np.ndarray]:
        if (seed, fewshot, views) not in self._fits:
            train_idx, val_idx = self.split(seed, fewshot)
            labels = torch.as_tensor(self.dataset.labels("train"), device=self.vlm.device)
            fit = FitData(
                vlm=self.vlm,
                classnames=self.dataset.classnames,
                template=self.dataset.template,
                train_features=self._features("train", train_idx, "train", views, seed),
                train_labels=labels[torch.as_tensor(train_idx, device=labels.device)],
                val_features=self._features("train", val_idx, "eval", 1, seed)[0],
                val_labels=labels[torch.as_tensor(val_idx, device=labels.device)],
                seed=seed,
                dataset=self.dataset.name,
            )
            self._fits[(seed, fewshot, views)] = (fit, train_idx, val_idx)
        return self._fits[(seed, fewshot, views)]

    def test_features(self, method: Optional[Method] = None) -> Tensor:
        """The test split as ``method`` predicts from it: (N, D) features, (S, N, D) noisy copies for a
        smoothed method, or (A + S, N, D) for one that tunes at test time: its A adaptation copies,
        then the S copies it is scored on (a different draw). Read only to score a fitted method."""
        caps = method.capabilities if method is not None else None
        if caps is not None and caps.test_copies is not None:
            requests = [r for r in (caps.adapt_copies, caps.test_copies) if r is not None]
            return torch.cat([self.test_views(r.kind, range(_count(r))) for r in requests])
        if self._test is None:
            self._test = self.test_views("eval", range(1))[0]
        return self._test

    def val_views(self, seed: int, fewshot: FewShot, kind: str, views: range = range(1)) -> Tensor:
        """(len(views), N, D) features of split ``seed``'s validation images under transform ``kind``
        (a scoring kind only, e.g. a corrupted copy: validation images are never trained on)."""
        _check_role("val", kind)
        chosen = self.split(seed, fewshot)[1]
        return self.cache.features(self.dataset, "train", chosen, kind=kind, views=views).to(self.vlm.device)

    def test_views(self, kind: str, views: range, indices: Optional[np.ndarray] = None) -> Tensor:
        """(len(views), N, D) features of test images ``indices`` (default: all) under transform ``kind``
        (never a training kind: test images are only scored, tuned on or certified)."""
        _check_role("test", kind)
        chosen = np.arange(len(self.dataset.files("test"))) if indices is None else indices
        return self.cache.features(self.dataset, "test", chosen, kind=kind, views=views).to(self.vlm.device)

    def _features(self, split: str, indices: np.ndarray, kind: str, views: int, seed: int) -> Tensor:
        """Train-pool features; the run ``seed`` reaches the cache for the kinds drawn per run only."""
        run = seed if uses_run_seed(kind) else None
        return self.cache.features(self.dataset, split, indices, kind, range(views), run).to(self.vlm.device)


def _count(request: FeatureRequest) -> int:
    if request.views is None:
        raise ValueError(f"{request} asks for one view per training view; test copies need a number")
    return request.views
