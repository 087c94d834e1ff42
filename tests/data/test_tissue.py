"""The synthetic tissue world (calbench.tissue) and the demo dataset drawn from it: captions in words,
Beer-Lambert stain colours, seeded tiles, and the stain shift between the two hospitals."""

import numpy as np
import pytest

from calbench.data.synthetic import CLASSES, HOSPITALS, tile
from calbench.tissue import (
    DARK,
    DENSITY,
    ELONG,
    EOSIN,
    FAT,
    FIBRES,
    FRAMES,
    HEMATOXYLIN,
    PINK,
    SIZE,
    Stain,
    caption,
    mentions,
    render,
)


def _attributes(**values: float) -> np.ndarray:
    a = np.full(7, 0.5)
    a[FAT] = 0.0
    for index, value in values.items():
        a[{"density": DENSITY, "size": SIZE, "dark": DARK, "elong": ELONG, "fibres": FIBRES, "pink": PINK}[index]] = (
            value
        )
    return a


def test_captions_name_the_attributes_they_mention_in_words():
    a = _attributes(density=0.9, size=0.1, dark=0.9, elong=0.1, fibres=0.9, pink=0.1)
    every = mentions(a, np.random.default_rng(0))
    assert every.tolist() == [True] * 6 + [False]  # no fat spaces to mention
    assert caption(a, every) == "an H&E image of dense small dark round nuclei in pale pink fibrous stroma."
    a[FAT] = 0.7
    assert caption(a, mentions(a, np.random.default_rng(0))).endswith("fibrous stroma with empty fat spaces.")
    assert caption(a, mentions(a, np.random.default_rng(0), keep=0.0), FRAMES[3]) == "a pathology slide with nuclei."


def test_an_empty_tile_is_the_light_source_and_stains_follow_beer_lambert():
    """No stain: I = gain. Eosin only: I = exp(-c e) per channel (Ruifrok & Johnston's vectors)."""
    clean = Stain(noise=0.0)
    empty = _attributes(density=0.0, pink=0.0, fibres=0.0)
    pixels = render(empty, clean, 16, np.random.default_rng(0)).astype(float) / 255
    # background eosin is 0.12 (pink 0) with low-frequency texture and 0.04 hematoxylin; nuclei are few
    od = -np.log(np.median(pixels.reshape(-1, 3), axis=0))
    expected = 0.12 * np.asarray(EOSIN) + 0.04 * np.asarray(HEMATOXYLIN)
    np.testing.assert_allclose(od, expected, atol=0.03)


def test_tiles_are_seeded_and_each_split_has_its_hospitals_stain():
    assert np.array_equal(tile("test", 2, 5), tile("test", 2, 5))
    assert not np.array_equal(tile("train", 2, 5), tile("test", 2, 5))
    train = np.mean([tile("train", c, i).mean(axis=(0, 1)) for c in range(len(CLASSES)) for i in range(20)], axis=0)
    test = np.mean([tile("test", c, i).mean(axis=(0, 1)) for c in range(len(CLASSES)) for i in range(20)], axis=0)
    assert HOSPITALS["train"] != HOSPITALS["test"]
    assert 3 < np.abs(test - train).max() < 20  # a mild shift: a few grey levels on average, not another stain


@pytest.mark.parametrize("amount", [0.0, 0.1])
def test_jittered_stain_vectors_stay_unit_length(amount):
    stain = Stain().jittered(np.random.default_rng(3), amount)
    assert np.linalg.norm(stain.hematoxylin) == pytest.approx(1.0)
    assert np.linalg.norm(stain.eosin) == pytest.approx(1.0)
    if amount == 0.0:
        assert stain.h_strength == 1.0 and stain.gain == 1.0
