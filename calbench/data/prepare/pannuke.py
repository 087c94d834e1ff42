"""PanNuke: benign vs malignant patches from the published folds (images.npy, types, masks)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from calbench.data.archive import Source
from calbench.data.prepare.common import (
    Log,
    finish,
    output_stems,
    prepare_recipe,
    renamed,
)
from calbench.data.prepare.writer import (
    PrepareReport,
    Unit,
    default_out,
)
from calbench.errors import CalbenchError


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
