"""The on-disk layout every calbench dataset uses, and its checks.

    <root>/<name>/classnames.txt          lines "<class_folder> <class name>"; a folder with spaces as
                                          "<folder><TAB><class name>" or '"<folder>" <class name>'
                                          (UTF-8; see calbench.data.classnames)
    <root>/<name>/images/{train,test}/<class_folder>/*.{png,jpg,jpeg,tif,tiff,bmp}

Class index = position of the class folder in sorted order.

Corrupt images are found when a split is first listed: every file is decoded
once and the result is remembered under the cache folder, keyed by the split's
fingerprint (names, sizes, modification times); a folder written by
`calbench data prepare` records that fingerprint and is not decoded again. Unreadable files are left out
of the split with a warning that names them (or raise with ``strict``), so the
indices that few-shot splits and cached features refer to are the same in
every run that sees the same files. Deciding at listing time rather than at
first decode is what keeps those indices stable: a file found broken half-way
through encoding could not be dropped without shifting every index after it.
Broken symbolic links (loops, missing targets) and images over Pillow's
decompression-bomb limit are unreadable files in the same sense: skipped with a
warning naming them, an error with ``strict``; nothing is followed recursively,
so no link can make listing hang.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from calbench import streams
from calbench.atomic import write_text_atomic
from calbench.data.classnames import read_classnames
from calbench.errors import CalbenchError, warn

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
SPLITS = ("train", "test")
DEFAULT_TEMPLATE = "a photo of a {}."
CHECK_VERSION = "2"  # 2: images over the decompression-bomb limit count as unreadable


#: what Pillow raises for a file it cannot decode (a DecompressionBombWarning only where warnings are errors)
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombWarning)


def _class_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_paths(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def link_problem(path: Path, exc: Optional[OSError] = None) -> Optional[str]:
    """Why ``path`` cannot be followed (a symbolic link loop, a missing target), or None when it can."""
    if exc is None:
        try:
            path.stat()
            return None
        except OSError as error:
            exc = error
    if exc.errno == errno.ELOOP:
        return "a symbolic link loop"
    if path.is_symlink():
        return f"a dangling symbolic link to {os.readlink(path)}"
    return exc.strerror or str(exc)


def broken_links(directory: Path) -> list[tuple[Path, str]]:
    """(link, why) for each visible entry of ``directory`` that is a symbolic link that cannot be followed."""
    found = []
    for path in sorted(directory.iterdir()):
        if not path.name.startswith(".") and path.is_symlink():
            why = link_problem(path)
            if why is not None:
                found.append((path, why))
    return found


def count_images(root: Path) -> dict[str, int]:
    """Image files per split by listing only (for `calbench datasets`); empty if not a dataset folder."""
    counts = {}
    for split in SPLITS:
        directory = Path(root) / "images" / split
        if not directory.is_dir():
            return {}
        counts[split] = sum(len(image_paths(directory / c)) for c in _class_dirs(directory))
    return counts


def over_pixel_limit(size: Optional[tuple[int, int]] = None, exc: Optional[Exception] = None) -> Optional[str]:
    """Why an image of ``size`` (or the one Pillow refused with ``exc``) is too large to decode, or None.

    Pillow's limit (``PIL.Image.MAX_IMAGE_PIXELS``) guards against decompression bombs: it
    raises above twice the limit and only warns between the limit and twice it; calbench
    skips both, so no image that large is ever decoded.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if exc is not None:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        what = f"{found.group(1)} pixels" if found else "more pixels"
    elif size is not None and limit is not None and size[0] * size[1] > limit:
        what = f"{size[0]}x{size[1]} pixels"
    else:
        return None
    return f"{what}, over Pillow's decompression-bomb limit of {limit} pixels: shrink or tile it"


def decode_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be decoded as an image, or None when it can (decodes it fully).

    Pillow's DecompressionBombWarning should be silenced by the caller (see
    :func:`bomb_warnings_silenced`): the pixel count is checked here instead.
    """
    try:
        with Image.open(path) as image:
            too_large = over_pixel_limit(image.size)
            if too_large is not None:
                return too_large
            image.load()
        return None
    except Image.DecompressionBombError as exc:
        return over_pixel_limit(exc=exc)
    except DECODE_ERRORS as exc:
        return str(exc) or type(exc).__name__


@contextmanager
def bomb_warnings_silenced() -> Iterator[None]:
    """Pillow's DecompressionBombWarning ignored (calbench names the file in its own warning instead).

    Enter it in the main thread around work that decodes in threads: warning filters are process-wide.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


@dataclass
class ImageFolderDataset:
    """A dataset in calbench's folder layout; checks its structure on creation, its images on first listing.

    ``cache_dir`` (optional) is where the result of the image check is remembered,
    so each file set is decoded once, not once per run. ``strict`` turns a skipped
    corrupt image (or broken link) into an error.
    """

    name: str
    root: Path
    template: str = DEFAULT_TEMPLATE
    cache_dir: Optional[Path] = None
    strict: bool = False
    class_folders: list[str] = field(init=False)
    classnames: list[str] = field(init=False)
    _files: dict[str, list[tuple[Path, int]]] = field(init=False, default_factory=dict, repr=False)
    _listing: dict[str, list[tuple[Path, int, os.stat_result]]] = field(init=False, default_factory=dict, repr=False)
    _fingerprints: dict[str, str] = field(init=False, default_factory=dict, repr=False)
    _broken: dict[str, list[tuple[Path, str]]] = field(init=False, default_factory=dict, repr=False)
    skipped: dict[str, list[tuple[Path, str]]] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise CalbenchError(f"dataset folder {self.root} does not exist; check --data / --data-root")
        names_file = self.root / "classnames.txt"
        if not names_file.is_file():
            raise CalbenchError(f"{names_file} is missing; write one line '<class_folder> <class name>' per class")
        lines = read_classnames(names_file)
        for split in SPLITS:
            if not (self.root / "images" / split).is_dir():
                raise CalbenchError(
                    f"{self.root / 'images' / split} is missing; a dataset needs images/train and images/test"
                )
        self._skip([link for split in SPLITS for link in broken_links(self.root / "images" / split)], "class folder")
        train, test = (_class_dirs(self.root / "images" / split) for split in SPLITS)
        unnamed = [f for f in sorted(set(train) | set(test)) if f not in lines]
        if unnamed:
            raise CalbenchError(
                f"class folder(s) {', '.join(unnamed)} have no line in {names_file}; add '<folder> <class name>'"
            )
        for folder, (number, _) in lines.items():
            if folder not in train and folder not in test:
                raise CalbenchError(
                    f"{names_file}:{number} names class folder {folder!r}, which is in neither images/train nor images/test; add the folder or remove the line"
                )
        if train != test:
            only_train = ", ".join(sorted(set(train) - set(test))) or "-"
            only_test = ", ".join(sorted(set(test) - set(train))) or "-"
            raise CalbenchError(
                f"{self.root}: images/train and images/test have different class folders (only in train: {only_train}; only in test: {only_test}); both splits need the same classes"
            )
        if len(train) < 2:
            raise CalbenchError(f"{self.root / 'images' / 'train'} has {len(train)} class folder(s); need at least 2")
        self.class_folders = train
        self.classnames = [lines[f][1] for f in train]

    @property
    def n_classes(self) -> int:
        return len(self.class_folders)

    def _skip(self, skipped: list[tuple[Path, str]], what: str) -> None:
        """Warn about each unreadable entry by name; with ``strict``, refuse the first instead."""
        if skipped and self.strict:
            path, why = skipped[0]
            raise CalbenchError(
                f"cannot read {what} {path} ({why}) and {len(skipped) - 1} more; remove or replace them, or drop --strict to skip them"
            )
        for path, why in skipped:
            warn(f"skipping unreadable {what} {path} ({why})", stacklevel=4)

    def _list(self, split: str) -> list[tuple[Path, int, os.stat_result]]:
        """Every image file of a split with its label and stat, without decoding anything.

        Entries that cannot be stat-ed (broken links) or are not regular files (a folder,
        a FIFO that would block a read) are set aside as unreadable, with their reason.
        """
        if split not in self._listing:
            items, broken = [], []
            for label, folder in enumerate(self.class_folders):
                directory = self.root / "images" / split / folder
                paths = image_paths(directory)
                if not paths:
                    raise CalbenchError(
                        f"{directory} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the class"
                    )
                for path in paths:
                    try:
                        st = path.stat()
                    except OSError as exc:
                        broken.append((path, link_problem(path, exc) or "cannot be read"))
                        continue
                    if stat.S_ISREG(st.st_mode):
                        items.append((path, label, st))
                    else:
                        broken.append((path, "not a regular file"))
            self._listing[split], self._broken[split] = items, broken
        return self._listing[split]

    def fingerprint(self, split: str) -> str:
        """Identity of a split's files from names, sizes and modification times (no decoding).

        Computed once per object: a run sees the folder as it was when it started.
        The skipped-file set is a function of these files, so it needs no separate key.
        """
        if split not in self._fingerprints:
            h = hashlib.sha256()
            for path, label, st in self._list(split):
                h.update(f"{path.relative_to(self.root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            self._fingerprints[split] = h.hexdigest()[:16]
        return self._fingerprints[split]

    def _check_record(self, split: str) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(
            f"{CHECK_VERSION}|{self.root.resolve()}|{split}|{self.fingerprint(split)}".encode()
        ).hexdigest()[:24]
        return Path(self.cache_dir) / "datasets" / "checked" / f"{self.name}-{split}-{key}.json"

    def _unreadable(self, split: str) -> dict[str, str]:
        """{relative path: reason} for files of ``split`` that do not decode, from the record or by decoding."""
        if self._verified_by_prepare(split):
            return {}
        record = self._check_record(split)
        if record is not None and record.is_file():
            try:
                return dict(json.loads(record.read_text())["unreadable"])
            except (ValueError, KeyError, TypeError):
                pass  # a damaged record is rebuilt below
        paths = [path for path, _, _ in self._list(split)]
        with bomb_warnings_silenced(), ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            problems = list(pool.map(decode_problem, paths))
        bad = {str(p.relative_to(self.root)): why for p, why in zip(paths, problems) if why is not None}
        if record is not None:
            write_text_atomic(record, json.dumps({"unreadable": bad}))
        return bad

    def _verified_by_prepare(self, split: str) -> bool:
        """Whether `calbench data prepare` decoded exactly these files (same fingerprint) when it wrote them."""
        marker = self.root / "PREPARED.json"
        try:
            return marker.is_file() and json.loads(marker.read_text())["verified"][split] == self.fingerprint(split)
        except (ValueError, KeyError, TypeError):
            return False

    def files(self, split: str) -> list[tuple[Path, int]]:
        """(path, label) for every readable image of a split, in a stable sorted order."""
        if split not in self._files:
            listing = self._list(split)
            bad = self._unreadable(split)
            skipped = [
                (p, bad[str(p.relative_to(self.root))]) for p, _, _ in listing if str(p.relative_to(self.root)) in bad
            ]
            skipped = sorted(skipped + self._broken[split])
            self._skip(skipped, "image")
            kept = [(p, label) for p, label, _ in listing if str(p.relative_to(self.root)) not in bad]
            for label, folder in enumerate(self.class_folders):
                if not any(lab == label for _, lab in kept):
                    raise CalbenchError(
                        f"{self.root / 'images' / split / folder} holds no readable images; replace the broken files"
                    )
            self.skipped[split] = skipped
            self._files[split] = kept
        return self._files[split]

    def labels(self, split: str) -> np.ndarray:
        return np.array([label for _, label in self.files(split)], dtype=np.int64)

    def load_image(self, split: str, index: int) -> Image.Image:
        """Decode one image as RGB, with an error that names the file when it cannot be read."""
        path = self.files(split)[index][0]
        try:
            with Image.open(path) as image:
                problem = over_pixel_limit(image.size)
                if problem is None:
                    return to_rgb(image)
        except Image.DecompressionBombError as exc:
            problem = over_pixel_limit(exc=exc)
        except DECODE_ERRORS as exc:
            problem = str(exc)
        raise CalbenchError(f"cannot read image {path}: {problem}; it changed after the folder was checked, run again")


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float images (X-rays, DICOM) as 8-bit grey, scaled so the brightest pixel is 255; others unchanged."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        array = array - min(array.min(), 0.0)
        peak = array.max() if array.max() > 0 else 1.0
        image = Image.fromarray((array / peak * 255.0).round().astype(np.uint8))
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode (grey, palette, RGBA, CMYK, 16-bit, float) to 8-bit RGB, as every model expects."""
    image = to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def few_shot_split(
    labels: np.ndarray, shots: int, val_shots: int, seed: int, names: list[str] | None = None, fold: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint k-shot train and validation indices per class, from the train pool.

    Seeded and reproducible. The test split is never touched here: validation is
    carved out of the train pool so that nothing tuned ever sees test images.

    ``fold`` f turns the same ``shots + val_shots`` images of each class by f validation blocks:
    fold f validates on the block fold 0 trained on first, so the folds 0..(shots + val_shots) //
    val_shots - 1 validate every drawn image once (cross-validation over the labelled images, as
    `tune` scores a trial) while each still trains on ``shots`` images and never on its own validation ones.
    """
    if fold < 0 or fold >= fold_count(shots, val_shots):
        raise CalbenchError(
            f"fold {fold} does not exist: {shots} shots + {val_shots} validation shots make "
            f"{fold_count(shots, val_shots)} fold(s), numbered from 0"
        )
    rng = streams.rng("fewshot-split", seed)
    train, val = [], []
    for c in range(int(labels.max()) + 1):
        pool = np.flatnonzero(labels == c)
        need = shots + val_shots
        if len(pool) < need:
            name = names[c] if names else str(c)
            raise CalbenchError(
                f"class {name!r} has {len(pool)} training images but {shots} shots + {val_shots} validation "
                f"shots need {need}; lower --shots or add images"
            )
        pool = np.roll(rng.permutation(pool)[:need], -fold * val_shots)
        train.append(np.sort(pool[:shots]))
        val.append(np.sort(pool[shots:need]))
    return np.concatenate(train), np.concatenate(val)


def fold_count(shots: int, val_shots: int) -> int:
    """Folds of :func:`few_shot_split` whose validation blocks do not overlap: every drawn image is
    validated once when ``val_shots`` divides ``shots`` (2 folds at the default shots = val_shots)."""
    return (shots + val_shots) // val_shots
