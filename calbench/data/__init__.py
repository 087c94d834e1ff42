"""Dataset registry and :func:`load_dataset`: a registered name or any folder in the layout."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from calbench.data.folder import DEFAULT_TEMPLATE, ImageFolderDataset, few_shot_split
from calbench.errors import CalbenchError
from calbench.registry import Registry

__all__ = ["DatasetSpec", "DATASETS", "ImageFolderDataset", "few_shot_split", "availability", "list_datasets", "load_dataset"]


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


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def list_datasets() -> list[str]:
    return DATASETS.names()


def _locate_synthetic(data_root: Optional[Path], cache_dir: Path) -> Path:
    from calbench.data.synthetic import write_synthetic

    return write_synthetic(cache_dir / "datasets" / "synthetic")


DATASETS.add(
    "synthetic",
    DatasetSpec(
        name="synthetic",
        modality="demo",
        template=DEFAULT_TEMPLATE,
        description="5 classes of 48x48 colour/texture images (80 train, 60 test each), generated on first use",
        locate=_locate_synthetic,
    ),
)


def availability(name: str, data_root: Optional[Path] = None) -> tuple[bool, str]:
    """Whether dataset ``name`` is present under ``data_root``, and if not, how to get it."""
    return DATASETS.get(name).available(data_root)


def load_dataset(name_or_path: str, cache_dir: Path, data_root: Optional[Path] = None) -> ImageFolderDataset:
    """A registered dataset by name, or a folder in calbench's layout by path."""
    if name_or_path in DATASETS:
        spec = DATASETS.get(name_or_path)
        return ImageFolderDataset(spec.name, spec.locate(data_root, Path(cache_dir)), template=spec.template)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return ImageFolderDataset(path.name, path)
    raise CalbenchError(
        f"unknown dataset {name_or_path!r}: not a registered name ({', '.join(list_datasets())}) and no such folder"
    )
