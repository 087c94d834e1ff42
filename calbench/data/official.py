"""The CalibPrompt paper's five datasets: what they are, where they come from, and how to prepare them.

Each ``prepare_*`` function reads the download in the shape its owners publish
(a zip, a tar or the extracted folder), checks it before writing anything, and
hands work units to :func:`calbench.data.prepare.prepare_folder`.

This module is the place to import them from. The histopathology preparers
(Kather, PanNuke, DigestPath) live here; the radiology ones (COVID, RSNA 2018)
in :mod:`calbench.data.official_radiology`; the :data:`OFFICIAL` entries table
and the helpers all preparers share in :mod:`calbench.data.official_common`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np
from PIL import Image

from calbench.data.archive import Source
from calbench.data.official_common import (
    HISTO,
    OFFICIAL,
    XRAY,
    Log,
    Official,
    class_members,
    copy_unit,
    finish,
    is_image,
    output_stems,
    prepare_recipe,
    renamed,
    require_found,
)
from calbench.data.official_radiology import RSNA_CLASSES, prepare_covid, prepare_rsna18, read_dicom
from calbench.data.prepare import SIZE, PrepareReport, Unit, Unreadable, decode, default_out, stratified_test_keys
from calbench.errors import CalbenchError


def prepare_kather(
    train: Path,
    test: Path,
    out: Optional[Path] = None,
    data_root: Optional[Path] = None,
    log: Log = lambda m: None,
    strict: bool = False,
) -> PrepareReport:
    """Kather from NCT-CRC-HE-100K (train) and CRC-VAL-HE-7K (test): class folders ADI ... TUM, 224 px already."""
    codes = {folder.lower(): folder for folder, _ in OFFICIAL["kather"].classes}
    with Source(train) as train_src, Source(test) as test_src:
        units, changed = [], 0
        for split, source, what in (("train", train_src, "NCT-CRC-HE-100K"), ("test", test_src, "CRC-VAL-HE-7K")):
            found = class_members(source, codes)
            require_found(found, source, what)
            for folder, members in found.items():
                stems = output_stems(members)
                changed += renamed(stems)
                units += [copy_unit(source, m, split, folder, stems[m]) for m in members]
        recipe = prepare_recipe("kather", {"train": [train_src], "test": [test_src]}, renamed=changed)
        return finish("kather", out, data_root, units, recipe, log, strict)


def _pannuke_fold(source: Source, scratch: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N,H,W,3), neoplastic mask (N,H,W)) of one fold, memory-mapped."""

    def member(suffix: str) -> str:
        hits = [m for m in source.names if m.lower().endswith(suffix)]
        if len(hits) != 1:
            raise CalbenchError(f"{source.path} should hold exactly one {suffix} (a PanNuke fold); found {len(hits)}")
        return hits[0]

    images_member, masks_member = member("images.npy"), member("masks.npy")
    images = np.load(source.local_path(images_member, scratch / "images"), mmap_mode="r")
    masks = np.load(source.local_path(masks_member, scratch / "masks"), mmap_mode="r")
    if images.ndim != 4 or masks.ndim != 4 or images.shape[0] != masks.shape[0]:
        raise CalbenchError(
            f"{source.path}: images.npy {images.shape} and masks.npy {masks.shape} do not match a PanNuke fold (N,256,256,3)/(N,256,256,6)"
        )
    return images, masks[..., 0]


def _fold_tags(folds: list[Source]) -> tuple[dict[int, str], int]:
    """{id(fold): the name its patches start with}: the fold's file stem, made distinct from the other folds'
    (two folds named fold_1.zip in different folders would otherwise overwrite each other), and how many changed."""
    paths = [s.path.resolve().as_posix().lstrip("/") for s in folds]
    stems = output_stems(paths)
    return {id(s): stems[p] for s, p in zip(folds, paths)}, renamed(stems)


def prepare_pannuke(
    train: Sequence[Path],
    test: Sequence[Path],
    out: Optional[Path] = None,
    data_root: Optional[Path] = None,
    log: Log = lambda m: None,
    strict: bool = False,
) -> PrepareReport:
    """PanNuke folds: a patch is malignant when its mask has any neoplastic-nucleus pixel (channel 0), else benign."""
    if not train or not test:
        raise CalbenchError(
            "give at least one --train fold and one --test fold (e.g. fold_1.zip fold_2.zip / fold_3.zip)"
        )
    sources = {"train": [Source(p) for p in train], "test": [Source(p) for p in test]}
    target = default_out("pannuke", out, data_root)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # zipped folds are copied out next to the output (not to /tmp: a fold's arrays are several GB) to be memory-mapped
        with tempfile.TemporaryDirectory(prefix=".pannuke-arrays-", dir=target.parent) as scratch:
            units = []
            tags, changed = _fold_tags([source for folds in sources.values() for source in folds])
            for split, folds in sources.items():
                for number, source in enumerate(folds):
                    images, neoplastic = _pannuke_fold(source, Path(scratch) / f"{split}{number}")
                    tag = tags[id(source)]

                    def unit(
                        i: int,
                        images: np.ndarray = images,
                        neoplastic: np.ndarray = neoplastic,
                        tag: str = tag,
                        split: str = split,
                    ) -> Unit:
                        folder = "malignant" if np.any(neoplastic[i] > 0) else "benign"

                        def produce() -> Iterable[tuple[str, str, Image.Image]]:
                            pixels = np.clip(np.asarray(images[i], dtype=np.float64), 0, 255).astype(np.uint8)
                            yield folder, f"{tag}_{i:05d}", Image.fromarray(pixels)

                        return Unit(f"{split}/{tag}/{i}", split, produce)

                    units += [unit(i) for i in range(images.shape[0])]
            return finish(
                "pannuke", target, data_root, units, prepare_recipe("pannuke", sources, renamed=changed), log, strict
            )
    finally:
        for folds in sources.values():
            for source in folds:
                source.close()


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


PREPARERS: dict[str, Callable[..., PrepareReport]] = {
    "kather": prepare_kather,
    "pannuke": prepare_pannuke,
    "digestpath": prepare_digestpath,
    "covid": prepare_covid,
    "rsna18": prepare_rsna18,
}

__all__ = [
    "HISTO",
    "OFFICIAL",
    "PREPARERS",
    "RSNA_CLASSES",
    "XRAY",
    "Log",
    "Official",
    "prepare_covid",
    "prepare_digestpath",
    "prepare_kather",
    "prepare_pannuke",
    "prepare_rsna18",
    "read_dicom",
]
