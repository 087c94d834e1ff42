"""Corrupted copies of test images, for calibration under shift (`compare --shift`).

Five severities of each corruption, as in ImageNet-C (Hendrycks & Dietterich, ICLR 2019), whose
parameters are used where the corruption is one of theirs, plus an H&E stain jitter for
histopathology (Tellez et al., Medical Image Analysis 2019). A corruption is applied to the
image after the eval geometry (resize and centre crop, where ImageNet-C corrupts 224 px crops)
and the result is rounded to 8-bit pixels, as ImageNet-C's images are stored.

A corrupted copy is a transform kind, ``shift-<corruption>-<severity>`` (``eval`` after the
corruption) or ``shift-<corruption>-<severity>+<kind>`` (e.g. ``+score-noise0.25``: the noisy
copies a smoothed classifier predicts from, of the corrupted image), so the feature cache
encodes each (image, corruption, severity) once. Random corruptions draw once per image from a
generator seeded by (split, corruption, image) and scale that draw by the severity: a copy is the
same whenever it is made, and severity 5 is the same noise as severity 1, only stronger.
"""

from __future__ import annotations

import io
import re
import zlib
from dataclasses import dataclass

import numpy as np
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image
from scipy.ndimage import gaussian_filter

SEVERITIES = (1, 2, 3, 4, 5)
#: ImageNet-C parameters per severity 1-5: repository hendrycks/robustness,
#: ImageNet-C/imagenet_c/imagenet_c/corruptions.py (gaussian_noise line 123: noise std in [0, 1]
#: pixels; gaussian_blur line 163: std in pixels of a 224 px image; contrast line 346: factor;
#: brightness line 354: added to HSV value; jpeg_compression line 376: quality)
IMAGENET_C = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "gaussian_blur": (1.0, 2.0, 3.0, 4.0, 6.0),
    "jpeg": (25, 18, 15, 10, 7),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
}
#: H&E stain jitter: each of the haematoxylin, eosin and DAB channels becomes s * a + b with
#: a ~ U(1 - r, 1 + r), b ~ U(-r, r) (Tellez et al., MedIA 2019). Severity 3 is their "HED-light"
#: (r = 0.05) and 5 their "HED-strong" (r = 0.2); calbench halves r twice below light for 1 and 2,
#: since light already moves pale pink tissue by about a tenth of the pixel range
STAIN = (0.0125, 0.025, 0.05, 0.1, 0.2)
PARAMETERS = {**IMAGENET_C, "stain": STAIN}
CORRUPTIONS = tuple(PARAMETERS)
#: every (corruption, severity) a `--shift` run scores: what a row of shift.csv may name
CONDITIONS = frozenset((corruption, severity) for corruption in CORRUPTIONS for severity in SEVERITIES)
#: bump when a corruption's code changes, so cached features of the old version are not reused
VERSION = "1"

#: stain vectors (optical density of haematoxylin, eosin and DAB; Ruifrok & Johnston, Anal. Quant.
#: Cytol. Histol. 2001), rows in RGB, the matrix scikit-image's rgb2hed uses
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
#: darkest intensity: optical density is scaled so that 1 is this floor, as scikit-image scales it
#: (Tellez et al.'s ranges are in those units)
OD_FLOOR = 1e-6

_KIND = re.compile(rf"^shift-({'|'.join(CORRUPTIONS)})-([1-5])(?:\+(.+))?$")
#: first seed word of a corruption's draw, apart from calbench's crop (0) and noise (1) streams
CORRUPTION_STREAM = 2


@dataclass(frozen=True)
class Shift:
    """A parsed shift kind: the corruption, its severity and the transform applied after it."""

    corruption: str
    severity: int
    base: str = "eval"

    @property
    def kind(self) -> str:
        tail = "" if self.base == "eval" else f"+{self.base}"
        return f"shift-{self.corruption}-{self.severity}{tail}"

    def describe(self) -> str:
        """Stable description for the feature-cache key."""
        value = PARAMETERS[self.corruption][self.severity - 1]
        return f"shift-v{VERSION}:{self.corruption}(severity={self.severity},parameter={value!r})+uint8;seeded(split,corruption,index)"


def shift_kind(corruption: str, severity: int, base: str = "eval") -> str:
    """The transform kind of ``corruption`` at ``severity`` followed by ``base`` (eval, or a noise kind)."""
    if corruption not in CORRUPTIONS or severity not in SEVERITIES:
        raise ValueError(
            f"corruption must be one of {', '.join(CORRUPTIONS)} at severity 1-5, got {corruption} {severity}"
        )
    return Shift(corruption, severity, base).kind


def parse_shift_kind(kind: str) -> Shift | None:
    """The corruption, severity and base kind of a shift kind; None for any other kind."""
    match = _KIND.match(kind)
    if match is None:
        return None
    return Shift(match.group(1), int(match.group(2)), match.group(3) or "eval")


def _rng(split: str, corruption: str, index: int) -> np.random.Generator:
    return np.random.default_rng([CORRUPTION_STREAM, zlib.crc32(split.encode()), CORRUPTIONS.index(corruption), index])


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def _image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")


def rgb_to_hed(pixels: np.ndarray) -> np.ndarray:
    """Stain concentrations (H, E, DAB) of RGB pixels in [0, 1], by colour deconvolution."""
    density = np.log(np.maximum(pixels, OD_FLOOR)) / np.log(OD_FLOOR)
    return density @ HED_FROM_RGB


def hed_to_rgb(stains: np.ndarray) -> np.ndarray:
    """RGB pixels in [0, 1] of stain concentrations: the inverse of :func:`rgb_to_hed`."""
    return np.clip(np.exp(np.log(OD_FLOOR) * (stains @ RGB_FROM_HED)), 0.0, 1.0)


def corrupt(image: Image.Image, shift: Shift, split: str, index: int) -> Image.Image:
    """Image ``index`` of ``split`` under ``shift``'s corruption and severity, as an 8-bit RGB image."""
    c = PARAMETERS[shift.corruption][shift.severity - 1]
    if shift.corruption == "jpeg":
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=int(c))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    x = _pixels(image)
    if shift.corruption == "gaussian_noise":
        x = x + c * _rng(split, shift.corruption, index).standard_normal(x.shape)
    elif shift.corruption == "gaussian_blur":
        sigma = c * min(x.shape[:2]) / 224.0  # ImageNet-C's std is in pixels of a 224 px image
        x = gaussian_filter(x, sigma=(sigma, sigma, 0.0), mode="nearest")
    elif shift.corruption == "brightness":
        hsv = rgb_to_hsv(x)
        hsv[..., 2] = np.clip(hsv[..., 2] + c, 0.0, 1.0)
        x = hsv_to_rgb(hsv)
    elif shift.corruption == "contrast":
        mean = x.mean(axis=(0, 1), keepdims=True)
        x = (x - mean) * c + mean
    else:  # stain: one draw of (a, b) per image, scaled by the severity's range
        u = _rng(split, shift.corruption, index).uniform(-1.0, 1.0, size=(2, 3))
        x = hed_to_rgb(rgb_to_hed(x) * (1.0 + c * u[0]) + c * u[1])
    return _image(x)
