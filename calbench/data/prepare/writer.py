"""Build a dataset folder in calbench's layout from work units, safely and resumably.

A preparer (see :mod:`calbench.data.prepare`) checks the downloads and turns
them into :class:`Unit` s before anything is written; this module writes them.
Images go into ``.<name>.partial`` next to the output folder, one file at a time
through a temp name, and each finished unit is journalled, so an interrupted run
continues where it stopped. The folder is renamed into place only when complete;
a finished folder is recognised by its ``PREPARED.json`` and left alone.
Source images are streamed (see :meth:`calbench.data.archive.Source.spooled`); an
item that cannot be used (it does not decode, is over Pillow's decompression-bomb
limit or calbench's member-size cap) is skipped with a warning naming it, so a
rerun never trips over the same item again.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional, Union

import numpy as np
from PIL import Image

from calbench.atomic import atomic_path, write_bytes_atomic, write_text_atomic
from calbench.data.archive import CHUNK_BYTES, Unreadable
from calbench.data.classnames import format_line
from calbench.data.folder import (
    DECODE_ERRORS,
    IMAGE_SUFFIXES,
    SPLITS,
    ImageFolderDataset,
    bomb_warnings_silenced,
    count_images,
    image_paths,
    over_pixel_limit,
    to_8bit,
)
from calbench.errors import CalbenchError, check_seed, warn

SIZE = 224
MARKER = "PREPARED.json"

#: an encoded image (bytes, or a seekable binary file such as Source.spooled gives) with its file
#: suffix, copied as it is when already SIZE x SIZE; or a decoded image
Payload = Union[tuple[Union[bytes, IO[bytes]], str], Image.Image]


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
    #: source items read (0 when unknown: a folder prepared by an older calbench)
    inputs: int = 0


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


def decode(data: Union[bytes, IO[bytes]], what: str) -> Image.Image:
    """Fully decode an encoded image (bytes or a seekable file), or raise :class:`Unreadable` naming ``what``.

    Images over Pillow's decompression-bomb limit are refused before their pixels are decoded.
    """
    handle = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        with bomb_warnings_silenced():
            image = Image.open(handle)
        problem = over_pixel_limit(image.size)
        if problem is None:
            image.load()
            return image
    except Image.DecompressionBombError as exc:
        problem = over_pixel_limit(exc=exc)
    except DECODE_ERRORS as exc:
        problem = str(exc)
    raise Unreadable(f"{what} ({problem})")


def write_image(payload: Payload, target: Path, what: str, size: Optional[int]) -> None:
    """Write one output image at ``target`` (suffix chosen here) through a temp name.

    Encoded images already at the right size are copied byte for byte; the rest are
    fitted to ``size`` (kept as they are when None) and stored as lossless PNG.
    """
    if isinstance(payload, tuple):
        data, suffix = payload
        handle = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        image = decode(handle, what)
        if (
            (size is None or image.size == (size, size))
            and suffix.lower() in IMAGE_SUFFIXES
            and image.mode in ("L", "RGB")
        ):
            handle.seek(0)
            with atomic_path(target.with_name(target.name + suffix.lower())) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(handle, out, CHUNK_BYTES)
            return
    else:
        image = payload
    buffer = io.BytesIO()
    (fit_square(image, size) if size is not None else image).save(buffer, format="PNG")
    write_bytes_atomic(target.with_name(target.name + ".png"), buffer.getvalue())


def _reuse_prepared(out: Path, recipe: dict[str, object]) -> PrepareReport:
    """An existing ``out`` is reused only when calbench finished it from the same recipe; anything else is refused.

    The items left out when it was prepared are named again, as they were then.
    """
    marker = out / MARKER
    if not marker.is_file():
        raise CalbenchError(
            f"{out} exists and was not written by `calbench data prepare`; remove it or choose another --out"
        )
    try:
        stored = json.loads(marker.read_text(encoding="utf-8"))
        counts, skipped = stored["counts"], [str(why) for why in stored.get("skipped", [])]
    except (OSError, ValueError, KeyError, TypeError):
        raise CalbenchError(f"{marker} is damaged; remove {out} to rebuild it, or choose another --out") from None
    if stored.get("recipe") != recipe:
        if "renamed" in recipe and stored.get("recipe") == {k: v for k, v in recipe.items() if k != "renamed"}:
            raise CalbenchError(
                f"{out} was prepared from these downloads by an older calbench, which named images by file name "
                "alone, so same-named files overwrote each other; remove it and run again to rebuild it with every image"
            )
        raise CalbenchError(
            f"{out} was prepared from other downloads or options; remove it to rebuild, or choose another --out"
        )
    for why in skipped:
        warn(f"skipping unreadable image {why}", stacklevel=4)
    return PrepareReport(out, counts, skipped, reused=True, inputs=stored.get("inputs", 0))


def _read_json(path: Path) -> object:
    """A JSON file's content, or None when it is missing or damaged (a work file of an interrupted run)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_journal(journal: Path) -> dict[str, Optional[str]]:
    """{unit key: why it was skipped, or None when written} from the journal of an interrupted run.

    A line is ``["key", reason]`` in JSON, or a bare key as calbench wrote before; a line cut
    short by a kill is not a known key, so that unit is simply done again.
    """
    done: dict[str, Optional[str]] = {}
    try:
        lines = journal.read_text(encoding="utf-8", errors="replace").split("\n")
    except OSError:
        return done
    for line in filter(None, lines):
        entry = _read_line(line)
        if entry is not None:
            done[entry[0]] = entry[1]
    return done


def _read_line(line: str) -> Optional[tuple[str, Optional[str]]]:
    if not line.startswith('["'):
        return line, None
    try:
        key, why = json.loads(line)
    except ValueError:
        return None
    return (key, why) if isinstance(key, str) and (why is None or isinstance(why, str)) else None


def _open_partial(
    partial: Path, recipe_file: Path, journal: Path, recipe: dict[str, object], classes: list[tuple[str, str]]
) -> dict[str, Optional[str]]:
    """Ready the work folder and return the journal of units already done (see :func:`_read_journal`).

    A work folder begun from other inputs, or one whose recipe file is missing or damaged, is started over.
    """
    if partial.is_symlink() or partial.is_file():
        partial.unlink()
    elif partial.exists() and _read_json(recipe_file) != json.loads(json.dumps(recipe)):
        shutil.rmtree(partial)  # half-made from other inputs: start over
    partial.mkdir(parents=True, exist_ok=True)
    write_text_atomic(recipe_file, json.dumps(recipe, sort_keys=True))
    done = _read_journal(journal)
    if journal.is_file() and journal.stat().st_size:
        with open(journal, "rb+") as handle:  # a line cut short by a kill must not swallow the next one
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
    for split in SPLITS:
        for folder, _ in classes:
            (partial / "images" / split / folder).mkdir(parents=True, exist_ok=True)
    return done


class StrictStop(CalbenchError):
    """An unreadable item under ``strict``: the run stops, and its work folder is kept to resume."""


def _write_units(
    todo: list[Unit], partial: Path, journal: Path, size: Optional[int], log: Callable[[str], None], strict: bool
) -> list[str]:
    """Write each unit's images and journal it (with why, when skipped), so a rerun resumes; return the skipped items.

    An item that cannot be used is skipped with a warning that names it (with ``strict``, it stops
    the run, and the work folder stays for a rerun to resume); Pillow's own decompression-bomb
    warning, which names no file, is silenced.
    """
    skipped: list[str] = []
    with open(journal, "a", encoding="utf-8") as journal_handle, bomb_warnings_silenced():
        for number, unit in enumerate(todo, start=1):
            why = None
            try:
                for folder, stem, payload in unit.produce():
                    write_image(payload, partial / "images" / unit.split / folder / stem, unit.key, size)
            except Unreadable as exc:
                if strict:
                    journal_handle.flush()
                    raise StrictStop(f"cannot read {exc}; remove or replace it, or drop --strict to skip it") from None
                # stacklevel 3: the warning names prepare_folder's caller, as when this loop was inline there
                warn(f"skipping unreadable image {exc}", stacklevel=3)
                why = str(exc)
                skipped.append(why)
            journal_handle.write(json.dumps([unit.key, why]) + "\n")
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
    inputs: int,
) -> None:
    """Write classnames.txt, template.txt and, last, the PREPARED.json marker that declares the folder finished."""
    (partial / "classnames.txt").write_text(
        "".join(format_line(folder, label) for folder, label in classes), encoding="utf-8"
    )
    (partial / "template.txt").write_text(template + "\n", encoding="utf-8")
    # every file here was decoded while it was written: record the split fingerprints so loading can skip the image check
    written = ImageFolderDataset(name, partial)
    verified = {split: written.fingerprint(split) for split in SPLITS}
    (partial / MARKER).write_text(
        json.dumps(
            {
                "dataset": name,
                "recipe": recipe,
                "counts": counts,
                "skipped": skipped,
                "verified": verified,
                "inputs": inputs,
            },
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
    strict: bool = False,
) -> PrepareReport:
    """Write ``units`` into ``out`` in the layout, with classnames.txt and template.txt; skip work already done.

    ``strict`` makes an unreadable item an error instead of a skipped item with a warning."""
    out = Path(out).expanduser()
    if out.exists():
        return _reuse_prepared(out, recipe)

    partial = out.parent / f".{out.name}.partial"
    recipe_file, journal = partial / ".recipe.json", partial / ".done"
    done = _open_partial(partial, recipe_file, journal, recipe, classes)

    todo = [unit for unit in units if unit.key not in done]
    if len(todo) < len(units):
        log(f"resuming: {len(units) - len(todo)} of {len(units)} items already written")
    earlier = [why for unit in units if (why := done.get(unit.key)) is not None]
    try:
        skipped = earlier + _write_units(todo, partial, journal, size, log, strict)
        counts = _count_written(partial, classes)
    except StrictStop:
        raise  # the items written so far are journaled: a rerun resumes after the culprit is fixed
    except CalbenchError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _write_metadata(name, partial, classes, template, recipe, counts, skipped, len(units))
    recipe_file.unlink()
    journal.unlink()
    os.replace(partial, out)
    return PrepareReport(out, counts, skipped, inputs=len(units))


def stratified_test_keys(keys: list[str], labels: list[str], test_fraction: float, seed: int) -> set[str]:
    """Seeded split: about ``test_fraction`` of each class's keys (at least one, at most all but one) go to test."""
    if not 0.0 < test_fraction < 1.0:
        raise CalbenchError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    check_seed(seed, "--seed")
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
    """One line per split with the counts per class, then the source items read against the images written."""
    lines = []
    for split, per_class in report.counts.items():
        total = sum(per_class.values())
        lines.append(f"{split}: {total} images (" + ", ".join(f"{c} {n}" for c, n in per_class.items()) + ")")
    if report.inputs:
        written = sum(sum(per_class.values()) for per_class in report.counts.values())
        lines.append(
            f"{report.inputs} source item(s) read, {len(report.skipped)} skipped as unreadable, {written} image(s) written"
        )
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
