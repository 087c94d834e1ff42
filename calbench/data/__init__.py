"""Dataset registry and :func:`load_dataset`: a registered name or any folder in the layout.

Registered datasets live in the *data home*: ``--data-root``, else ``$CALBENCH_DATA``,
else the user data folder (e.g. ~/.local/share/calbench), one sub-folder per name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from calbench.data.folder import DEFAULT_TEMPLATE, ImageFolderDataset, few_shot_split, fold_count
from calbench.data.registry import DATASETS, DatasetSpec, data_home, is_prepared, list_datasets, present_counts
from calbench.errors import CalbenchError

__all__ = [
    "DatasetSpec",
    "DATASETS",
    "ImageFolderDataset",
    "few_shot_split",
    "fold_count",
    "availability",
    "check_dataset",
    "classes_of",
    "data_home",
    "is_prepared",
    "list_datasets",
    "load_dataset",
    "present_counts",
]


def _locate_synthetic(data_root: Optional[Path], cache_dir: Path) -> Path:
    from calbench.data.synthetic import write_synthetic

    return write_synthetic(cache_dir / "datasets" / "synthetic")


def _register_synthetic() -> None:
    from calbench.data.synthetic import CLASSNAMES, DESCRIPTION, TEMPLATE

    DATASETS.add(
        "synthetic",
        DatasetSpec(
            name="synthetic",
            modality="demo",
            template=TEMPLATE,
            description=DESCRIPTION,
            locate=_locate_synthetic,
            classes=CLASSNAMES,
        ),
    )


def _register_official() -> None:
    """The CalibPrompt paper's five datasets, prepared from their official downloads."""
    from calbench.data.prepare import OFFICIAL, Official

    def spec(entry: Official) -> DatasetSpec:
        def folder(data_root: Optional[Path]) -> Path:
            return data_home(data_root) / entry.name

        def available(data_root: Optional[Path]) -> tuple[bool, str]:
            if is_prepared(folder(data_root)):
                return True, ""
            root_option = f" --data-root {data_root}" if data_root is not None else ""
            return (
                False,
                f"{entry.name} is not in {folder(data_root)}; download it from {entry.source} and run: {entry.prepare_hint}{root_option}",
            )

        def locate(data_root: Optional[Path], cache_dir: Path) -> Path:
            ok, hint = available(data_root)
            if not ok and not folder(data_root).exists():
                raise CalbenchError(hint)
            return folder(data_root)

        return DatasetSpec(
            name=entry.name,
            modality=entry.modality,
            template=entry.template,
            description=entry.description,
            locate=locate,
            available=available,
            classes=tuple(name for _, name in entry.classes),
            folder=folder,
            source=entry.source,
        )

    for entry in OFFICIAL.values():
        DATASETS.add(entry.name, spec(entry))


def _register_medmnist() -> None:
    from calbench.data import medmnist_data

    for name, spec in medmnist_data.specs():
        DATASETS.add(name, spec)


_register_synthetic()
_register_official()
_register_medmnist()


def classes_of(name: str) -> tuple[str, ...]:
    """Human class names of a registered dataset, without loading it."""
    spec = DATASETS.get(name)
    return spec.list_classes() if spec.list_classes is not None else spec.classes


def availability(name: str, data_root: Optional[Path] = None) -> tuple[bool, str]:
    """Whether dataset ``name`` is present under ``data_root``, and if not, how to get it."""
    return DATASETS.get(name).available(data_root)


@dataclass
class DatasetCheck:
    """What `calbench datasets check` reports: images per class and split, and skipped files."""

    dataset: ImageFolderDataset
    counts: dict[str, dict[str, int]]
    skipped: dict[str, list[tuple[Path, str]]]


def check_dataset(
    name_or_path: str,
    cache_dir: Path,
    data_root: Optional[Path] = None,
    strict: bool = False,
    shots: Optional[int] = None,
    val_shots: Optional[int] = None,
) -> DatasetCheck:
    """Validate a dataset without training: layout, every image decodes, and (if given) enough images for the shots."""
    dataset = load_dataset(name_or_path, cache_dir, data_root, strict=strict)
    counts = {}
    for split in ("train", "test"):
        labels = dataset.labels(split)
        counts[split] = {name: int((labels == c).sum()) for c, name in enumerate(dataset.classnames)}
    if shots is not None:
        few_shot_split(dataset.labels("train"), shots, shots if val_shots is None else val_shots, 0, dataset.classnames)
    return DatasetCheck(dataset, counts, dict(dataset.skipped))


def _read_template(path: Path) -> str:
    """The prompt template of a folder (template.txt, written by `calbench data prepare`), UTF-8 with or without a BOM."""
    if not path.is_file():
        return DEFAULT_TEMPLATE
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        raise CalbenchError(f"{path} must be UTF-8 text: save it as UTF-8 and run again") from None


def load_dataset(
    name_or_path: str, cache_dir: Path, data_root: Optional[Path] = None, strict: bool = False
) -> ImageFolderDataset:
    """A registered dataset by name, or a folder in calbench's layout by path.

    ``strict`` makes an unreadable image an error instead of a skipped file with a warning.
    """
    if name_or_path in DATASETS:
        spec = DATASETS.get(name_or_path)
        root = spec.locate(data_root, Path(cache_dir))
        return ImageFolderDataset(spec.name, root, template=spec.template, cache_dir=Path(cache_dir), strict=strict)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        template = _read_template(path / "template.txt")
        return ImageFolderDataset(
            path.name, path, template=template or DEFAULT_TEMPLATE, cache_dir=Path(cache_dir), strict=strict
        )
    if any(sep in name_or_path for sep in ("/", os.sep)) or name_or_path.startswith((".", "~")):
        raise CalbenchError(
            f"unknown dataset {name_or_path!r}: no such folder; check the path (registered names: `calbench datasets`)"
        )
    names = [n for n in list_datasets() if not DATASETS.get(n).variant_of]
    raise CalbenchError(
        f"unknown dataset {name_or_path!r}: not a registered name ({', '.join(names)}; MedMNIST also as NAME_64/_128/_224) and no such folder"
    )
