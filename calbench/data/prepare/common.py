"""What the official preparers share: the :data:`OFFICIAL` table of the five datasets (classes, prompt,
source, licence, the command that prepares each) and the helpers that read downloads."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Optional

from calbench.data.archive import Source
from calbench.data.folder import IMAGE_SUFFIXES
from calbench.data.prepare.writer import SIZE, PrepareReport, Unit, default_out, prepare_folder
from calbench.errors import CalbenchError
from calbench.published import template as published_template

Log = Callable[[str], None]


@dataclass(frozen=True)
class Official:
    name: str
    modality: str
    #: (class folder, human class name) in class-index (sorted folder) order
    classes: tuple[tuple[str, str], ...]
    template: str  # the published hand prompt (the one table, :func:`calbench.published.template`)
    description: str
    source: str
    licence: str
    prepare_hint: str


HISTO = "histopathology"
XRAY = "radiology"

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
            published_template("kather").value,
            "Kather colorectal tissue: train NCT-CRC-HE-100K, test CRC-VAL-HE-7K (224 px, 0.5 um/px)",
            "https://zenodo.org/records/1214456",
            "CC BY 4.0 (Kather, Halama, Marx 2018)",
            "calbench data prepare kather --train NCT-CRC-HE-100K.zip --test CRC-VAL-HE-7K.zip",
        ),
        Official(
            "pannuke",
            HISTO,
            (("benign", "benign"), ("malignant", "malignant")),
            published_template("pannuke").value,
            "PanNuke 256 px patches of 19 tissues; malignant = contains neoplastic nuclei; train folds 1+2, test fold 3",
            "https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke",
            "CC BY-NC-SA 4.0 (Gamper et al. 2019/2020); non-commercial use only",
            "calbench data prepare pannuke --train fold_1.zip --train fold_2.zip --test fold_3.zip",
        ),
        Official(
            "digestpath",
            HISTO,
            (("benign", "benign"), ("malignant", "malignant")),
            published_template("digestpath").value,
            "DigestPath 2019 colonoscopy tissue, tiled into 224 px patches; split by source image",
            "https://digestpath2019.grand-challenge.org/",
            "registration required; research use under the DigestPath 2019 challenge data terms",
            "calbench data prepare digestpath --pos tissue-train-pos-v1.zip --neg tissue-train-neg.zip",
        ),
        Official(
            "covid",
            XRAY,
            (("covid", "covid"), ("normal", "normal")),
            published_template("covid").value,
            "COVID-19 Radiography Database, normal and COVID classes; seeded 80/20 split",
            "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database",
            "Kaggle dataset terms; cite Chowdhury et al. 2020 and Rahman et al. 2021",
            "calbench data prepare covid --archive archive.zip",
        ),
        Official(
            "rsna18",
            XRAY,
            (("normal", "normal"), ("not_normal", "no lung opacity, not normal"), ("opacity", "lung opacity")),
            published_template("rsna18").value,
            "RSNA Pneumonia Detection Challenge 2018 stage 2 train images, 3 classes; seeded 80/20 split by patient",
            "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge",
            "RSNA/Kaggle competition rules: non-commercial research use, accept the rules on Kaggle first",
            "calbench data prepare rsna18 --images stage_2_train_images --labels stage_2_detailed_class_info.csv",
        ),
    ]
}


def prepare_recipe(
    name: str, sources: dict[str, Sequence[Source]], renamed: int = 0, **options: object
) -> dict[str, object]:
    """What determines the output: the downloads' identities and the options (for the re-run check).

    ``renamed`` counts the images whose output name differs from the file name alone, which
    is how calbench named them before (see :func:`output_stems`); it is recorded only when
    not 0, so a folder an older calbench prepared from the same downloads is reused exactly
    when no name changed, and is refused, with what to do, when one did.
    """
    recipe: dict[str, object] = {
        "dataset": name,
        "size": SIZE,
        "sources": {k: [s.describe() for s in v] for k, v in sources.items()},
        "options": options,
    }
    if renamed:
        recipe["renamed"] = renamed
    return recipe


#: a file name of at most this many bytes (with the suffix) fits every common file system's 255
MAX_STEM_BYTES = 200


def _stem_candidate(member: str, level: int) -> str:
    """Output stem of ``member`` at disambiguation ``level``: 0 the file stem, k its k nearest folders joined
    with ``__`` in front, past its depth the suffix too; a name too long becomes its start and a hash."""
    path = PurePosixPath(member)
    folders = path.parts[:-1]
    name = "__".join((*folders[len(folders) - min(level, len(folders)) :], path.stem))
    if level > len(folders):
        name += "_" + path.suffix.lstrip(".")
    if len(name.encode()) > MAX_STEM_BYTES:
        name = path.stem[:80] + "_" + hashlib.sha1(member.encode()).hexdigest()[:12]
    return name


def output_stems(members: Sequence[str]) -> dict[str, str]:
    """A distinct output file stem (ignoring case) for each member that goes into one class folder.

    A member keeps its file stem when no other has it; where several share one, the nearest
    folders that tell them apart are put in front (``NCT-CRC-HE-100K__ADI__ADI-0001``), so
    same-named files in different folders never overwrite each other.
    """
    stems: dict[str, str] = {}
    taken: set[str] = set()
    pending = sorted(set(members))
    depth = max((len(PurePosixPath(m).parts) for m in pending), default=0)
    for level in range(depth + 1):
        names = {m: _stem_candidate(m, level) for m in pending}
        counts = Counter(name.lower() for name in names.values())
        for member in pending:
            name = names[member]
            if counts[name.lower()] == 1 and name.lower() not in taken:
                stems[member] = name
                taken.add(name.lower())
        pending = [m for m in pending if m not in stems]
    for member in pending:  # names that differ only in case: made distinct by a hash of the full path
        stems[member] = f"{_stem_candidate(member, depth)}_{hashlib.sha1(member.encode()).hexdigest()[:8]}"
    return stems


def renamed(stems: dict[str, str]) -> int:
    """How many members :func:`output_stems` names otherwise than calbench did before: by the file stem
    alone, whose last dotted part the output suffix replaced (``img.1.png`` became ``img.png``)."""
    return sum(stem != PurePosixPath(m).stem or "." in PurePosixPath(m).stem for m, stem in stems.items())


def spooled_payload(source: Source, member: str) -> Iterator[tuple[IO[bytes], str]]:
    """The member streamed (see :meth:`Source.spooled`) with its suffix, open while the consumer writes it."""
    with source.spooled(member) as handle:
        yield handle, PurePosixPath(member).suffix


def finish(
    name: str,
    out: Optional[Path],
    data_root: Optional[Path],
    units: list[Unit],
    recipe: dict[str, object],
    log: Log,
    strict: bool = False,
) -> PrepareReport:
    """Write a paper dataset's units into its folder with its classes and prompt template."""
    entry = OFFICIAL[name]
    out = default_out(name, out, data_root)
    return prepare_folder(name, out, units, list(entry.classes), recipe, entry.template, log, strict=strict)


def is_image(member: str) -> bool:
    return PurePosixPath(member).suffix.lower() in IMAGE_SUFFIXES


def copy_unit(source: Source, member: str, split: str, folder: str, stem: Optional[str] = None) -> Unit:
    """A unit that copies (or resizes) one image member, streamed; ``stem`` names the output (see :func:`output_stems`)."""
    path = PurePosixPath(member)

    def produce() -> Iterable[tuple[str, str, tuple[IO[bytes], str]]]:
        for payload in spooled_payload(source, member):
            yield folder, stem or path.stem, payload

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
