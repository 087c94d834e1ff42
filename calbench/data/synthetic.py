"""The built-in ``synthetic`` dataset: H&E-like tissue tiles from two hospitals (:mod:`calbench.tissue`).

Six tissue classes, each a spread of the seven tile attributes around its own centre, named in
the words the ``tiny`` model's pre-training captions use, so that its zero-shot prompts work, but
only partly: each name says two or three of the attributes and leaves out others that tell classes
apart ("pale nuclei" does not say that they are round, in pink cytoplasm), and neighbouring classes
overlap (lymphocytes and tumour differ mainly in nucleus size, stroma and smooth muscle in the
pink of their fibres). The train pool is stained and scanned in hospital A, the test split in
hospital B (bluer hematoxylin, weaker eosin, dimmer light, a softer focus), a shift of the kind
that separates two labs. The tiles are drawn from seeds the pre-training corpus never uses.

Written on first use in the standard folder layout, so the demo goes through the same loader as
real data. It is built in a ``.synthetic-XXXX`` temp folder and renamed into place. A run
killed while building leaves that folder behind; every later call removes such folders once none
of their folders has changed for :data:`STALE_AFTER_S` seconds, so a generator still at work in
another process is never raced (no lock needed).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from calbench.data.classnames import format_line
from calbench.tissue import Stain, render

VERSION = "4"  # 4: wider classes, hospital B further off (3: first H&E-like tiles; 1, 2: older drafts)
#: tile side in pixels, the ``tiny`` model's input size
SIZE = 64
#: prompts read as the pre-training captions do
TEMPLATE = "an H&E image of {}."
#: how far a class's tiles scatter around their centre (std of each attribute; calbench's choice). At 0.10,
#: with a milder hospital B, 8-shot CoOp-CE reached 88% and was only 2-15 points overconfident, often within
#: the sampling noise of 8 validation images per class, so temperature scaling fitted on them raised its
#: ECE on 5 of seeds 4-9; here CoOp-CE is about 82% accurate and 4-15 points overconfident (docs/demo.md)
SPREAD = 0.12
#: (folder, class name, attribute centre, attribute spread), attributes in calbench.tissue.ATTRIBUTES order:
#: density, size, darkness, elongation, fibres, pink, fat
CLASSES = [
    ("adi", "nuclei with empty fat spaces", (0.15, 0.5, 0.5, 0.5, 0.15, 0.5, 0.75), SPREAD),
    ("lym", "small dark nuclei", (0.85, 0.15, 0.85, 0.15, 0.15, 0.3, 0.0), SPREAD),
    ("mus", "deep pink fibrous stroma", (0.5, 0.5, 0.5, 0.85, 0.85, 0.85, 0.0), SPREAD),
    ("nor", "pale nuclei", (0.5, 0.5, 0.2, 0.2, 0.15, 0.5, 0.0), SPREAD),
    ("str", "pale pink fibrous stroma", (0.2, 0.5, 0.5, 0.8, 0.8, 0.2, 0.0), SPREAD),
    ("tum", "large dark nuclei", (0.8, 0.8, 0.75, 0.5, 0.2, 0.5, 0.0), SPREAD),
]
#: class names in class-index (sorted folder) order
CLASSNAMES = tuple(name for _, name, _, _ in sorted(CLASSES))
PER_CLASS = {"train": 80, "test": 150}
#: where each split was stained and scanned: the train pool in hospital A, the test split in hospital B
HOSPITALS = {
    "train": Stain(),
    "test": Stain(hematoxylin=(0.575, 0.715, 0.395), eosin=(0.09, 0.985, 0.13), e_strength=0.85, gain=0.97, blur=0.375),
}
#: per-tile staining variation within one hospital (calbench's choice: a few percent, as within one lab)
STAIN_JITTER = 0.06
#: the generator's seed
SEED = 20250
#: a temp folder untouched this long was left by a killed run: building the set takes a few seconds
#: and touches a class folder with every image (calbench's choice, with a wide margin)
STALE_AFTER_S = 600.0
DESCRIPTION = (
    f"{len(CLASSES)} H&E-like tissue classes, {SIZE}x{SIZE} tiles ({PER_CLASS['train']} train, "
    f"{PER_CLASS['test']} test each; test from another hospital's stain and scanner), generated on first use"
)


def tile(split: str, class_index: int, i: int, seed: int = 0) -> np.ndarray:
    """Tile ``i`` of class ``class_index`` (sorted-folder order) in ``split``: its own seeded generator
    (``seed`` > 0: another draw of the same classes)."""
    folder, _, centre, spread = sorted(CLASSES)[class_index]
    rng = np.random.default_rng([SEED + seed, list(PER_CLASS).index(split), class_index, i])
    attributes = np.clip(np.asarray(centre) + rng.normal(0.0, spread, len(centre)), 0.0, 1.0)
    if centre[-1] == 0.0:
        attributes[-1] = 0.0  # no class but adipose has fat
    return render(attributes, HOSPITALS[split].jittered(rng, STAIN_JITTER), SIZE, rng)


def _last_change(folder: Path) -> float:
    """Newest modification time of a temp folder and the folders in it that images are written to."""
    times = [folder.stat().st_mtime]
    times += [p.stat().st_mtime for p in folder.glob("images/*/*") if p.is_dir() and not p.is_symlink()]
    return max(times)


def remove_stale_temps(target: Path, now: float | None = None) -> list[Path]:
    """Remove the temp folders of ``target`` that killed runs left (unchanged for STALE_AFTER_S); return them."""
    now = time.time() if now is None else now
    removed = []
    for folder in sorted(target.parent.glob(f".{target.name}-*")):
        try:
            if folder.is_dir() and not folder.is_symlink() and now - _last_change(folder) > STALE_AFTER_S:
                shutil.rmtree(folder)
                removed.append(folder)
        except OSError:
            continue  # removed by another process meanwhile, or not ours to remove
    return removed


def write_synthetic(target: Path, seed: int = 0) -> Path:
    """Create the dataset at ``target`` (atomically: temp folder, then rename); ``seed`` as in :func:`tile`."""
    remove_stale_temps(target)
    if (target / "VERSION").is_file() and (target / "VERSION").read_text().strip() == VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for split, count in PER_CLASS.items():
            for c, (folder, _, _, _) in enumerate(sorted(CLASSES)):
                out = tmp / "images" / split / folder
                out.mkdir(parents=True)
                for i in range(count):
                    Image.fromarray(tile(split, c, i, seed)).save(out / f"{folder}_{i:03d}.png")
        (tmp / "classnames.txt").write_text("".join(format_line(f, n) for f, n, _, _ in CLASSES), encoding="utf-8")
        (tmp / "template.txt").write_text(TEMPLATE + "\n", encoding="utf-8")
        (tmp / "VERSION").write_text(VERSION + "\n")
        if target.exists():  # an older version or a half-made folder from another tool
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "VERSION").is_file():  # another process finished first
            return target
        raise
    return target
