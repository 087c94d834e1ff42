import os

import numpy as np
import pytest
from PIL import Image
from test_datasets_prepare import _png

from calbench.data import list_datasets, load_dataset
from calbench.data.folder import few_shot_split
from calbench.data.synthetic import CLASSES, PER_CLASS
from calbench.errors import CalbenchError


def test_synthetic_is_written_in_the_standard_layout(synthetic):
    root = synthetic.root
    assert (root / "classnames.txt").read_text().splitlines()[0] == "adi nuclei with empty fat spaces"
    assert (root / "template.txt").read_text().strip() == synthetic.template == "an H&E image of {}."
    assert synthetic.class_folders == sorted(f for f, *_ in CLASSES)
    assert len(synthetic.files("train")) == PER_CLASS["train"] * len(CLASSES)
    assert len(synthetic.files("test")) == PER_CLASS["test"] * len(CLASSES)
    image = synthetic.load_image("train", 0)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert "synthetic" in list_datasets()


def test_synthetic_is_deterministic(synthetic, tmp_path):
    from calbench.data.synthetic import write_synthetic

    other = write_synthetic(tmp_path / "synthetic")
    a = np.asarray(Image.open(synthetic.root / "images" / "test" / "tum" / "tum_007.png"))
    b = np.asarray(Image.open(other / "images" / "test" / "tum" / "tum_007.png"))
    assert np.array_equal(a, b)


def test_few_shot_split_is_seeded_disjoint_and_balanced():
    labels = np.repeat(np.arange(3), 20)
    train, val = few_shot_split(labels, shots=4, val_shots=5, seed=7)
    again_train, again_val = few_shot_split(labels, shots=4, val_shots=5, seed=7)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert not set(train) & set(val)
    assert np.bincount(labels[train]).tolist() == [4, 4, 4]
    assert np.bincount(labels[val]).tolist() == [5, 5, 5]
    other, _ = few_shot_split(labels, shots=4, val_shots=5, seed=8)
    assert not np.array_equal(train, other)


def test_too_few_images_names_the_class_and_the_count():
    labels = np.array([0] * 20 + [1] * 6)
    with pytest.raises(
        CalbenchError,
        match=r"class 'lymphocytes' has 6 training images but 4 shots \+ 4 validation shots need 8; lower --shots",
    ):
        few_shot_split(labels, 4, 4, 0, names=["adipose", "lymphocytes"])


def _folder(root, classes=("a", "b"), names=True):
    for split in ("train", "test"):
        for c in classes:
            (root / "images" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "images" / split / c / "x.png")
    if names:
        (root / "classnames.txt").write_text("".join(f"{c} class {c}\n" for c in classes))
    return root


def test_any_folder_in_the_layout_loads(tmp_path):
    dataset = load_dataset(str(_folder(tmp_path / "mine")), cache_dir=tmp_path)
    assert dataset.classnames == ["class a", "class b"] and dataset.labels("test").tolist() == [0, 1]


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_names", "classnames.txt is missing"),
        ("no_test", "images/test is missing"),
        ("unnamed", "class folder(s) c have no line in"),
        ("corrupt", "cannot read image"),
    ],
)
def test_broken_folders_give_one_clear_line(tmp_path, breakage, message):
    root = _folder(tmp_path / "d", names=breakage != "no_names")
    if breakage == "no_test":
        import shutil

        shutil.rmtree(root / "images" / "test")
    if breakage == "unnamed":
        (root / "images" / "train" / "c").mkdir()
    with pytest.raises(CalbenchError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        dataset = load_dataset(str(root), cache_dir=tmp_path)
        if breakage == "corrupt":  # found when the split is listed; strict makes it an error
            (root / "images" / "train" / "a" / "x.png").write_bytes(b"not a png")
            dataset.strict = True
            dataset.load_image("train", 0)
    assert "\n" not in str(info.value)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(CalbenchError, match="unknown dataset 'kather2'"):
        load_dataset("kather2", cache_dir=tmp_path)


def test_sixteen_bit_and_grey_images_become_rgb(tmp_path):
    from calbench.data.folder import to_rgb

    grey16 = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    assert grey16.mode.startswith("I;16")
    rgb = to_rgb(grey16)
    assert rgb.mode == "RGB" and np.asarray(rgb)[..., 0].max() == 255
    assert to_rgb(Image.new("LA", (4, 4))).mode == "RGB"


# ---------------------------------------------------------------- stale synthetic temp folders


def test_stale_synthetic_temp_folders_are_removed_and_fresh_ones_kept(tmp_path):
    from calbench.data.synthetic import STALE_AFTER_S, write_synthetic

    target = tmp_path / "datasets" / "synthetic"
    stale = tmp_path / "datasets" / ".synthetic-k1ll3d00"
    (stale / "images" / "train" / "crim").mkdir(parents=True)
    (stale / "images" / "train" / "crim" / "crim_000.png").write_bytes(_png())
    old = os.path.getmtime(stale) - STALE_AFTER_S - 60
    for folder in (stale, stale / "images" / "train" / "crim"):
        os.utime(folder, (old, old))
    busy = tmp_path / "datasets" / ".synthetic-busy0000"  # another process still writing: recent changes
    (busy / "images" / "train" / "crim").mkdir(parents=True)
    os.utime(busy, (old, old))  # its own mtime is old, but a class folder was just written to
    unrelated = tmp_path / "datasets" / ".other-k1ll3d00"
    unrelated.mkdir()
    os.utime(unrelated, (old, old))
    assert write_synthetic(target) == target and (target / "VERSION").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == [".other-k1ll3d00", ".synthetic-busy0000", "synthetic"]
    # an already finished dataset still cleans up after a killed generator
    stale.mkdir()
    os.utime(stale, (old, old))
    write_synthetic(target)
    assert not stale.exists()
