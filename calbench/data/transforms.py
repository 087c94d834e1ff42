"""Image preprocessing: the eval transform, seeded CoOp-style augmentation, and Gaussian noise.

Transform kinds (the feature cache keys on :func:`describe`):

- ``eval``: resize + centre crop + normalise;
- ``train``: random resized crop + flip + normalise;
- ``noise<sigma>`` (e.g. ``noise0.25``): ``eval`` geometry, then x + N(0, sigma^2) in
  [0, 1] pixel space before normalisation, as randomized smoothing defines it
  (Cohen et al., ICML 2019); no clipping, so the noise is exactly Gaussian;
- ``train-noise<sigma>``: ``train`` geometry (the same crop as ``train`` for the same
  view), then the same noise.

Random views are drawn from generators seeded by (view, image index), so a cached
view is the same whichever subset of images was encoded first.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

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


_NOISE_KIND = re.compile(r"^(train-)?noise(\d+(?:\.\d+)?)$")


def noise_kind(sigma: float, train: bool = False) -> str:
    """The transform kind for Gaussian noise of std ``sigma``: ``noise0.25`` or ``train-noise0.25``."""
    kind = f"{'train-' if train else ''}noise{sigma:g}"
    if not sigma > 0 or _NOISE_KIND.match(kind) is None:
        raise ValueError(f"noise sigma must be a positive number like 0.25, got {sigma}")
    return kind


def parse_noise_kind(kind: str) -> Optional[tuple[bool, float]]:
    """(augmented?, sigma) for a noise kind, None for ``eval``/``train``."""
    match = _NOISE_KIND.match(kind)
    if match is None:
        return None
    sigma = float(match.group(2))
    if not sigma > 0:
        raise ValueError(f"transform kind {kind!r}: the noise sigma must be positive")
    return match.group(1) is not None, sigma


#: third seed word of the noise generator, so noise never reuses the crop's random stream
NOISE_STREAM = 1


def add_pixel_noise(pixels: Tensor, sigma: float, view: int, index: int) -> Tensor:
    """x + sigma * z, z ~ N(0, I) from a generator seeded by (view, index, sigma).

    Seeding with sigma as well keeps the noise of different sigmas independent, so the
    mixed-sigma training views of PromptSmooth are not rescaled copies of each other.
    """
    rng = np.random.default_rng([view, index, NOISE_STREAM, round(sigma * 1_000_000)])
    noise = rng.standard_normal(tuple(pixels.shape), dtype=np.float32)
    return pixels + sigma * torch.from_numpy(noise)


def noisy_transform(
    image: Image.Image, cfg: PreprocessConfig, sigma: float, train: bool, view: int, index: int
) -> Tensor:
    """Eval or augmented geometry, Gaussian noise in [0, 1] pixel space, then normalisation."""
    image = _augment(image, cfg, (view, index)) if train else _eval_geometry(image, cfg)
    pixels = add_pixel_noise(TF.to_tensor(image), sigma, view, index)
    return TF.normalize(pixels, list(cfg.mean), list(cfg.std))


def describe(kind: str, cfg: PreprocessConfig) -> str:
    """Stable description of a transform, part of the feature-cache key."""
    if kind == "eval":
        return f"eval:resize-shortest+center-crop;{cfg.describe()}"
    if kind == "train":
        return f"train:rrc{CROP_SCALE}+hflip;seeded(view,index);{cfg.describe()}"
    noise = parse_noise_kind(kind)
    if noise is not None:
        train, sigma = noise
        geometry = f"rrc{CROP_SCALE}+hflip" if train else "resize-shortest+center-crop"
        return f"{kind}:{geometry}+gaussian-pixel-noise(sigma={sigma!r},unclipped);seeded(view,index,sigma);{cfg.describe()}"
    raise ValueError(f"unknown transform kind {kind!r}; expected eval, train, noise<sigma> or train-noise<sigma>")


def to_tensor(image: Image.Image, kind: str, cfg: PreprocessConfig, view: int, index: int) -> Tensor:
    if kind == "eval":
        return eval_transform(image, cfg)
    if kind == "train":
        return augment_transform(image, cfg, (view, index))
    noise = parse_noise_kind(kind)
    if noise is None:
        raise ValueError(f"unknown transform kind {kind!r}")
    return noisy_transform(image, cfg, noise[1], noise[0], view, index)
