"""MedMNIST v2 / MedMNIST+ single-label 2D sets through the ``medmnist`` package (extra ``[medmnist]``).

Each set is materialised once into calbench's folder layout (``<data home>/<name>``,
e.g. ``pathmnist_64``) so that it goes through the same loader, checks, fingerprint
and feature cache as every other dataset. Names follow the package's own files:
``pathmnist`` is the 28 px set, ``pathmnist_64`` / ``_128`` / ``_224`` the larger ones.
The official ``val`` split is not used: calbench carves its validation shots out of
``train``. Images are stored at their native size; the model's transform resizes them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from calbench.errors import CalbenchError

SIZES = (28, 64, 128, 224)
HOMEPAGE = "https://medmnist.com/"
#: flag -> (modality, prompt template); chestmnist is multi-label and out of scope
SETS: dict[str, tuple[str, str]] = {
    "pathmnist": ("histopathology", "An H&E image of {}."),
    "pneumoniamnist": ("radiology", "A chest X-ray image of {} patient"),
    "dermamnist": ("dermatoscopy", "A dermatoscopic image of {}."),
    "bloodmnist": ("microscopy", "A microscopic image of a {} blood cell."),
    "breastmnist": ("ultrasound", "A breast ultrasound image of {} tissue."),
    "octmnist": ("retinal OCT", "A retinal OCT image of {}."),
    "retinamnist": ("fundus photography", "A fundus photograph of {}."),
    "organamnist": ("abdominal CT", "An abdominal CT image of the {}."),
}
#: labels that are bare numbers in the package metadata get a readable prefix
NUMERIC_LABEL = {"retinamnist": "diabetic retinopathy grade {}"}


def set_name(flag: str, size: int) -> str:
    """The package's file stem: ``pathmnist`` for 28 px, ``pathmnist_64`` otherwise."""
    return flag if size == 28 else f"{flag}_{size}"


def parse_name(name: str) -> tuple[str, int]:
    flag, _, size = name.partition("_")
    return flag, int(size) if size else 28


def _info(flag: str) -> dict[str, Any]:
    try:
        from medmnist.info import INFO
    except ImportError:
        raise CalbenchError("MedMNIST needs the medmnist package: pip install 'calbench[medmnist]'") from None
    return INFO[flag]


def classnames(flag: str) -> list[str]:
    """Human class names in label order, from the package's INFO metadata."""
    labels = _info(flag)["label"]
    names = [labels[str(i)] for i in range(len(labels))]
    if flag in NUMERIC_LABEL:
        names = [NUMERIC_LABEL[flag].format(n) if n.isdigit() else n for n in names]
    return names


def class_folder(index: int, name: str) -> str:
    """A folder name that sorts in label order and reads well: ``03_lymphocytes``."""
    return f"{index:02d}_{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')[:40]}"


def npz_candidates(name: str, data_root: Optional[Path]) -> list[Path]:
    """Where the .npz is looked for: the data home's medmnist/ folder, then the package's default ~/.medmnist."""
    from calbench.data.registry import data_home

    return [data_home(data_root) / "medmnist" / f"{name}.npz", Path("~/.medmnist").expanduser() / f"{name}.npz"]


def download(flag: str, size: int, root: Path) -> Path:
    """Fetch the .npz with the package's own downloader; one clear line when offline."""
    _info(flag)
    import medmnist

    root.mkdir(parents=True, exist_ok=True)
    name = set_name(flag, size)
    try:
        getattr(medmnist, _info(flag)["python_class"])(split="test", download=True, root=str(root), size=size)
    except Exception:
        url = _info(flag)["url" if size == 28 else f"url_{size}"]
        raise CalbenchError(
            f"{name}.npz is not in {root} and could not be downloaded (offline?); download {url} into {root} and run again"
        ) from None
    return root / f"{name}.npz"


def materialise(name: str, npz: Path, target: Path) -> Path:
    """Write the train and test splits of ``npz`` into calbench's layout at ``target`` (resumable, atomic)."""
    from calbench.data.archive import Source
    from calbench.data.prepare import Unit, prepare_folder

    flag, _ = parse_name(name)
    names = classnames(flag)
    folders = [class_folder(i, n) for i, n in enumerate(names)]
    scratch = target.parent / f".{target.name}.arrays"
    try:
        with Source(npz) as source:
            units = []
            for split in ("train", "test"):
                missing = [k for k in (f"{split}_images.npy", f"{split}_labels.npy") if k not in source.names]
                if missing:
                    raise CalbenchError(
                        f"{npz} has no {missing[0][:-4]} array; it is not a MedMNIST .npz, delete it and run again"
                    )
                images = np.load(source.local_path(f"{split}_images.npy", scratch / split), mmap_mode="r")
                labels = np.load(source.local_path(f"{split}_labels.npy", scratch / split)).reshape(-1)
                if images.shape[0] != labels.shape[0] or labels.max(initial=0) >= len(names):
                    raise CalbenchError(
                        f"{npz}: {split} images and labels do not match {name}'s {len(names)} classes; delete it and run again"
                    )

                def unit(i: int, split: str = split, images: np.ndarray = images, labels: np.ndarray = labels) -> Unit:
                    def produce() -> Iterable[tuple[str, str, Image.Image]]:
                        yield folders[int(labels[i])], f"{split}_{i:06d}", Image.fromarray(np.asarray(images[i]))

                    return Unit(f"{split}/{i}", split, produce)

                units += [unit(i) for i in range(labels.shape[0])]
            recipe = {"dataset": name, "npz": source.describe()}
            template = SETS[flag][1]
            prepare_folder(name, target, units, list(zip(folders, names)), recipe, template, size=None)
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return target


def specs() -> list[tuple[str, Any]]:
    """Registry entries for every set and size (sizes other than 28 are listed as variants)."""
    from calbench.data.registry import DatasetSpec, data_home, is_prepared

    def spec(flag: str, size: int) -> Any:
        name = set_name(flag, size)
        modality, template = SETS[flag]

        def folder(data_root: Optional[Path]) -> Path:
            return data_home(data_root) / name

        def npz(data_root: Optional[Path]) -> Optional[Path]:
            return next((p for p in npz_candidates(name, data_root) if p.is_file()), None)

        def available(data_root: Optional[Path]) -> tuple[bool, str]:
            if is_prepared(folder(data_root)) or npz(data_root) is not None:
                return True, ""
            try:
                url = _info(flag)["url" if size == 28 else f"url_{size}"]
            except CalbenchError:
                return (
                    False,
                    f"{name} needs the medmnist package: pip install 'calbench[medmnist]' (then it downloads on first use)",
                )
            return (
                False,
                f"{name} is not downloaded; it downloads on first use when online, or put {url} into {data_home(data_root) / 'medmnist'}",
            )

        def locate(data_root: Optional[Path], cache_dir: Path) -> Path:
            if is_prepared(folder(data_root)):
                return folder(data_root)
            source = npz(data_root) or download(flag, size, data_home(data_root) / "medmnist")
            return materialise(name, source, folder(data_root))

        return DatasetSpec(
            name=name,
            modality=modality,
            template=template,
            description=f"MedMNIST {flag} at {size}x{size} px (official train/test splits)",
            locate=locate,
            available=available,
            list_classes=lambda: tuple(classnames(flag)),
            folder=folder,
            source=HOMEPAGE,
            variant_of="" if size == 28 else flag,
            in_grid=False,
        )

    return [(set_name(flag, size), spec(flag, size)) for flag in SETS for size in SIZES]
