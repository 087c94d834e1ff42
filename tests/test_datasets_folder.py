"""Every way a dataset folder can be wrong gives one exact line; fingerprints, corrupt files and image modes."""

import os
import re
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from calbench.data import check_dataset, load_dataset
from calbench.data.folder import ImageFolderDataset, to_rgb
from calbench.errors import CalbenchError


def make_folder(root, classes=("a", "b"), per_class=3, size=8):
    """A valid dataset folder: ``per_class`` distinct PNGs per class and split."""
    for split in ("train", "test"):
        for c in classes:
            (root / "images" / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (10 * i, 20, 30)).save(root / "images" / split / c / f"{c}{i}.png")
    (root / "classnames.txt").write_text("".join(f"{c} class {c}\n" for c in classes))
    return root


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _break(root, case):
    images = root / "images"
    if case == "missing root":
        shutil.rmtree(root)
    elif case == "missing train":
        shutil.rmtree(images / "train")
    elif case == "missing test":
        shutil.rmtree(images / "test")
    elif case == "no classnames":
        (root / "classnames.txt").unlink()
    elif case == "unnamed folder":
        (root / "classnames.txt").write_text("a class a\n")
    elif case == "line names no folder":
        (root / "classnames.txt").write_text("a class a\nb class b\nc class c\n")
    elif case == "bad line":
        (root / "classnames.txt").write_text("a class a\nb\n")
    elif case == "duplicate line":
        (root / "classnames.txt").write_text("a class a\nb class b\na again\n")
    elif case == "splits differ":
        shutil.rmtree(images / "test" / "b")
        (images / "test" / "c").mkdir()
        (root / "classnames.txt").write_text("a class a\nb class b\nc class c\n")
    elif case == "one class":
        for split in ("train", "test"):
            shutil.rmtree(images / split / "b")
        (root / "classnames.txt").write_text("a class a\n")
    elif case == "empty class":
        for p in (images / "test" / "b").iterdir():
            p.unlink()
    elif case == "all corrupt":
        for p in (images / "train" / "a").iterdir():
            p.write_bytes(b"")


CASES = [
    (
        "missing root",
        "unknown dataset '{root}': no such folder; check the path (registered names: `calbench datasets`)",
    ),
    ("missing train", "{root}/images/train is missing; a dataset needs images/train and images/test"),
    ("missing test", "{root}/images/test is missing; a dataset needs images/train and images/test"),
    ("no classnames", "{root}/classnames.txt is missing; write one line '<class_folder> <class name>' per class"),
    ("unnamed folder", "class folder(s) b have no line in {root}/classnames.txt; add '<folder> <class name>'"),
    (
        "line names no folder",
        "{root}/classnames.txt:3 names class folder 'c', which is in neither images/train nor images/test; add the folder or remove the line",
    ),
    (
        "bad line",
        "{root}/classnames.txt:2: expected '<class_folder> <class name>' (a folder with spaces: "
        "'\"<class folder>\" <class name>' or a tab between them), got 'b'",
    ),
    (
        "duplicate line",
        "{root}/classnames.txt:3: class folder 'a' is already named on line 1; keep one line per folder",
    ),
    (
        "splits differ",
        "{root}: images/train and images/test have different class folders (only in train: b; only in test: c); both splits need the same classes",
    ),
    ("one class", "{root}/images/train has 1 class folder(s); need at least 2"),
    (
        "empty class",
        "{root}/images/test/b holds no images (.bmp, .jpeg, .jpg, .png, .tif, .tiff); add images or remove the class",
    ),
    ("all corrupt", "{root}/images/train/a holds no readable images; replace the broken files"),
]


@pytest.mark.parametrize("case, message", CASES, ids=[c for c, _ in CASES])
def test_each_broken_folder_gives_its_exact_line_and_writes_nothing(tmp_path, case, message):
    root = make_folder(tmp_path / "d")
    _break(root, case)
    before = _listing(tmp_path)
    with pytest.raises(CalbenchError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_dataset(str(root), cache_dir=tmp_path / "cache")
    assert str(info.value) == message.format(root=root)
    assert "\n" not in str(info.value)
    after = [p for p in _listing(tmp_path) if not p.startswith("cache")]
    assert after == before  # nothing written into the dataset folder or next to it


def test_missing_root_by_direct_construction(tmp_path):
    with pytest.raises(CalbenchError, match=re.escape(f"dataset folder {tmp_path / 'none'} does not exist")):
        ImageFolderDataset("x", tmp_path / "none")


def test_fewer_images_than_shots_names_the_class(tmp_path):
    root = make_folder(tmp_path / "d", per_class=3)
    with pytest.raises(CalbenchError) as info:
        check_dataset(str(root), tmp_path / "cache", shots=2, val_shots=2)
    assert (
        str(info.value)
        == "class 'class a' has 3 training images but 2 shots + 2 validation shots need 4; lower --shots or add images"
    )
    assert check_dataset(str(root), tmp_path / "cache", shots=2, val_shots=1).counts == {
        "train": {"class a": 3, "class b": 3},
        "test": {"class a": 3, "class b": 3},
    }


def test_corrupt_image_is_skipped_with_a_warning_naming_it_and_indices_stay_consistent(tmp_path):
    root = make_folder(tmp_path / "d", per_class=3)
    bad = root / "images" / "train" / "a" / "a1.png"
    bad.write_bytes(b"not a png")
    truncated = root / "images" / "train" / "b" / "b2.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.warns(UserWarning) as caught:
        dataset = load_dataset(str(root), cache_dir=tmp_path / "cache")
        files = dataset.files("train")
    messages = sorted(str(w.message) for w in caught)
    assert messages[0].startswith(f"skipping unreadable image {bad} (cannot identify image file")
    assert messages[1].startswith(f"skipping unreadable image {truncated} (")
    assert [p.name for p, _ in files] == ["a0.png", "a2.png", "b0.png", "b1.png"]
    assert dataset.labels("train").tolist() == [0, 0, 1, 1]
    assert [p.name for p, _ in dataset.skipped["train"]] == ["a1.png", "b2.png"]
    assert dataset.load_image("train", 1).getpixel((0, 0)) == (20, 20, 30)  # a2.png, not the broken a1.png
    # the check is remembered in the cache: a second object does not decode again, same indices
    records = list((tmp_path / "cache" / "datasets" / "checked").glob("d-train-*.json"))
    assert len(records) == 1
    with pytest.warns(UserWarning):
        again = load_dataset(str(root), cache_dir=tmp_path / "cache")
        assert [p.name for p, _ in again.files("train")] == ["a0.png", "a2.png", "b0.png", "b1.png"]


def test_corrupt_image_with_strict_is_an_error(tmp_path):
    root = make_folder(tmp_path / "d")
    bad = root / "images" / "test" / "b" / "b0.png"
    bad.write_bytes(b"\x89PNG garbage")
    dataset = load_dataset(str(root), cache_dir=tmp_path / "cache", strict=True)
    with pytest.raises(CalbenchError) as info:
        dataset.files("test")
    assert re.fullmatch(
        re.escape(f"cannot read image {bad} (")
        + r".+"
        + re.escape(") and 0 more; remove or replace them, or drop --strict to skip them"),
        str(info.value),
    )


def test_fingerprint_follows_names_sizes_and_mtimes_without_decoding(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d")

    def fingerprint():
        return ImageFolderDataset("d", root).fingerprint("train")

    import calbench.data.folder as folder

    monkeypatch.setattr(folder.Image, "open", lambda *a, **k: pytest.fail("fingerprint decoded an image"))
    base = fingerprint()
    assert fingerprint() == base
    extra = root / "images" / "train" / "a" / "a9.png"
    shutil.copy(root / "images" / "train" / "a" / "a0.png", extra)
    added = fingerprint()
    assert added != base
    extra.unlink()
    assert fingerprint() == base  # removing it restores the identity (same names, sizes, mtimes)
    target = root / "images" / "train" / "b" / "b1.png"
    stat = target.stat()
    target.write_bytes(target.read_bytes() + b"\0")  # replaced: size changes
    assert fingerprint() != base
    target.write_bytes(target.read_bytes()[:-1])
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same size, new mtime
    assert fingerprint() != base
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint() == base


def test_mixed_modes_become_rgb_and_load(tmp_path):
    root = make_folder(tmp_path / "d", per_class=1)
    folder = root / "images" / "train" / "a"
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(folder / "xray16.png")
    Image.new("L", (8, 8), 77).save(folder / "grey.png")
    Image.new("RGBA", (8, 8), (200, 100, 50, 0)).save(folder / "rgba.png")
    Image.new("P", (8, 8), 3).save(folder / "palette.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(folder / "cmyk.jpg")
    dataset = load_dataset(str(root), cache_dir=tmp_path / "cache")
    loaded = {p.name: dataset.load_image("train", i) for i, (p, _) in enumerate(dataset.files("train"))}
    assert {name: image.mode for name, image in loaded.items()} == {
        n: "RGB" for n in ("a0.png", "b0.png", "cmyk.jpg", "grey.png", "palette.png", "rgba.png", "xray16.png")
    }
    xray = np.asarray(loaded["xray16.png"])[..., 0]
    assert xray.max() == 255 and xray[0, 1] == round(1000 / 63000 * 255)  # scaled by the brightest pixel
    assert loaded["grey.png"].getpixel((0, 0)) == (77, 77, 77)
    assert loaded["rgba.png"].getpixel((0, 0)) == (200, 100, 50)
    assert loaded["cmyk.jpg"].getpixel((0, 0)) == (255, 255, 255)
    float_image = Image.fromarray(np.array([[-1.0, 0.0], [1.0, 3.0]], dtype=np.float32))
    assert np.asarray(to_rgb(float_image))[..., 0].tolist() == [[0, 64], [128, 255]]


def test_template_file_is_used_for_a_folder_path(tmp_path):
    root = make_folder(tmp_path / "d")
    assert load_dataset(str(root), tmp_path / "c").template == "a photo of a {}."
    (root / "template.txt").write_text("An H&E image of {}.\n")
    assert load_dataset(str(root), tmp_path / "c").template == "An H&E image of {}."
