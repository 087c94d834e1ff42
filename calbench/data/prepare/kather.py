"""Kather colorectal tissue (NCT-CRC-HE-100K / CRC-VAL-HE-7K): prepared from the published zips or folders."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from calbench.data.archive import Source
from calbench.data.prepare.common import (
    OFFICIAL,
    Log,
    class_members,
    copy_unit,
    finish,
    output_stems,
    prepare_recipe,
    renamed,
    require_found,
)
from calbench.data.prepare.writer import (
    PrepareReport,
)


def prepare_kather(
    train: Path,
    test: Path,
    out: Optional[Path] = None,
    data_root: Optional[Path] = None,
    log: Log = lambda m: None,
    strict: bool = False,
) -> PrepareReport:
    """Kather from NCT-CRC-HE-100K (train) and CRC-VAL-HE-7K (test): class folders ADI ... TUM, 224 px already."""
    codes = {folder.lower(): folder for folder, _ in OFFICIAL["kather"].classes}
    with Source(train) as train_src, Source(test) as test_src:
        units, changed = [], 0
        for split, source, what in (("train", train_src, "NCT-CRC-HE-100K"), ("test", test_src, "CRC-VAL-HE-7K")):
            found = class_members(source, codes)
            require_found(found, source, what)
            for folder, members in found.items():
                stems = output_stems(members)
                changed += renamed(stems)
                units += [copy_unit(source, m, split, folder, stems[m]) for m in members]
        recipe = prepare_recipe("kather", {"train": [train_src], "test": [test_src]}, renamed=changed)
        return finish("kather", out, data_root, units, recipe, log, strict)
