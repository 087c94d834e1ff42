"""Image preprocessing: the eval transform, seeded CoOp-style augmentation, and Gaussian noise.

Transform kinds (the feature cache keys on :func:`describe`, the split and the run seed):

- ``eval``: resize + centre crop + normalise;
- ``train``: random resized crop + flip + normalise, drawn per run seed;
- ``<role>-noise<sigma>`` (e.g. ``score-noise0.25``): x + N(0, sigma^2) in [0, 1] pixel
  space before normalisation, as randomized smoothing defines it (Cohen et al., ICML 2019);
  no clipping, so the noise is exactly Gaussian. The role (:data:`NOISE_ROLES`) says what the
  copies are for; ``train-noise<sigma>`` views take the crop of the ``train`` view of the same
  run seed, view and image, and ``train-noise0.25+0.5+1`` draws each view's sigma from the set;
- ``shift-<corruption>-<severity>`` and ``shift-<corruption>-<severity>+<kind>``: a corrupted
  copy of a test image (:mod:`calbench.data.corruptions`, ``compare --shift``), then ``eval`` or ``kind``.

Every random view is drawn from a generator seeded by fixed-length words: the split (train
pool or test), for noise the role, for training views the run seed, the view and the image
index. So a cached view is the same whichever subset of images was encoded first; test image
i never gets the noise training image i got; the copies test-time tuning sees, those it is
scored on and certification's selection and estimation samples are all different draws; and
two run seeds see independent crops of a shared image.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

from calbench.data.corruptions import corrupt, parse_shift_kind
from calbench.models.base import PreprocessConfig

#: CoOp's train augmentation (random_resized_crop, random_flip); scale as in its configs
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _interp(cfg: PreprocessConfig) -> InterpolationMode:
    return InterpolationMode.BILINEAR if cfg.interpolation == "bilinear" else InterpolationMode.BICUBIC


def _normalise(image: Image.Image, cfg: PreprocessConfig) -> Tensor:
    return TF.normalize(TF.to_tensor(image), list(cfg.mean), list(cfg.std))


def _eval_geometry(image: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    image = TF.resize(image, cfg.size, interpolation=_interp(cfg))
    return TF.center_crop(image, [cfg.size, cfg.size])


def eval_transform(image: Image.Image, cfg: PreprocessConfig) -> Tensor:
    """Resize the short side to ``cfg.size``, centre-crop, normalise (CLIP's eval preprocessing)."""
    return _normalise(_eval_geometry(image, cfg), cfg)


def _crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box sampling (Szegedy et al.), with a seeded generator."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: the largest centred crop within the ratio range
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _augment(image: Image.Image, cfg: PreprocessConfig, seed: tuple[int, ...]) -> Image.Image:
    rng = np.random.default_rng(list(seed))
    top, left, h, w = _crop_box(image.width, image.height, rng)
    image = TF.resized_crop(image, top, left, h, w, [cfg.size, cfg.size], interpolation=_interp(cfg))
    if rng.random() < 0.5:
        image = TF.hflip(image)
    return image


def augment_transform(image: Image.Image, cfg: PreprocessConfig, seed: tuple[int, ...]) -> Tensor:
    """Random resized crop (scale 0.08-1) + horizontal flip, deterministic in ``seed``."""
    return _normalise(_augment(image, cfg, seed), cfg)


#: the splits a seed tells apart: the train pool (few-shot training and validation images) and the test split
SPLITS = ("train", "test")
#: what a noisy copy is for. Each role draws its own noise, so nothing a prompt was trained or tuned
#: on is reused to score or certify it, and certification's selection and estimation samples are
#: independent (Cohen et al.'s CERTIFY needs both). ``train``: few-shot training views (augmented,
#: drawn per run seed); ``score``: the copies a smoothed classifier's probabilities average over
#: (validation or test images); ``adapt``: the copies test-time tuning sees; ``select`` and
#: ``estimate``: certification's n0 and n samples.
NOISE_ROLES = ("train", "score", "adapt", "select", "estimate")
#: first seed word of each random stream, so a crop never shares its numbers with a noise draw
AUGMENT_STREAM, NOISE_STREAM = 0, 1

_SIGMA = r"\d+(?:\.\d+)?"
_NOISE_KIND = re.compile(rf"^({'|'.join(NOISE_ROLES)})-noise({_SIGMA}(?:\+{_SIGMA})*)$")


@dataclass(frozen=True)
class NoiseKind:
    """A parsed noise kind: its role and its noise level(s)."""

    role: str
    #: one noise level, or for training views a set: each (view, image) draws one uniformly
    sigmas: tuple[float, ...]

    @property
    def augmented(self) -> bool:
        """Training views take ``train``'s crop and flip; every other role the eval geometry."""
        return self.role == "train"


def noise_kind(sigma: Union[float, Sequence[float]], role: str) -> str:
    """The transform kind for Gaussian noise of std ``sigma`` used as ``role``: ``score-noise0.25``,
    or ``train-noise0.25+0.5+1`` for training views that each draw one level from a set."""
    sigmas = tuple(sigma) if isinstance(sigma, (list, tuple)) else (sigma,)
    kind = f"{role}-noise{'+'.join(f'{float(s):g}' for s in sigmas)}"
    if not all(s > 0 for s in sigmas) or _NOISE_KIND.match(kind) is None:
        raise ValueError(
            f"noise kind needs a role in {', '.join(NOISE_ROLES)} and positive noise levels like 0.25, got {role!r}, {sigma}"
        )
    parse_noise_kind(kind)
    return kind


def parse_noise_kind(kind: str) -> Optional[NoiseKind]:
    """The role and noise level(s) of a noise kind, None for any other kind (``eval``, ``train``)."""
    match = _NOISE_KIND.match(kind)
    if match is None:
        return None
    sigmas = tuple(float(s) for s in match.group(2).split("+"))
    if not all(s > 0 for s in sigmas) or len(set(sigmas)) != len(sigmas):
        raise ValueError(f"transform kind {kind!r}: noise levels must be positive and each given once")
    if len(sigmas) > 1 and match.group(1) != "train":
        raise ValueError(f"transform kind {kind!r}: only training views draw from a set of noise levels")
    return NoiseKind(match.group(1), sigmas)


def role_of(kind: str) -> Optional[str]:
    """What a kind's random views are for: ``train`` for augmented views, a noise kind's role, None for ``eval``."""
    if kind == "train":
        return "train"
    shift = parse_shift_kind(kind)
    if shift is not None:  # a corrupted copy has the role of the kind applied after the corruption
        return role_of(shift.base)
    noise = parse_noise_kind(kind)
    return noise.role if noise is not None else None


def uses_run_seed(kind: str) -> bool:
    """Training views are drawn per run seed, so seeds are independent replicates; evaluation views
    (eval, and the noisy copies of validation and test images) are the same for every run, like the images."""
    return role_of(kind) == "train"


def _split_word(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return SPLITS.index(split)


def augment_seed(split: str, seed: int, view: int, index: int) -> list[int]:
    """Seed words of a training view's crop and flip. Fixed length: numpy's SeedSequence pads short
    entropy with zeros, so [a, b] and [a, b, 0] would draw the same numbers."""
    return [AUGMENT_STREAM, _split_word(split), seed, view, index]


def noise_seed(kind: str, split: str, view: int, index: int, seed: Optional[int] = None) -> list[int]:
    """Seed words of one noisy view: the split, the role, the run seed (training views only), the view,
    the image and the noise level(s), so no two roles, splits or noise levels share a draw."""
    noise = parse_noise_kind(kind)
    if noise is None:
        raise ValueError(f"{kind!r} is not a noise kind")
    levels = zlib.crc32(",".join(repr(s) for s in noise.sigmas).encode())
    run = _run_seed(kind, seed)
    return [NOISE_STREAM, _split_word(split), NOISE_ROLES.index(noise.role), run, view, index, levels]


def _run_seed(kind: str, seed: Optional[int]) -> int:
    if uses_run_seed(kind) and seed is None:
        raise ValueError(f"transform kind {kind!r} draws its views per run: pass the run seed")
    if not uses_run_seed(kind) and seed is not None:
        raise ValueError(f"transform kind {kind!r} is the same for every run: pass no run seed")
    return 0 if seed is None else int(seed)


def draw_noise(shape: tuple[int, ...], noise: NoiseKind, words: list[int]) -> tuple[float, np.ndarray]:
    """(sigma, sigma * z): the level (drawn from the set for mixed training views) and the noise."""
    rng = np.random.default_rng(words)
    sigma = noise.sigmas[int(rng.integers(len(noise.sigmas)))] if len(noise.sigmas) > 1 else noise.sigmas[0]
    return sigma, sigma * rng.standard_normal(shape, dtype=np.float32)


def noisy_transform(
    image: Image.Image, cfg: PreprocessConfig, kind: str, split: str, view: int, index: int, seed: Optional[int] = None
) -> Tensor:
    """Eval or augmented geometry, x + sigma * z in [0, 1] pixel space, then normalisation.

    An augmented view has the crop and flip of the ``train`` view with the same split, run seed,
    view and image. Unclipped, so the noise is exactly Gaussian (Cohen et al., ICML 2019).
    """
    noise = parse_noise_kind(kind)
    if noise is None:
        raise ValueError(f"{kind!r} is not a noise kind")
    words = noise_seed(kind, split, view, index, seed)
    image = (
        _augment(image, cfg, augment_seed(split, _run_seed(kind, seed), view, index))
        if noise.augmented
        else _eval_geometry(image, cfg)
    )
    pixels = TF.to_tensor(image)
    _, draw = draw_noise(tuple(pixels.shape), noise, words)
    return TF.normalize(pixels + torch.from_numpy(draw), list(cfg.mean), list(cfg.std))


def describe(kind: str, cfg: PreprocessConfig) -> str:
    """Stable description of a transform, part of the feature-cache key (the split and run seed are keyed apart)."""
    shift = parse_shift_kind(kind)
    if shift is not None:
        return f"{shift.describe()};{describe(shift.base, cfg)}"
    if kind == "eval":
        return f"eval:resize-shortest+center-crop;{cfg.describe()}"
    if kind == "train":
        return f"train:rrc{CROP_SCALE}+hflip;seeded(split,run-seed,view,index);{cfg.describe()}"
    noise = parse_noise_kind(kind)
    if noise is not None:
        geometry = f"rrc{CROP_SCALE}+hflip" if noise.augmented else "resize-shortest+center-crop"
        levels = repr(noise.sigmas[0]) if len(noise.sigmas) == 1 else f"one-of{noise.sigmas!r}-per-view"
        run = "run-seed," if noise.augmented else ""
        return (
            f"{kind}:{geometry}+gaussian-pixel-noise(sigma={levels},unclipped);"
            f"seeded(split,role={noise.role},{run}view,index,sigma);{cfg.describe()}"
        )
    raise ValueError(
        f"unknown transform kind {kind!r}; expected eval, train or <role>-noise<sigma> (roles: {', '.join(NOISE_ROLES)})"
    )


def to_tensor(
    image: Image.Image,
    kind: str,
    cfg: PreprocessConfig,
    view: int,
    index: int,
    split: str,
    seed: Optional[int] = None,
) -> Tensor:
    """View ``view`` of image ``index`` of ``split`` under ``kind``; ``seed`` is the run seed, given
    exactly for the kinds that draw training views (:func:`uses_run_seed`)."""
    shift = parse_shift_kind(kind)
    if shift is not None:  # a corrupted copy (compare --shift): eval geometry, corruption, then its base kind
        image, kind = corrupt(_eval_geometry(image, cfg), shift, split, index), shift.base
    if kind == "eval":
        _run_seed(kind, seed)
        return eval_transform(image, cfg)
    if kind == "train":
        return augment_transform(image, cfg, augment_seed(split, _run_seed(kind, seed), view, index))
    if parse_noise_kind(kind) is None:
        raise ValueError(f"unknown transform kind {kind!r}")
    return noisy_transform(image, cfg, kind, split, view, index, seed)
