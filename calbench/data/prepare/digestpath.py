"""DigestPath 2019: colonoscopy tissue tiled into patches, labelled by the lesion masks, split by source image."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np
from PIL import Image

from calbench.data.archive import Source
from calbench.data.prepare.common import (
    Log,
    finish,
    is_image,
    output_stems,
    prepare_recipe,
    renamed,
)
from calbench.data.prepare.writer import (
    SIZE,
    PrepareReport,
    Unit,
    Unreadable,
    decode,
    stratified_test_keys,
)
from calbench.errors import CalbenchError


def _tissue_fraction(tile: np.ndarray) -> float:
    """Share of pixels that are not bright background (grey level below 220)."""
    return float((tile.mean(axis=2) < 220).mean())


def _digestpath_images(source: Source) -> list[str]:
    """The tissue images of a DigestPath download (its ``*_mask`` images left out)."""
    return [m for m in source.names if is_image(m) and not PurePosixPath(m).stem.lower().endswith("_mask")]


def _without_suffix(member: str) -> str:
    return PurePosixPath(member).with_suffix("").as_posix()


def _digestpath_masks(source: Source) -> dict[str, str]:
    """{image path without suffix: its ``*_mask`` member beside it} in the positive download."""
    return {
        _without_suffix(m)[: -len("_mask")]: m for m in source.names if PurePosixPath(m).stem.lower().endswith("_mask")
    }


def _check_digestpath(
    pos_src: Source, neg_src: Source, pos_images: list[str], neg_images: list[str], masks: dict[str, str]
) -> None:
    """Refuse downloads without tissue images, or positive images without a lesion mask, before anything is written."""
    if not pos_images or not neg_images:
        raise CalbenchError(
            f"{pos_src.path if not pos_images else neg_src.path} holds no tissue images; give tissue-train-pos-v1 and tissue-train-neg"
        )
    unmasked = [m for m in pos_images if _without_suffix(m) not in masks]
    if unmasked:
        raise CalbenchError(
            f"{pos_src.path}: {unmasked[0]} has no {PurePosixPath(unmasked[0]).stem}_mask image; --pos must be tissue-train-pos-v1 with its masks"
        )


def _digestpath_lesion(source: Source, member: str, masks: dict[str, str], image: np.ndarray) -> np.ndarray:
    """A positive image's lesion mask as booleans; a mask of another size makes the image unreadable."""
    with source.spooled(masks[_without_suffix(member)]) as handle:
        lesion = np.asarray(decode(handle, member).convert("L")) > 127
    if lesion.shape != image.shape[:2]:
        raise Unreadable(f"{member} (its mask is {lesion.shape[::-1]}, the image {image.shape[1::-1]})")
    return lesion


def _patch_corners(image: np.ndarray, lesion: Optional[np.ndarray]) -> list[tuple[int, int]]:
    """Top-left corners of the SIZE px tiles that are at least half tissue (and half lesion, given a lesion mask)."""
    corners = []
    for top in range(0, image.shape[0] - SIZE + 1, SIZE):
        for left in range(0, image.shape[1] - SIZE + 1, SIZE):
            tile = image[top : top + SIZE, left : left + SIZE]
            if _tissue_fraction(tile) < 0.5:
                continue
            if lesion is not None and lesion[top : top + SIZE, left : left + SIZE].mean() < 0.5:
                continue
            corners.append((top, left))
    return corners


def _digestpath_patches(
    source: Source, member: str, folder: str, masks: dict[str, str], seed: int, max_patches: int, stem: str
) -> Iterator[tuple[str, str, Image.Image]]:
    """One image's patches, named ``<stem>_<top>_<left>``: at most ``max_patches`` of its eligible tiles, seeded by the member name."""
    with source.spooled(member) as handle:
        image = np.asarray(decode(handle, member).convert("RGB"))
    lesion = _digestpath_lesion(source, member, masks, image) if folder == "malignant" else None
    corners = _patch_corners(image, lesion)
    rng = np.random.default_rng([seed, *member.encode()])
    chosen = sorted(corners[i] for i in rng.permutation(len(corners))[:max_patches])
    for top, left in chosen:
        yield folder, f"{stem}_{top}_{left}", Image.fromarray(image[top : top + SIZE, left : left + SIZE])


def prepare_digestpath(
    pos: Path,
    neg: Path,
    out: Optional[Path] = None,
    data_root: Optional[Path] = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    max_patches: int = 20,
    log: Log = lambda m: None,
    strict: bool = False,
) -> PrepareReport:
    """DigestPath 2019 tissue images, tiled into 224 px patches.

    Benign patches come from the negative images; malignant ones from the positive
    images where the lesion mask (``*_mask.jpg``) covers at least half the patch.
    Patches with less than half tissue are dropped; at most ``max_patches`` per
    image (seeded). Whole images go to train or test, so no image is in both.
    """
    with Source(pos) as pos_src, Source(neg) as neg_src:
        masks = _digestpath_masks(pos_src)
        pos_images, neg_images = _digestpath_images(pos_src), _digestpath_images(neg_src)
        _check_digestpath(pos_src, neg_src, pos_images, neg_images, masks)
        items = [(pos_src, m, "malignant") for m in pos_images] + [(neg_src, m, "benign") for m in neg_images]
        keys = [f"{folder}/{m}" for _, m, folder in items]
        test = stratified_test_keys(keys, [folder for _, _, folder in items], test_fraction, seed)
        stems = {"malignant": output_stems(pos_images), "benign": output_stems(neg_images)}
        units = [
            Unit(
                key,
                "test" if key in test else "train",
                partial(_digestpath_patches, source, member, folder, masks, seed, max_patches, stems[folder][member]),
            )
            for (source, member, folder), key in zip(items, keys)
        ]
        recipe = prepare_recipe(
            "digestpath",
            {"pos": [pos_src], "neg": [neg_src]},
            renamed=sum(renamed(s) for s in stems.values()),
            test_fraction=test_fraction,
            seed=seed,
            max_patches=max_patches,
        )
        return finish("digestpath", out, data_root, units, recipe, log, strict)
