"""Procedural H&E-like tissue: the one visual world of the ``tiny`` model's pre-training corpus and
of the ``synthetic`` demo dataset.

A tile is drawn from seven attributes in [0, 1] (:data:`ATTRIBUTES`): how many nuclei, how large,
how dark, how elongated, how much fibrous stroma, how deep its pink, how much of the tile is empty
fat. Hematoxylin (nuclei) and eosin (cytoplasm, fibres) concentrations are composed as optical
densities and turned into RGB with Beer-Lambert's law, I = exp(-OD), OD = c_H h + c_E e, with
the stain vectors h, e of Ruifrok & Johnston (Anal. Quant. Cytol. Histol. 2001, Table 1); a
:class:`Stain` perturbs those vectors and the scanner (gain, blur, noise), as two hospitals differ.
:func:`caption` describes a tile's attributes in words ("dense small dark round nuclei in
pale pink fibrous stroma"), or some of them (:func:`mentions`), the vocabulary the demo's class
names are written in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: attribute order of every attribute vector
ATTRIBUTES = ("density", "size", "darkness", "elongation", "fibres", "pink", "fat")
DENSITY, SIZE, DARK, ELONG, FIBRES, PINK, FAT = range(len(ATTRIBUTES))

#: optical-density stain vectors (R, G, B) of hematoxylin and eosin (Ruifrok & Johnston 2001, Table 1)
HEMATOXYLIN = (0.650, 0.704, 0.286)
EOSIN = (0.072, 0.990, 0.105)


@dataclass(frozen=True)
class Stain:
    """A lab's staining and scanner: stain vectors, stain strengths, and the scanner's gain, blur and noise."""

    hematoxylin: tuple[float, float, float] = HEMATOXYLIN
    eosin: tuple[float, float, float] = EOSIN
    h_strength: float = 1.0
    e_strength: float = 1.0
    gain: float = 1.0  # light-source brightness: I = gain * exp(-OD)
    blur: float = 0.0  # weight of the 3x3 neighbourhood mean mixed into each pixel (scanner focus)
    noise: float = 0.02  # sensor noise (std, intensity units)

    def jittered(self, rng: np.random.Generator, amount: float) -> Stain:
        """This stain with per-tile variation (stain vectors, strengths, gain) of relative size ``amount``."""

        def vector(v: tuple[float, float, float]) -> tuple[float, float, float]:
            w = np.clip(np.asarray(v) * (1.0 + rng.normal(0.0, amount, 3)), 0.01, None)
            return tuple(float(x) for x in w / np.linalg.norm(w))

        return Stain(
            hematoxylin=vector(self.hematoxylin),
            eosin=vector(self.eosin),
            h_strength=self.h_strength * float(np.exp(rng.normal(0.0, amount))),
            e_strength=self.e_strength * float(np.exp(rng.normal(0.0, amount))),
            gain=self.gain * float(np.exp(rng.normal(0.0, amount / 2))),
            blur=self.blur,
            noise=self.noise,
        )


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency texture in about [-1, 1]: a random ``cells`` x ``cells`` grid, bilinearly upsampled."""
    grid = rng.normal(0.0, 1.0, (cells + 1, cells + 1))
    t = np.linspace(0.0, cells, size, endpoint=False)
    i, f = t.astype(int), t - t.astype(int)
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _fibres(a: np.ndarray, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, theta: float) -> np.ndarray:
    """Wavy eosin fibres roughly along ``theta``: their number and weight grow with the fibre attribute."""
    count = int(round(a[FIBRES] * 9))
    if count == 0:
        return np.zeros_like(yy)
    angles = theta + rng.normal(0.0, 0.15, count)
    offsets = rng.uniform(-0.6, 0.6, count)
    along = np.cos(angles)[:, None, None] * xx + np.sin(angles)[:, None, None] * yy
    across = -np.sin(angles)[:, None, None] * xx + np.cos(angles)[:, None, None] * yy
    wave = rng.uniform(0.01, 0.05, count)[:, None, None] * np.sin(
        rng.uniform(6.0, 16.0, count)[:, None, None] * along + rng.uniform(0, 2 * np.pi, count)[:, None, None]
    )
    width = rng.uniform(0.025, 0.045, count)[:, None, None]
    lines = np.exp(-(((across - offsets[:, None, None] - wave) / width) ** 2))
    return np.clip(lines.sum(axis=0), 0.0, 1.0) * (0.4 + 0.6 * a[FIBRES])


def _nuclei(a: np.ndarray, rng: np.random.Generator, size: int, theta: float, free: np.ndarray) -> np.ndarray:
    """Hematoxylin of the nuclei: soft ellipses whose count, radius, darkness and elongation follow ``a``.

    Each nucleus is drawn in a window around its centre only (beyond 1.4 radii its edge is below 1%).
    """
    count = int(round(3 + a[DENSITY] * 45))
    centres = rng.uniform(0.0, 1.0, (4 * count, 2))
    keep = free[(centres[:, 0] * size).astype(int), (centres[:, 1] * size).astype(int)] > 0.5
    centres = centres[keep][:count]  # nuclei sit in tissue, not in fat
    out = np.zeros(size * size)
    if len(centres) == 0:
        return out.reshape(size, size)
    n = len(centres)
    radius = (0.03 + 0.04 * a[SIZE]) * np.exp(rng.normal(0.0, 0.15, n))
    aspect = 1.0 + 2.2 * a[ELONG] * np.exp(rng.normal(0.0, 0.2, n))
    angle = theta + rng.normal(0.0, 0.25 + 1.2 * (1.0 - a[ELONG]), n)
    darkness = (0.35 + 1.1 * a[DARK]) * np.exp(rng.normal(0.0, 0.12, n))
    half = int(np.ceil(1.4 * float(np.max(radius * np.sqrt(aspect))) * size)) + 1
    offsets = np.arange(-half, half + 1)
    rows = np.floor(centres[:, 0] * size).astype(int)[:, None] + offsets  # (n, w)
    cols = np.floor(centres[:, 1] * size).astype(int)[:, None] + offsets
    dy = (rows / size - centres[:, :1])[:, :, None]
    dx = (cols / size - centres[:, 1:])[:, None, :]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = (cos * dx + sin * dy) / (radius * np.sqrt(aspect))[:, None, None]
    v = (cos * dy - sin * dx) * (np.sqrt(aspect) / radius)[:, None, None]
    blob = 0.5 - 0.5 * np.tanh(6.0 * (np.sqrt(u**2 + v**2) - 1.0))  # a logistic edge, 1 inside, 0 outside
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    index = (rows[:, :, None] * size + cols[:, None, :])[inside]
    np.maximum.at(out, index, (blob * darkness[:, None, None])[inside])
    return out.reshape(size, size)


def _fat(a: np.ndarray, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(empty-space mask, cell-membrane eosin): Voronoi adipocytes covering about ``fat`` of the tile."""
    if a[FAT] < 0.05:
        return np.zeros_like(yy), np.zeros_like(yy)
    k = 9
    centres = rng.uniform(-0.1, 1.1, (k, 2))
    d = np.sqrt((yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2)
    order = np.partition(d, 1, axis=0)  # order[0], order[1]: distances to the nearest and second-nearest centre
    nearest = np.argmin(d, axis=0)
    fat_cells = rng.random(k) < a[FAT]
    membrane = np.exp(-(((order[1] - order[0]) / 0.02) ** 2))
    inside = fat_cells[nearest] * (1.0 - membrane)
    return inside, membrane * fat_cells[nearest]


def render(a: np.ndarray, stain: Stain, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` x ``size`` RGB uint8 tile with attributes ``a`` (see :data:`ATTRIBUTES`) under ``stain``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    theta = rng.uniform(0.0, np.pi)
    empty, membrane = _fat(a, rng, yy, xx)
    free = 1.0 - empty
    eosin = (0.12 + 0.55 * a[PINK]) * (1.0 + 0.25 * _smooth_noise(rng, size, 4))
    eosin = eosin + (0.3 + 0.7 * a[PINK]) * _fibres(a, rng, yy, xx, theta) + 0.6 * membrane
    hema = 0.04 + _nuclei(a, rng, size, theta, free) * (1.0 + 0.15 * rng.normal(0.0, 1.0, (size, size)))
    eosin, hema = np.clip(eosin * free + 0.6 * membrane, 0, None), np.clip(hema * free, 0, None)
    od = stain.h_strength * hema[..., None] * np.asarray(stain.hematoxylin) + stain.e_strength * eosin[
        ..., None
    ] * np.asarray(stain.eosin)
    light = stain.gain * np.exp(-od)
    if stain.blur > 0:
        padded = np.pad(light, ((1, 1), (1, 1), (0, 0)), mode="edge")
        mean = sum(padded[i : i + size, j : j + size] for i in range(3) for j in range(3)) / 9.0
        light = (1.0 - stain.blur) * light + stain.blur * mean
    light = light + rng.normal(0.0, stain.noise, light.shape)
    return (np.clip(light, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------- words

#: (attribute, [(upper bound, word)]): the word for a value is the first whose bound it is under
WORDS: dict[int, list[tuple[float, str]]] = {
    DENSITY: [(1 / 3, "sparse"), (2 / 3, "scattered"), (2.0, "dense")],
    SIZE: [(1 / 3, "small"), (2 / 3, "medium"), (2.0, "large")],
    DARK: [(1 / 3, "pale"), (2 / 3, "purple"), (2.0, "dark")],
    ELONG: [(1 / 3, "round"), (2 / 3, "oval"), (2.0, "elongated")],
    PINK: [(1 / 3, "pale pink"), (2 / 3, "pink"), (2.0, "deep pink")],
    FIBRES: [(1 / 3, "cytoplasm"), (2 / 3, "loose stroma"), (2.0, "fibrous stroma")],
    FAT: [(0.3, ""), (2.0, "with empty fat spaces")],
}
#: the value each word is drawn around in the pre-training corpus (the middle of its range)
LEVELS: dict[int, tuple[float, ...]] = {a: (1 / 6, 1 / 2, 5 / 6) for a in (DENSITY, SIZE, DARK, ELONG, PINK, FIBRES)}


def word(attribute: int, value: float) -> str:
    return next(w for bound, w in WORDS[attribute] if value < bound)


#: how captions open, from three words to sixteen, as captions gathered from slides and papers vary in
#: their framing: the text tower learns to read a description wherever it starts, so prompts with
#: a learned context of 16 tokens (CoOp) put the class words at positions it was trained on
FRAMES = (
    "an H&E image of",
    "a histology image of",
    "an H&E stained section showing",
    "a pathology slide with",
    "this microscopy tile shows",
    "a high power field of tissue with",
    "a hematoxylin and eosin stained tissue section showing",
    "a digitised slide of human tissue, stained with H&E, showing",
    "an image patch cut from a whole slide scan of an H&E stained biopsy, with",
    "under the microscope, at high magnification, a routine H&E stained section of a tissue sample shows",
)


def mentions(a: np.ndarray, rng: np.random.Generator, keep: float = 1.0) -> np.ndarray:
    """Which attributes a caption names: each nucleus attribute, the stroma (its pink and fibres
    together) and fat spaces (only where there are some) with probability ``keep``."""
    named = np.zeros(len(ATTRIBUTES), dtype=bool)
    for attribute in (DENSITY, SIZE, DARK, ELONG):
        named[attribute] = rng.random() < keep
    named[[PINK, FIBRES]] = rng.random() < keep
    named[FAT] = bool(word(FAT, a[FAT])) and rng.random() < keep
    return named


def caption(a: np.ndarray, named: np.ndarray, frame: str = FRAMES[0]) -> str:
    """A caption opening with ``frame`` and naming the attributes ``named`` (:func:`mentions`) in words."""
    nucleus = [word(i, a[i]) for i in (DENSITY, SIZE, DARK, ELONG) if named[i]]
    parts = [" ".join([*nucleus, "nuclei"])]
    if named[PINK]:
        parts.append(f"in {word(PINK, a[PINK])} {word(FIBRES, a[FIBRES])}")
    if named[FAT]:
        parts.append(word(FAT, a[FAT]))
    return f"{frame} " + " ".join(parts) + "."
