"""RSNA Pneumonia Detection Challenge 2018: three classes from the detailed class info, split by patient."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import IO, Optional, Union

import numpy as np
from PIL import Image

from calbench.data.archive import Source
from calbench.data.folder import IMAGE_SUFFIXES
from calbench.data.prepare.common import (
    Log,
    finish,
    prepare_recipe,
    renamed,
    spooled_payload,
)
from calbench.data.prepare.writer import PrepareReport, Unit, Unreadable, stratified_test_keys
from calbench.errors import CalbenchError

RSNA_CLASSES = {"normal": "normal", "no lung opacity / not normal": "not_normal", "lung opacity": "opacity"}


def _require_pydicom() -> ModuleType:
    try:
        import pydicom
    except ImportError:
        raise CalbenchError("reading DICOM files needs pydicom: pip install pydicom") from None
    return pydicom


def read_dicom(data: Union[bytes, IO[bytes]], what: str) -> Image.Image:
    """A DICOM radiograph (bytes or a binary file) as a float image, later scaled to 8 bit (MONOCHROME1 inverted so bone is bright)."""
    pydicom = _require_pydicom()
    try:
        dataset = pydicom.dcmread(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        pixels = dataset.pixel_array.astype(np.float64)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise Unreadable(f"{what} ({exc})") from None
    if str(getattr(dataset, "PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return Image.fromarray(pixels.astype(np.float32))


def _rsna_patient_classes(labels: Path) -> dict[str, str]:
    """{patientId: class folder} from stage_2_detailed_class_info.csv, checked before anything is written."""
    if not labels.is_file():
        raise CalbenchError(
            f"label file {labels} does not exist; give stage_2_detailed_class_info.csv from the challenge"
        )
    with open(labels, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"patientId", "class"} <= set(rows[0]):
        raise CalbenchError(f"{labels} has no 'patientId' and 'class' columns; give stage_2_detailed_class_info.csv")
    patient_class: dict[str, str] = {}
    for number, row in enumerate(rows, start=2):
        folder = RSNA_CLASSES.get(row["class"].strip().lower())
        if folder is None:
            raise CalbenchError(
                f"{labels}:{number}: unknown class {row['class']!r}; expected one of {', '.join(repr(k) for k in RSNA_CLASSES)}"
            )
        patient_class[row["patientId"]] = folder  # one patient can have several box rows, all with the same class
    return patient_class


def _rsna_unit(source: Source, member: str, patient: str, folder: str, split: str) -> Unit:
    """A unit for one patient's radiograph: DICOM is decoded here, PNG/JPEG conversions are copied or resized."""

    def produce() -> Iterable[tuple[str, str, object]]:
        for handle, suffix in spooled_payload(source, member):
            yield folder, patient, read_dicom(handle, member) if suffix.lower() == ".dcm" else (handle, suffix)

    return Unit(f"{split}/{folder}/{patient}", split, produce)


def prepare_rsna18(
    images: Path,
    labels: Path,
    out: Optional[Path] = None,
    data_root: Optional[Path] = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    log: Log = lambda m: None,
    strict: bool = False,
) -> PrepareReport:
    """RSNA 2018: stage_2_train_images (.dcm, or .png/.jpg conversions) and stage_2_detailed_class_info.csv."""
    labels = Path(labels).expanduser()
    patient_class = _rsna_patient_classes(labels)
    with Source(images) as source:
        by_patient = {
            PurePosixPath(m).stem: m
            for m in source.names
            if PurePosixPath(m).suffix.lower() in IMAGE_SUFFIXES | {".dcm"}
        }
        matched = [p for p in sorted(patient_class) if p in by_patient]
        if not matched:
            raise CalbenchError(
                f"none of the {len(patient_class)} patients in {labels.name} has an image in {source.path}; give stage_2_train_images"
            )
        if len(matched) < len(patient_class):
            log(f"{len(patient_class) - len(matched)} labelled patients have no image and are left out")
        if any(by_patient[p].lower().endswith(".dcm") for p in matched):
            _require_pydicom()  # fail before anything is written
        test = stratified_test_keys(matched, [patient_class[p] for p in matched], test_fraction, seed)
        changed = renamed({by_patient[p]: p for p in matched})  # patient IDs with a dot lost their last part
        recipe = prepare_recipe(
            "rsna18",
            {"images": [source]},
            changed,
            labels=str(labels.resolve()),
            test_fraction=test_fraction,
            seed=seed,
        )
        units = [
            _rsna_unit(source, by_patient[p], p, patient_class[p], "test" if p in test else "train") for p in matched
        ]
        return finish("rsna18", out, data_root, units, recipe, log, strict)
