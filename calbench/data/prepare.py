"""Build a dataset folder in calbench's layout from work units, safely and resumably.

A preparer (see :mod:`calbench.data.official`) checks the downloads and turns
them into :class:`Unit` s before anything is written; this module writes them.
Images go into ``.<name>.partial`` next to the output folder, one file at a time
through a temp name, and each finished unit is journalled, so an interrupted run
continues where it stopped. The folder is renamed into place only when complete;
a finished folder is recognised by its ``PREPARED.json`` and left alone.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from calbench.atomic import write_bytes_atomic, write_text_atomic
from calbench.data.folder import IMAGE_SUFFIXES, SPLITS, ImageFolderDataset, count_images, image_paths, to_8bit
from calbench.errors import CalbenchError

SIZE = 224
MARKER = "PREPARED.json"

#: encoded bytes with their file suffix (copied as they are when already SIZE x SIZE), or a decoded image
Payload = Union[tuple[bytes, str], Image.Image]


class Unreadable(Exception):
    """A source image that does not decode; the unit is skipped with a warning."""


@dataclass(frozen=True)
class Unit:
    """One piece of work: a source item that yields (class folder, file stem, payload) outputs for one split."""

    key: str
    split: str
    produce: Callable[[], Iterable[tuple[str, str, Payload]]]


@dataclass
class PrepareReport:
    out: Path
    counts: dict[str, dict[str, int]]
    skipped: list[str] = field(default_factory=list)
    reused: bool = False


def fit_square(image: Image.Image, size: int = SIZE) -> Image.Image:
    """Resize the short side to ``size`` and centre-crop to size x size; grey stays grey, other modes become RGB."""
    image = to_8bit(image)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        image = image.resize(
            (max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BICUBIC
        )
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def decode(data: bytes, what: str) -> Image.Image:
    """Fully decode image bytes, or raise :class:`Unreadable` naming ``what``."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise Unreadable(f"{what} ({exc})") from None


def _write(payload: Payload, target: Path, what: str, size: Optional[int]) -> None:
    """Write one output image at ``target`` (suffix chosen here) through a temp name.

    Encoded images already at the right size are copied byte for byte; the rest are
    fitted to ``size`` (kept as they are when None) and stored as lossless PNG.
    """
    if isinstance(payload, tuple):
        data, suffix = payload
        image = decode(data, what)
        if (
            (size is None or image.size == (size, size))
            and suffix.lower() in IMAGE_SUFFIXES
            and image.mode in ("L", "RGB")
        ):
            write_bytes_atomic(target.with_suffix(suffix.lower()), data)
            return
    else:
        image = payload
    buffer = io.BytesIO()
    (fit_square(image, size) if size is not None else image).save(buffer, format="PNG")
    write_bytes_atomic(target.with_suffix(".png"), buffer.getvalue())


def _reuse_prepared(out: Path, recipe: dict[str, object]) -> PrepareReport:
    """An existing ``out`` is reused only when calbench finished it from the same recipe; anything else is refused."""
    marker = out / MARKER
    if not marker.is_file():
        raise CalbenchError(
            f"{out} exists and was not written by `calbench data prepare`; remove it or choose another --out"
        )
    stored = json.loads(marker.read_text())
    if stored.get("recipe") != recipe:
        raise CalbenchError(
            f"{out} was prepared from other downloads or options; remove it to rebuild, or choose another --out"
        )
    return PrepareReport(out, stored["counts"], reused=True)


def _open_partial(
    partial: Path, recipe_file: Path, journal: Path, recipe: dict[str, object], classes: list[tuple[str, str]]
) -> set[str]:
    """Ready the work folder (restarted when begun from other inputs) and return the unit keys already journalled."""
    if partial.exists() and (not recipe_file.is_file() or json.loads(recipe_file.read_text()) != recipe):
        shutil.rmtree(partial)  # half-made from other inputs: start over
    partial.mkdir(parents=True, exist_ok=True)
    write_text_atomic(recipe_file, json.dumps(recipe, sort_keys=True))
    done = set(journal.read_text().split("\n")) if journal.is_file() else set()
    for split in SPLITS:
        for folder, _ in classes:
            (partial / "images" / split / folder).mkdir(parents=True, exist_ok=True)
    return done


def _write_units(
    todo: list[Unit], partial: Path, journal: Path, size: Optional[int], log: Callable[[str], None]
) -> list[str]:
    """Write each unit's images and journal its key, so a rerun resumes; return the unreadable items skipped."""
    skipped: list[str] = []
    with open(journal, "a", encoding="utf-8") as journal_handle:
        for number, unit in enumerate(todo, start=1):
            try:
                for folder, stem, payload in unit.produce():
                    _write(payload, partial / "images" / unit.split / folder / stem, unit.key, size)
            except Unreadable as exc:
                # stacklevel 3: the warning names prepare_folder's caller, as when this loop was inline there
                warnings.warn(f"skipping unreadable image {exc}", stacklevel=3)
                skipped.append(str(exc))
            journal_handle.write(unit.key + "\n")
            if number % 1000 == 0:
                journal_handle.flush()
                log(f"{number}/{len(todo)} items")
    return skipped


def _count_written(partial: Path, classes: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """Images per split and class in the work folder; a class left empty in a split means the wrong downloads."""
    counts = {
        split: {folder: len(image_paths(partial / "images" / split / folder)) for folder, _ in classes}
        for split in SPLITS
    }
    for split, per_class in counts.items():
        for folder, n in per_class.items():
            if n == 0:
                raise CalbenchError(
                    f"no {split} images of class {folder!r} came out of the downloads; check that the right files were given"
                )
    return counts


def _write_metadata(
    name: str,
    partial: Path,
    classes: list[tuple[str, str]],
    template: str,
    recipe: dict[str, object],
    counts: dict[str, dict[str, int]],
    skipped: list[str],
) -> None:
    """Write classnames.txt, template.txt and, last, the PREPARED.json marker that declares the folder finished."""
    (partial / "classnames.txt").write_text(
        "".join(f"{folder} {label}\n" for folder, label in classes), encoding="utf-8"
    )
    (partial / "template.txt").write_text(template + "\n", encoding="utf-8")
    # every file here was decoded while it was written: record the split fingerprints so loading can skip the image check
    written = ImageFolderDataset(name, partial)
    verified = {split: written.fingerprint(split) for split in SPLITS}
    (partial / MARKER).write_text(
        json.dumps(
            {"dataset": name, "recipe": recipe, "counts": counts, "skipped": skipped, "verified": verified},
            indent=1,
            sort_keys=True,
        )
    )


def prepare_folder(
    name: str,
    out: Path,
    units: list[Unit],
    classes: list[tuple[str, str]],
    recipe: dict[str, object],
    template: str,
    log: Callable[[str], None] = lambda message: None,
    size: Optional[int] = SIZE,
) -> PrepareReport:
    """Write ``units`` into ``out`` in the layout, with classnames.txt and template.txt; skip work already done."""
    out = Path(out).expanduser()
    if out.exists():
        return _reuse_prepared(out, recipe)

    partial = out.parent / f".{out.name}.partial"
    recipe_file, journal = partial / ".recipe.json", partial / ".done"
    done = _open_partial(partial, recipe_file, journal, recipe, classes)

    todo = [unit for unit in units if unit.key not in done]
    if len(todo) < len(units):
        log(f"resuming: {len(units) - len(todo)} of {len(units)} items already written")
    try:
        skipped = _write_units(todo, partial, journal, size, log)
        counts = _count_written(partial, classes)
    except CalbenchError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _write_metadata(name, partial, classes, template, recipe, counts, skipped)
    recipe_file.unlink()
    journal.unlink()
    os.replace(partial, out)
    return PrepareReport(out, counts, skipped)


def stratified_test_keys(keys: list[str], labels: list[str], test_fraction: float, seed: int) -> set[str]:
    """Seeded split: about ``test_fraction`` of each class's keys (at least one, at most all but one) go to test."""
    if not 0.0 < test_fraction < 1.0:
        raise CalbenchError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    test: set[str] = set()
    for label in sorted(set(labels)):
        members = sorted(k for k, lab in zip(keys, labels) if lab == label)
        if len(members) < 2:
            raise CalbenchError(f"class {label!r} has {len(members)} image(s); a train/test split needs at least 2")
        n_test = min(len(members) - 1, max(1, round(len(members) * test_fraction)))
        test.update(members[i] for i in rng.permutation(len(members))[:n_test])
    return test


def default_out(name: str, out: Optional[Path], data_root: Optional[Path]) -> Path:
    """--out if given, else the dataset's folder in the data home, where `--data NAME` will find it."""
    from calbench.data.registry import data_home

    return Path(out).expanduser() if out is not None else data_home(data_root) / name


def summary(report: PrepareReport) -> str:
    """One line per split: the counts per class."""
    lines = []
    for split, per_class in report.counts.items():
        total = sum(per_class.values())
        lines.append(f"{split}: {total} images (" + ", ".join(f"{c} {n}" for c, n in per_class.items()) + ")")
    return "\n".join(lines)


__all__ = [
    "PrepareReport",
    "Unit",
    "Unreadable",
    "count_images",
    "decode",
    "default_out",
    "fit_square",
    "prepare_folder",
    "stratified_test_keys",
    "summary",
]
