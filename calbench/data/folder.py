"""The on-disk layout every calbench dataset uses.

    <root>/<name>/classnames.txt          lines "<class_folder> <class name>"
    <root>/<name>/images/{train,test}/<class_folder>/*.{png,jpg,jpeg,tif,tiff,bmp}

Class index = position of the class folder in sorted order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from calbench.errors import CalbenchError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
SPLITS = ("train", "test")
DEFAULT_TEMPLATE = "a photo of a {}."


def read_classnames(path: Path) -> dict[str, str]:
    """Parse classnames.txt into {class_folder: class name}."""
    names: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise CalbenchError(f"{path}:{number}: expected '<class_folder> <class name>', got {line.strip()!r}")
        names[parts[0]] = parts[1]
    return names


@dataclass
class ImageFolderDataset:
    """A dataset in calbench's folder layout; lists files, never decodes them up front."""

    name: str
    root: Path
    template: str = DEFAULT_TEMPLATE
    class_folders: list[str] = field(init=False)
    classnames: list[str] = field(init=False)
    _files: dict[str, list[tuple[Path, int]]] = field(init=False, default_factory=dict, repr=False)
    _fingerprints: dict[str, str] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise CalbenchError(f"dataset folder {self.root} does not exist; check --data / --data-root")
        names_file = self.root / "classnames.txt"
        if not names_file.is_file():
            raise CalbenchError(f"{names_file} is missing; write one line '<class_folder> <class name>' per class")
        names = read_classnames(names_file)
        for split in SPLITS:
            if not (self.root / "images" / split).is_dir():
                raise CalbenchError(f"{self.root / 'images' / split} is missing; a dataset needs images/train and images/test")
        folders = sorted(p.name for p in (self.root / "images" / "train").iterdir() if p.is_dir())
        unnamed = [f for f in folders if f not in names]
        if unnamed:
            raise CalbenchError(f"class folder(s) {', '.join(unnamed)} have no line in {names_file}; add '<folder> <class name>'")
        if len(folders) < 2:
            raise CalbenchError(f"{self.root / 'images' / 'train'} has {len(folders)} class folder(s); need at least 2")
        self.class_folders = folders
        self.classnames = [names[f] for f in folders]

    @property
    def n_classes(self) -> int:
        return len(self.class_folders)

    def files(self, split: str) -> list[tuple[Path, int]]:
        """(path, label) for every image of a split, in a stable sorted order."""
        if split not in self._files:
            items: list[tuple[Path, int]] = []
            for label, folder in enumerate(self.class_folders):
                directory = self.root / "images" / split / folder
                if not directory.is_dir():
                    raise CalbenchError(f"{directory} is missing; train and test need the same class folders")
                paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                if not paths:
                    raise CalbenchError(f"{directory} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
                items += [(p, label) for p in paths]
            self._files[split] = items
        return self._files[split]

    def labels(self, split: str) -> np.ndarray:
        return np.array([label for _, label in self.files(split)], dtype=np.int64)

    def fingerprint(self, split: str) -> str:
        """Identity of a split's files from names, sizes and modification times (no decoding).

        Computed once per object: a run sees the folder as it was when it started.
        """
        if split not in self._fingerprints:
            h = hashlib.sha256()
            for path, label in self.files(split):
                st = path.stat()
                h.update(f"{path.relative_to(self.root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            self._fingerprints[split] = h.hexdigest()[:16]
        return self._fingerprints[split]

    def load_image(self, split: str, index: int) -> Image.Image:
        """Decode one image as RGB, with an error that names the file when it cannot be read."""
        path = self.files(split)[index][0]
        try:
            with Image.open(path) as image:
                return to_rgb(image)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise CalbenchError(f"cannot read image {path}: {exc}; remove or replace the file") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode (grey, RGBA, 16-bit) to 8-bit RGB, scaling 16-bit range down."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.max() > 0 else 1.0
        image = Image.fromarray((array / peak * 255.0).astype(np.uint8))
    return image.convert("RGB")


def few_shot_split(labels: np.ndarray, shots: int, val_shots: int, seed: int, names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint k-shot train and validation indices per class, from the train pool.

    Seeded and reproducible. The test split is never touched here: validation is
    carved out of the train pool so that nothing tuned ever sees test images.
    """
    rng = np.random.default_rng(seed)
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
        pool = rng.permutation(pool)
        train.append(np.sort(pool[:shots]))
        val.append(np.sort(pool[shots:need]))
    return np.concatenate(train), np.concatenate(val)
