"""Atomic writes: files get the mode the umask gives, read with or without /proc."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from calbench import atomic

# ---------------------------------------------------------------- file modes follow the umask


def _write_each_kind(folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    atomic.write_text_atomic(folder / "report.md", "text")
    atomic.write_csv_atomic([{"a": 1.5}], folder / "results.csv", ["a"])
    atomic.save_npy_atomic(folder / "predictions.npy", np.zeros(3))
    atomic.save_safetensors_atomic(folder / "cache.safetensors", {"x": torch.zeros(2)})
    atomic.save_figure_atomic(folder / "diagram.png", plt.figure(figsize=(1, 1)))
    return [folder / n for n in ("report.md", "results.csv", "predictions.npy", "cache.safetensors", "diagram.png")]


@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("existing", [None, 0o600, 0o644])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, existing):
    """A new file, and one replacing an older file (0600 as older calbench wrote them, or 0644)."""
    if existing is not None:
        for name in ("report.md", "results.csv", "predictions.npy", "cache.safetensors", "diagram.png"):
            (tmp_path / name).write_bytes(b"old")
            os.chmod(tmp_path / name, existing)
    previous = os.umask(umask)
    try:
        written = _write_each_kind(tmp_path)
    finally:
        os.umask(previous)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(0o666 & ~umask) for p in written}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _no_proc(*args, **kwargs):
    raise OSError("no /proc here")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_umask_is_read_without_proc_too(monkeypatch, umask):
    previous = os.umask(umask)
    try:
        assert atomic.current_umask() == umask
        monkeypatch.setattr(atomic, "open", _no_proc, raising=False)
        assert atomic.current_umask() == umask
        assert os.umask(previous) == umask  # reading it left it as it was
    finally:
        os.umask(previous)
