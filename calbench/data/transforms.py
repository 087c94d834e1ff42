"""Image preprocessing: the eval transform and seeded CoOp-style augmentation.

Augmented views are drawn from a generator seeded by (view, image index), so a
cached view is the same whichever subset of images was encoded first.
"""
from __future__ import annotations

import math

import numpy as np
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


def eval_transform(image: Image.Image, cfg: PreprocessConfig) -> Tensor:
    """Resize the short side to ``cfg.size``, centre-crop, normalise (CLIP's eval preprocessing)."""
    image = TF.resize(image, cfg.size, interpolation=_interp(cfg))
    return _normalise(TF.center_crop(image, [cfg.size, cfg.size]), cfg)


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


def augment_transform(image: Image.Image, cfg: PreprocessConfig, seed: tuple[int, ...]) -> Tensor:
    """Random resized crop (scale 0.08-1) + horizontal flip, deterministic in ``seed``."""
    rng = np.random.default_rng(list(seed))
    top, left, h, w = _crop_box(image.width, image.height, rng)
    image = TF.resized_crop(image, top, left, h, w, [cfg.size, cfg.size], interpolation=_interp(cfg))
    if rng.random() < 0.5:
        image = TF.hflip(image)
    return _normalise(image, cfg)


def describe(kind: str, cfg: PreprocessConfig) -> str:
    """Stable description of a transform, part of the feature-cache key."""
    if kind == "eval":
        return f"eval:resize-shortest+center-crop;{cfg.describe()}"
    if kind == "train":
        return f"train:rrc{CROP_SCALE}+hflip;seeded(view,index);{cfg.describe()}"
    raise ValueError(f"unknown transform kind {kind!r}")


def to_tensor(image: Image.Image, kind: str, cfg: PreprocessConfig, view: int, index: int) -> Tensor:
    if kind == "eval":
        return eval_transform(image, cfg)
    return augment_transform(image, cfg, (view, index))

