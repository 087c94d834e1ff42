"""What the official preparers share: the :data:`OFFICIAL` entries table and the helpers that read downloads.

Kept apart from :mod:`calbench.data.official` (which re-exports it) so that the
per-modality preparer modules can import it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from calbench.data.archive import Source
from calbench.data.folder import IMAGE_SUFFIXES
from calbench.data.prepare import SIZE, PrepareReport, Unit, default_out, prepare_folder
from calbench.errors import CalbenchError

Log = Callable[[str], None]


@dataclass(frozen=True)
class Official:
    name: str
    modality: str
    #: (class folder, human class name) in class-index (sorted folder) order
    classes: tuple[tuple[str, str], ...]
    template: str
    description: str
    source: str
    licence: str
    prepare_hint: str


HISTO = "histopathology"
XRAY = "radiology"
XRAY_TEMPLATE = "A chest X-ray image of {} patient"

OFFICIAL: dict[str, Official] = {
    entry.name: entry
    for entry in [
        Official(
            "kather",
            HISTO,
            (
                ("ADI", "adipose tissue"),
                ("BACK", "background"),
                ("DEB", "debris"),
                ("LYM", "lymphocytes"),
                ("MUC", "mucus"),
                ("MUS", "smooth muscle"),
                ("NORM", "normal colon mucosa"),
                ("STR", "cancer-associated stroma"),
                ("TUM", "colorectal adenocarcinoma epithelium"),
            ),
            "An H&E image of {}.",
            "Kather colorectal tissue: train NCT-CRC-HE-100K, test CRC-VAL-HE-7K (224 px, 0.5 um/px)",
            "https://zenodo.org/records/1214456",
            "CC BY 4.0 (Kather, Halama, Marx 2018)",
            "calbench data prepare kather --train NCT-CRC-HE-100K.zip --test CRC-VAL-HE-7K.zip",
        ),
        Official(
            "pannuke",
            HISTO,
            (("benign", "benign"), ("malignant", "malignant")),
            "An H&E image patch of {} skin tissue.",
            "PanNuke 256 px patches of 19 tissues; malignant = contains neoplastic nuclei; train folds 1+2, test fold 3",
            "https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke",
            "CC BY-NC-SA 4.0 (Gamper et al. 2019/2020); non-commercial use only",
            "calbench data prepare pannuke --train fold_1.zip --train fold_2.zip --test fold_3.zip",
        ),
        Official(
            "digestpath",
            HISTO,
            (("benign", "benign"), ("malignant", "malignant")),
            "An H&E image patch of {} tissue.",
            "DigestPath 2019 colonoscopy tissue, tiled into 224 px patches; split by source image",
            "https://digestpath2019.grand-challenge.org/",
            "registration required; research use under the DigestPath 2019 challenge data terms",
            "calbench data prepare digestpath --pos tissue-train-pos-v1.zip --neg tissue-train-neg.zip",
        ),
        Official(
            "covid",
            XRAY,
            (("covid", "covid"), ("normal", "normal")),
            XRAY_TEMPLATE,
            "COVID-19 Radiography Database, normal and COVID classes; seeded 80/20 split",
            "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database",
            "Kaggle dataset terms; cite Chowdhury et al. 2020 and Rahman et al. 2021",
            "calbench data prepare covid --archive archive.zip",
        ),
        Official(
            "rsna18",
            XRAY,
            (("normal", "normal"), ("not_normal", "no lung opacity, not normal"), ("opacity", "lung opacity")),
            XRAY_TEMPLATE,
            "RSNA Pneumonia Detection Challenge 2018 stage 2 train images, 3 classes; seeded 80/20 split by patient",
            "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge",
            "RSNA/Kaggle competition rules: non-commercial research use, accept the rules on Kaggle first",
            "calbench data prepare rsna18 --images stage_2_train_images --labels stage_2_detailed_class_info.csv",
        ),
    ]
}


def prepare_recipe(name: str, sources: dict[str, Sequence[Source]], **options: object) -> dict[str, object]:
    """What determines the output: the downloads' identities and the options (for the re-run check)."""
    return {
        "dataset": name,
        "size": SIZE,
        "sources": {k: [s.describe() for s in v] for k, v in sources.items()},
        "options": options,
    }


def finish(
    name: str, out: Optional[Path], data_root: Optional[Path], units: list[Unit], recipe: dict[str, object], log: Log
) -> PrepareReport:
    entry = OFFICIAL[name]
    return prepare_folder(
        name, default_out(name, out, data_root), units, list(entry.classes), recipe, entry.template, log
    )


def is_image(member: str) -> bool:
    return PurePosixPath(member).suffix.lower() in IMAGE_SUFFIXES


def copy_unit(source: Source, member: str, split: str, folder: str, stem: Optional[str] = None) -> Unit:
    """A unit that copies (or resizes) one image member."""
    path = PurePosixPath(member)

    def produce() -> Iterable[tuple[str, str, tuple[bytes, str]]]:
        yield folder, stem or path.stem, (source.read(member), path.suffix)

    return Unit(f"{split}/{folder}/{member}", split, produce)


def class_members(source: Source, folders: dict[str, str], exclude: Sequence[str] = ()) -> dict[str, list[str]]:
    """{class folder: image members} where a member's nearest class-named ancestor (case-insensitive) picks the class."""
    found: dict[str, list[str]] = {folder: [] for folder in folders.values()}
    for member in source.names:
        if not is_image(member):
            continue
        parents = [p.lower() for p in PurePosixPath(member).parts[:-1]]
        if any(p in exclude for p in parents):
            continue
        for part in reversed(parents):
            if part in folders:
                found[folders[part]].append(member)
                break
    return found


def require_found(found: dict[str, list[str]], where: Source, what: str) -> None:
    empty = [folder for folder, members in found.items() if not members]
    if empty:
        raise CalbenchError(
            f"{where.path} has no images in class folder(s) {', '.join(empty)}; is it the {what} download?"
        )
