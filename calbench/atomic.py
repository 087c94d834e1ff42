"""Atomic file writes: every file calbench writes goes through :func:`atomic_path`.

A temp file in the target's folder is written, then renamed over the target, so readers
and interrupted runs never see half a file. The file gets the mode a plain ``open()`` of a
new file would give (0666 less the umask), also when it replaces an older file: results on
a shared cluster are as readable as the user's umask says. Heavy libraries (numpy,
safetensors, matplotlib) are imported only by the writer that needs them.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from calbench.errors import naming

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux's /proc/self/status).

    Elsewhere it is read by setting it and setting it back, to 0o077 in between: a file another
    thread creates in that instant gets fewer permissions, never more.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on a clean exit it replaces ``path``, on an error it is removed.

    ``mkstemp`` creates the temp file 0600 whatever the umask, and some writers (safetensors)
    recreate it: once written, it is given 0666 less the umask.
    """
    path = Path(path)
    with naming(path):  # a failed write to an open file names no path: name the one being written
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_csv_atomic(rows: Sequence[Mapping[str, object]], path: Path, columns: Sequence[str]) -> None:
    """Rows as CSV with a header; floats are written with ``repr`` so they read back exactly."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(path, buffer.getvalue())


def save_npy_atomic(path: Path, array: Any) -> None:
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def save_safetensors_atomic(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))


def save_figure_atomic(path: Path, figure: Any, **savefig: Any) -> None:
    """Save a matplotlib figure as PNG and close it, whatever happens."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", **savefig)
    finally:
        plt.close(figure)
