"""The dataset registry and the data home, apart from the registrations so that every
dataset module can import them (``calbench.data`` registers the datasets and loads them)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from calbench.data.folder import count_images
from calbench.registry import Registry


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    modality: str
    template: str
    description: str
    #: (data_root, cache_dir) -> the dataset's folder, creating it if it is built in
    locate: Callable[[Optional[Path], Path], Path]
    #: (data_root) -> (present?, the command or source that provides it when not)
    available: Callable[[Optional[Path]], tuple[bool, str]] = lambda data_root: (True, "")
    #: human class names, in class-index order
    classes: tuple[str, ...] = ()
    #: the class names when they come from elsewhere (e.g. a package's metadata), read only when asked
    list_classes: Optional[Callable[[], tuple[str, ...]]] = None
    #: (data_root) -> the folder it is looked for in, without creating anything (None: built in the cache)
    folder: Optional[Callable[[Optional[Path]], Path]] = None
    #: the official download page
    source: str = ""
    #: name of the entry this one is a size variant of (MedMNIST), for compact listings
    variant_of: str = ""
    #: part of the paper's grid that `compare --all` runs (MedMNIST is not)
    in_grid: bool = True


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def list_datasets() -> list[str]:
    return DATASETS.names()


def data_home(data_root: Optional[Path] = None) -> Path:
    """Folder of the registered datasets: ``data_root``, else $CALBENCH_DATA, else the user data folder."""
    if data_root is not None:
        return Path(data_root).expanduser()
    env = os.environ.get("CALBENCH_DATA")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("calbench"))


def is_prepared(folder: Path) -> bool:
    """Whether ``folder`` looks like a dataset (classnames.txt, images/train, images/test); no deep checks."""
    return (folder / "classnames.txt").is_file() and all((folder / "images" / s).is_dir() for s in ("train", "test"))


def present_counts(folder: Path) -> dict[str, int]:
    """Images per split of a dataset folder, by listing only; empty when absent."""
    return count_images(folder) if is_prepared(folder) else {}
