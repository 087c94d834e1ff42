"""COVID-19 Radiography Database: the normal and COVID classes, a seeded 80/20 split."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from calbench.data.archive import Source
from calbench.data.prepare.common import (
    Log,
    class_members,
    copy_unit,
    finish,
    output_stems,
    prepare_recipe,
    renamed,
    require_found,
)
from calbench.data.prepare.writer import PrepareReport, stratified_test_keys


def prepare_covid(
    archive: Path,
    out: Optional[Path] = None,
    data_root: Optional[Path] = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    log: Log = lambda m: None,
    strict: bool = False,
) -> PrepareReport:
    """COVID-19 Radiography Database: the COVID and Normal class folders (images/ inside them; masks/ ignored)."""
    with Source(archive) as source:
        found = class_members(source, {"covid": "covid", "normal": "normal"}, exclude=("masks",))
        require_found(found, source, "COVID-19 Radiography Database")
        members = [(m, folder) for folder, ms in found.items() for m in ms]
        test = stratified_test_keys([m for m, _ in members], [f for _, f in members], test_fraction, seed)
        stems = {folder: output_stems(ms) for folder, ms in found.items()}  # by class, whatever the split
        units = [copy_unit(source, m, "test" if m in test else "train", f, stems[f][m]) for m, f in members]
        changed = sum(renamed(s) for s in stems.values())
        recipe = prepare_recipe("covid", {"archive": [source]}, changed, test_fraction=test_fraction, seed=seed)
        return finish("covid", out, data_root, units, recipe, log, strict)
