"""The CalibPrompt paper's five datasets: what they are, where they come from, and how to prepare them.

Each ``prepare_*`` function reads the download in the shape its owners publish
(a zip, a tar or the extracted folder), checks it before writing anything, and
hands work units to :func:`calbench.data.prepare.prepare_folder`.
"""
from __future__ import annotations

import csv
import io
import tempfile
from dataclasses import dataclass
from types import ModuleType
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from calbench.data.archive import Source
from calbench.data.folder import IMAGE_SUFFIXES
from calbench.data.prepare import SIZE, PrepareReport, Unit, Unreadable, decode, default_out, prepare_folder, stratified_test_keys
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


def _recipe(name: str, sources: dict[str, Sequence[Source]], **options: object) -> dict[str, object]:
    """What determines the output: the downloads' identities and the options (for the re-run check)."""
    return {"dataset": name, "size": SIZE, "sources": {k: [s.describe() for s in v] for k, v in sources.items()}, "options": options}


def _finish(name: str, out: Optional[Path], data_root: Optional[Path], units: list[Unit], recipe: dict[str, object], log: Log) -> PrepareReport:
    entry = OFFICIAL[name]
    return prepare_folder(name, default_out(name, out, data_root), units, list(entry.classes), recipe, entry.template, log)


def _is_image(member: str) -> bool:
    return PurePosixPath(member).suffix.lower() in IMAGE_SUFFIXES


def _copy_unit(source: Source, member: str, split: str, folder: str, stem: Optional[str] = None) -> Unit:
    """A unit that copies (or resizes) one image member."""
    path = PurePosixPath(member)

    def produce() -> Iterable[tuple[str, str, tuple[bytes, str]]]:
        yield folder, stem or path.stem, (source.read(member), path.suffix)

    return Unit(f"{split}/{folder}/{member}", split, produce)


def _class_members(source: Source, folders: dict[str, str], exclude: Sequence[str] = ()) -> dict[str, list[str]]:
    """{class folder: image members} where a member's nearest class-named ancestor (case-insensitive) picks the class."""
    found: dict[str, list[str]] = {folder: [] for folder in folders.values()}
    for member in source.names:
        if not _is_image(member):
            continue
        parents = [p.lower() for p in PurePosixPath(member).parts[:-1]]
        if any(p in exclude for p in parents):
            continue
        for part in reversed(parents):
            if part in folders:
                found[folders[part]].append(member)
                break
    return found


def _require(found: dict[str, list[str]], where: Source, what: str) -> None:
    empty = [folder for folder, members in found.items() if not members]
    if empty:
        raise CalbenchError(f"{where.path} has no images in class folder(s) {', '.join(empty)}; is it the {what} download?")


def prepare_kather(train: Path, test: Path, out: Optional[Path] = None, data_root: Optional[Path] = None, log: Log = lambda m: None) -> PrepareReport:
    """Kather from NCT-CRC-HE-100K (train) and CRC-VAL-HE-7K (test): class folders ADI ... TUM, 224 px already."""
    codes = {folder.lower(): folder for folder, _ in OFFICIAL["kather"].classes}
    with Source(train) as train_src, Source(test) as test_src:
        units = []
        for split, source, what in (("train", train_src, "NCT-CRC-HE-100K"), ("test", test_src, "CRC-VAL-HE-7K")):
            found = _class_members(source, codes)
            _require(found, source, what)
            units += [_copy_unit(source, m, split, folder) for folder, members in found.items() for m in members]
        return _finish("kather", out, data_root, units, _recipe("kather", {"train": [train_src], "test": [test_src]}), log)


def prepare_covid(archive: Path, out: Optional[Path] = None, data_root: Optional[Path] = None, test_fraction: float = 0.2, seed: int = 0, log: Log = lambda m: None) -> PrepareReport:
    """COVID-19 Radiography Database: the COVID and Normal class folders (images/ inside them; masks/ ignored)."""
    with Source(archive) as source:
        found = _class_members(source, {"covid": "covid", "normal": "normal"}, exclude=("masks",))
        _require(found, source, "COVID-19 Radiography Database")
        members = [(m, folder) for folder, ms in found.items() for m in ms]
        test = stratified_test_keys([m for m, _ in members], [f for _, f in members], test_fraction, seed)
        units = [_copy_unit(source, m, "test" if m in test else "train", folder) for m, folder in members]
        recipe = _recipe("covid", {"archive": [source]}, test_fraction=test_fraction, seed=seed)
        return _finish("covid", out, data_root, units, recipe, log)


RSNA_CLASSES = {"normal": "normal", "no lung opacity / not normal": "not_normal", "lung opacity": "opacity"}


def _require_pydicom() -> ModuleType:
    try:
        import pydicom
    except ImportError:
        raise CalbenchError("reading DICOM files needs pydicom: pip install pydicom") from None
    return pydicom


def read_dicom(data: bytes, what: str) -> Image.Image:
    """A DICOM radiograph as a float image, later scaled to 8 bit (MONOCHROME1 inverted so bone is bright)."""
    pydicom = _require_pydicom()
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        pixels = dataset.pixel_array.astype(np.float64)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise Unreadable(f"{what} ({exc})") from None
    if str(getattr(dataset, "PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return Image.fromarray(pixels.astype(np.float32))


def prepare_rsna18(images: Path, labels: Path, out: Optional[Path] = None, data_root: Optional[Path] = None, test_fraction: float = 0.2, seed: int = 0, log: Log = lambda m: None) -> PrepareReport:
    """RSNA 2018: stage_2_train_images (.dcm, or .png/.jpg conversions) and stage_2_detailed_class_info.csv."""
    labels = Path(labels).expanduser()
    if not labels.is_file():
        raise CalbenchError(f"label file {labels} does not exist; give stage_2_detailed_class_info.csv from the challenge")
    with open(labels, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"patientId", "class"} <= set(rows[0]):
        raise CalbenchError(f"{labels} has no 'patientId' and 'class' columns; give stage_2_detailed_class_info.csv")
    patient_class: dict[str, str] = {}
    for number, row in enumerate(rows, start=2):
        folder = RSNA_CLASSES.get(row["class"].strip().lower())
        if folder is None:
            raise CalbenchError(f"{labels}:{number}: unknown class {row['class']!r}; expected one of {', '.join(repr(k) for k in RSNA_CLASSES)}")
        patient_class[row["patientId"]] = folder  # one patient can have several box rows, all with the same class
    with Source(images) as source:
        by_patient = {PurePosixPath(m).stem: m for m in source.names if PurePosixPath(m).suffix.lower() in IMAGE_SUFFIXES | {".dcm"}}
        matched = [p for p in sorted(patient_class) if p in by_patient]
        if not matched:
            raise CalbenchError(f"none of the {len(patient_class)} patients in {labels.name} has an image in {source.path}; give stage_2_train_images")
        if len(matched) < len(patient_class):
            log(f"{len(patient_class) - len(matched)} labelled patients have no image and are left out")
        if any(by_patient[p].lower().endswith(".dcm") for p in matched):
            _require_pydicom()  # fail before anything is written
        test = stratified_test_keys(matched, [patient_class[p] for p in matched], test_fraction, seed)

        def unit(patient: str) -> Unit:
            member, folder, split = by_patient[patient], patient_class[patient], "test" if patient in test else "train"

            def produce() -> Iterable[tuple[str, str, object]]:
                data = source.read(member)
                if member.lower().endswith(".dcm"):
                    yield folder, patient, read_dicom(data, member)
                else:
                    yield folder, patient, (data, PurePosixPath(member).suffix)

            return Unit(f"{split}/{folder}/{patient}", split, produce)

        recipe = _recipe("rsna18", {"images": [source]}, labels=str(labels.resolve()), test_fraction=test_fraction, seed=seed)
        return _finish("rsna18", out, data_root, [unit(p) for p in matched], recipe, log)


def _pannuke_fold(source: Source, scratch: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N,H,W,3), neoplastic mask (N,H,W)) of one fold, memory-mapped."""
    def member(suffix: str) -> str:
        hits = [m for m in source.names if m.lower().endswith(suffix)]
        if len(hits) != 1:
            raise CalbenchError(f"{source.path} should hold exactly one {suffix} (a PanNuke fold); found {len(hits)}")
        return hits[0]

    images_member, masks_member = member("images.npy"), member("masks.npy")
    images = np.load(source.local_path(images_member, scratch / "images"), mmap_mode="r")
    masks = np.load(source.local_path(masks_member, scratch / "masks"), mmap_mode="r")
    if images.ndim != 4 or masks.ndim != 4 or images.shape[0] != masks.shape[0]:
        raise CalbenchError(f"{source.path}: images.npy {images.shape} and masks.npy {masks.shape} do not match a PanNuke fold (N,256,256,3)/(N,256,256,6)")
    return images, masks[..., 0]


def prepare_pannuke(train: Sequence[Path], test: Sequence[Path], out: Optional[Path] = None, data_root: Optional[Path] = None, log: Log = lambda m: None) -> PrepareReport:
    """PanNuke folds: a patch is malignant when its mask has any neoplastic-nucleus pixel (channel 0), else benign."""
    if not train or not test:
        raise CalbenchError("give at least one --train fold and one --test fold (e.g. fold_1.zip fold_2.zip / fold_3.zip)")
    sources = {"train": [Source(p) for p in train], "test": [Source(p) for p in test]}
    target = default_out("pannuke", out, data_root)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # zipped folds are copied out next to the output (not to /tmp: a fold's arrays are several GB) to be memory-mapped
        with tempfile.TemporaryDirectory(prefix=".pannuke-arrays-", dir=target.parent) as scratch:
            units = []
            for split, folds in sources.items():
                for number, source in enumerate(folds):
                    images, neoplastic = _pannuke_fold(source, Path(scratch) / f"{split}{number}")
                    tag = PurePosixPath(source.path.name).stem

                    def unit(i: int, images: np.ndarray = images, neoplastic: np.ndarray = neoplastic, tag: str = tag, split: str = split) -> Unit:
                        folder = "malignant" if np.any(neoplastic[i] > 0) else "benign"

                        def produce() -> Iterable[tuple[str, str, Image.Image]]:
                            pixels = np.clip(np.asarray(images[i], dtype=np.float64), 0, 255).astype(np.uint8)
                            yield folder, f"{tag}_{i:05d}", Image.fromarray(pixels)

                        return Unit(f"{split}/{tag}/{i}", split, produce)

                    units += [unit(i) for i in range(images.shape[0])]
            return _finish("pannuke", target, data_root, units, _recipe("pannuke", sources), log)
    finally:
        for folds in sources.values():
            for source in folds:
                source.close()


def _tissue_fraction(tile: np.ndarray) -> float:
    """Share of pixels that are not bright background (grey level below 220)."""
    return float((tile.mean(axis=2) < 220).mean())


def prepare_digestpath(
    pos: Path,
    neg: Path,
    out: Optional[Path] = None,
    data_root: Optional[Path] = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    max_patches: int = 20,
    log: Log = lambda m: None,
) -> PrepareReport:
    """DigestPath 2019 tissue images, tiled into 224 px patches.

    Benign patches come from the negative images; malignant ones from the positive
    images where the lesion mask (``*_mask.jpg``) covers at least half the patch.
    Patches with less than half tissue are dropped; at most ``max_patches`` per
    image (seeded). Whole images go to train or test, so no image is in both.
    """
    with Source(pos) as pos_src, Source(neg) as neg_src:
        def images(source: Source) -> list[str]:
            return [m for m in source.names if _is_image(m) and not PurePosixPath(m).stem.lower().endswith("_mask")]

        masks = {PurePosixPath(m).stem[: -len("_mask")]: m for m in pos_src.names if PurePosixPath(m).stem.lower().endswith("_mask")}
        pos_images, neg_images = images(pos_src), images(neg_src)
        if not pos_images or not neg_images:
            raise CalbenchError(f"{pos_src.path if not pos_images else neg_src.path} holds no tissue images; give tissue-train-pos-v1 and tissue-train-neg")
        unmasked = [m for m in pos_images if PurePosixPath(m).stem not in masks]
        if unmasked:
            raise CalbenchError(f"{pos_src.path}: {unmasked[0]} has no {PurePosixPath(unmasked[0]).stem}_mask image; --pos must be tissue-train-pos-v1 with its masks")
        items = [(pos_src, m, "malignant") for m in pos_images] + [(neg_src, m, "benign") for m in neg_images]
        keys = [f"{folder}/{m}" for _, m, folder in items]
        test = stratified_test_keys(keys, [folder for _, _, folder in items], test_fraction, seed)

        def unit(source: Source, member: str, folder: str, key: str) -> Unit:
            def produce() -> Iterable[tuple[str, str, Image.Image]]:
                image = np.asarray(decode(source.read(member), member).convert("RGB"))
                lesion = None
                if folder == "malignant":
                    lesion = np.asarray(decode(source.read(masks[PurePosixPath(member).stem]), member).convert("L")) > 127
                    if lesion.shape != image.shape[:2]:
                        raise Unreadable(f"{member} (its mask is {lesion.shape[::-1]}, the image {image.shape[1::-1]})")
                corners = []
                for top in range(0, image.shape[0] - SIZE + 1, SIZE):
                    for left in range(0, image.shape[1] - SIZE + 1, SIZE):
                        tile = image[top : top + SIZE, left : left + SIZE]
                        if _tissue_fraction(tile) < 0.5:
                            continue
                        if lesion is not None and lesion[top : top + SIZE, left : left + SIZE].mean() < 0.5:
                            continue
                        corners.append((top, left))
                rng = np.random.default_rng([seed, *member.encode()])
                chosen = sorted(corners[i] for i in rng.permutation(len(corners))[:max_patches])
                stem = PurePosixPath(member).stem
                for top, left in chosen:
                    yield folder, f"{stem}_{top}_{left}", Image.fromarray(image[top : top + SIZE, left : left + SIZE])

            return Unit(key, "test" if key in test else "train", produce)

        units = [unit(source, member, folder, key) for (source, member, folder), key in zip(items, keys)]
        recipe = _recipe("digestpath", {"pos": [pos_src], "neg": [neg_src]}, test_fraction=test_fraction, seed=seed, max_patches=max_patches)
        return _finish("digestpath", out, data_root, units, recipe, log)


PREPARERS: dict[str, Callable[..., PrepareReport]] = {
    "kather": prepare_kather,
    "pannuke": prepare_pannuke,
    "digestpath": prepare_digestpath,
    "covid": prepare_covid,
    "rsna18": prepare_rsna18,
}
