"""The built-in ``synthetic`` dataset: small images told apart by colour and texture.

Written on first use in the standard folder layout, so the demo goes through the
same loader as real data. Class colours and stripe orientations overlap on
purpose: accuracy stays well below 100% and miscalibration is visible.

It is built in a ``.synthetic-XXXX`` temp folder and renamed into place. A run
killed while building leaves that folder behind; every later call removes such
folders once none of their folders has changed for :data:`STALE_AFTER_S` seconds,
so a generator still at work in another process is never raced (no lock needed).
"""

from __future__ import annotations

import colorsys
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from calbench.data.classnames import format_line

VERSION = "1"
SIZE = 48
#: (folder, class name, hue, stripe angle in degrees)
CLASSES = [
    ("crim", "crimson striped tissue", 0.00, 0.0),
    ("ambr", "amber striped tissue", 0.06, 36.0),
    ("gold", "golden striped tissue", 0.12, 72.0),
    ("lime", "lime striped tissue", 0.18, 108.0),
    ("jade", "jade striped tissue", 0.24, 144.0),
]
PER_CLASS = {"train": 80, "test": 60}
#: a temp folder untouched this long was left by a killed run: building the set takes about a
#: second and touches a class folder with every image (calbench's choice, with a wide margin)
STALE_AFTER_S = 600.0


def _image(rng: np.random.Generator, hue: float, angle: float) -> np.ndarray:
    h = (hue + rng.normal(0.0, 0.035)) % 1.0
    base = np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.45, 0.9), rng.uniform(0.55, 1.0)))
    theta = np.deg2rad(angle + rng.normal(0.0, 22.0))
    freq = rng.uniform(2.0, 5.0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
    shade = 1.0 + rng.uniform(0.15, 0.4) * wave
    pixels = base[None, None, :] * shade[..., None] + rng.normal(0.0, 0.06, (SIZE, SIZE, 3))
    return (np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)


def _last_change(folder: Path) -> float:
    """Newest modification time of a temp folder and the folders in it that images are written to."""
    times = [folder.stat().st_mtime]
    times += [p.stat().st_mtime for p in folder.glob("images/*/*") if p.is_dir() and not p.is_symlink()]
    return max(times)


def remove_stale_temps(target: Path, now: float | None = None) -> list[Path]:
    """Remove the temp folders of ``target`` that killed runs left (unchanged for STALE_AFTER_S); return them."""
    now = time.time() if now is None else now
    removed = []
    for folder in sorted(target.parent.glob(f".{target.name}-*")):
        try:
            if folder.is_dir() and not folder.is_symlink() and now - _last_change(folder) > STALE_AFTER_S:
                shutil.rmtree(folder)
                removed.append(folder)
        except OSError:
            continue  # removed by another process meanwhile, or not ours to remove
    return removed


def write_synthetic(target: Path, seed: int = 0) -> Path:
    """Create the dataset at ``target`` (atomically: temp folder, then rename)."""
    remove_stale_temps(target)
    if (target / "VERSION").is_file() and (target / "VERSION").read_text().strip() == VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        rng = np.random.default_rng(seed)
        for split, count in PER_CLASS.items():
            for folder, _, hue, angle in CLASSES:
                out = tmp / "images" / split / folder
                out.mkdir(parents=True)
                for i in range(count):
                    Image.fromarray(_image(rng, hue, angle)).save(out / f"{folder}_{i:03d}.png")
        (tmp / "classnames.txt").write_text("".join(format_line(f, n) for f, n, _, _ in CLASSES), encoding="utf-8")
        (tmp / "VERSION").write_text(VERSION + "\n")
        if target.exists():  # an older version or a half-made folder from another tool
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "VERSION").is_file():  # another process finished first
            return target
        raise
    return target
