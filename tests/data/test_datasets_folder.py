"""Every way a dataset folder can be wrong gives one exact line; fingerprints, corrupt files and image modes."""

import csv
import os
import re
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
from cli_checks import cli, flat
from PIL import Image

from calbench.data import check_dataset, load_dataset
from calbench.data.classnames import read_classnames
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


# ---------------------------------------------------------------- robustness: bombs, broken links, classnames.txt

LIMIT = Image.MAX_IMAGE_PIXELS  # Pillow's default decompression-bomb limit, 89478485 pixels


def bomb_png(width, height):
    """A PNG that declares ``width`` x ``height`` but holds a few bytes: Pillow refuses it at open, before decoding."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


# 10000 x 10000 is between the limit and twice it (Pillow only warns); 20000 x 20000 is above (Pillow raises)
BOMBS = [
    (
        "warned",
        10000,
        f"10000x10000 pixels, over Pillow's decompression-bomb limit of {LIMIT} pixels: shrink or tile it",
    ),
    (
        "refused",
        20000,
        f"400000000 pixels, over Pillow's decompression-bomb limit of {LIMIT} pixels: shrink or tile it",
    ),
]


# ---------------------------------------------------------------- decompression bombs


@pytest.mark.parametrize("case, side, why", BOMBS, ids=[b[0] for b in BOMBS])
def test_bomb_in_a_folder_is_skipped_by_datasets_check_and_refused_with_strict(tmp_path, case, side, why):
    root = make_folder(tmp_path / "d", per_class=3)
    bomb = root / "images" / "train" / "a" / "huge.png"
    bomb.write_bytes(bomb_png(side, side))
    result = cli("datasets", "check", root, "--cache-dir", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "DOS attack" not in result.output  # Pillow's own warning is silenced
    assert flat(f"warning: skipping unreadable image {bomb} ({why})") in flat(result.output)
    assert "ok: 2 classes" in result.output and "1 unreadable image(s) skipped" in result.output
    strict = cli("datasets", "check", root, "--strict", "--cache-dir", tmp_path / "c")
    assert strict.exit_code == 2 and "Traceback" not in strict.output
    assert flat(strict.output) == flat(
        f"error: cannot read image {bomb} ({why}) and 0 more; remove or replace them, or drop --strict to skip them"
    )


def test_bomb_is_left_out_of_the_split_that_compare_encodes(tmp_path, monkeypatch):
    """What `compare` loads: the bomb is skipped at listing, the indices of the rest stay put, nothing decodes it."""
    root = make_folder(tmp_path / "d", per_class=3)
    bomb = root / "images" / "test" / "b" / "b1.png"
    bomb.write_bytes(bomb_png(20000, 20000))
    with pytest.warns(UserWarning) as caught:
        dataset = load_dataset(str(root), tmp_path / "cache")
        files = dataset.files("test")
    assert [str(w.message) for w in caught] == [f"skipping unreadable image {bomb} ({BOMBS[1][2]})"]
    assert [p.name for p, _ in files] == ["a0.png", "a1.png", "a2.png", "b0.png", "b2.png"]
    assert [dataset.load_image("test", i).size for i in range(5)] == [(8, 8)] * 5
    # a file that became a bomb after the check: one line naming it, never Pillow's exception
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32)
    with pytest.raises(CalbenchError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's own, before calbench's line
        dataset.load_image("test", 0)
    assert str(info.value) == (
        f"cannot read image {root / 'images' / 'test' / 'a' / 'a0.png'}: 8x8 pixels, over Pillow's decompression-bomb "
        "limit of 32 pixels: shrink or tile it; it changed after the folder was checked, run again"
    )


@pytest.mark.e2e
def test_compare_on_a_folder_with_a_bomb_skips_it_and_finishes(tmp_path):
    root = make_folder(tmp_path / "d", per_class=3)
    bomb = root / "images" / "train" / "a" / "a9.png"
    bomb.write_bytes(bomb_png(10000, 10000))
    args = ["compare", "--data", root, "--methods", "zero-shot", "--seeds", "1", "--shots", "1"]
    args += ["--val-shots", "1", "--views", "1", "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert flat(f"warning: skipping unreadable image {bomb} ({BOMBS[0][2]})") in flat(result.output)
    with open(tmp_path / "out" / "results.csv") as handle:
        assert [row["method"] for row in csv.DictReader(handle)] == ["zero-shot"]


# ---------------------------------------------------------------- broken links

LINKS = [
    ("loop", "images/train/a/loop.png", "loop.png", "image", "a symbolic link loop"),
    (
        "dangling",
        "images/train/a/gone.png",
        "/nonexistent/gone.png",
        "image",
        "a dangling symbolic link to /nonexistent/gone.png",
    ),
    ("class folder loop", "images/train/c", "c", "class folder", "a symbolic link loop"),
    ("folder with an image name", "images/test/b/up.png", "..", "image", "not a regular file"),
]


@pytest.mark.parametrize("case, link, target, what, why", LINKS, ids=[c[0] for c in LINKS])
def test_broken_links_are_skipped_by_name_and_refused_with_strict(tmp_path, case, link, target, what, why):
    root = make_folder(tmp_path / "d", per_class=3)
    os.symlink(target, root / link)
    result = cli("datasets", "check", root, "--cache-dir", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert flat(f"warning: skipping unreadable {what} {root / link} ({why})") in flat(result.output)
    assert "ok: 2 classes" in result.output and "Traceback" not in result.output
    strict = cli("datasets", "check", root, "--strict", "--cache-dir", tmp_path / "c")
    assert strict.exit_code == 2 and "Traceback" not in strict.output
    assert flat(strict.output) == flat(
        f"error: cannot read {what} {root / link} ({why}) and 0 more; remove or replace them, or drop --strict to skip them"
    )


# ---------------------------------------------------------------- classnames.txt


def _names_folder(tmp_path, classes, text):
    root = make_folder(tmp_path / "d", classes=classes, per_class=1)
    (root / "classnames.txt").write_bytes(text)
    return root


GOOD_NAMES = [
    ("utf-8 byte-order mark", ("a", "b"), "\ufeffa class a\nb class b\n".encode(), ["class a", "class b"]),
    (
        "tab-separated",
        ("normal tissue", "tumour"),
        b"normal tissue\tnormal colon\ntumour\ttumour tissue\n",
        ["normal colon", "tumour tissue"],
    ),
    (
        "quoted",
        ("normal tissue", "tumour"),
        b'"normal tissue" normal colon\n"tumour"\ttumour tissue\n',
        ["normal colon", "tumour tissue"],
    ),
    ("utf-8 names", ("a", "b"), "a tissu normal\nb tumeur bénigne\n".encode(), ["tissu normal", "tumeur bénigne"]),
]


@pytest.mark.parametrize("case, classes, text, names", GOOD_NAMES, ids=[c[0] for c in GOOD_NAMES])
def test_classnames_forms_that_load(tmp_path, case, classes, text, names):
    root = _names_folder(tmp_path, classes, text)
    dataset = load_dataset(str(root), tmp_path / "cache")
    assert dataset.classnames == names and dataset.class_folders == sorted(classes)
    assert cli("datasets", "check", root, "--cache-dir", tmp_path / "c").exit_code == 0


BAD_NAMES = [
    (
        "latin-1",
        "a class a\nb tumeur bénigne\n".encode("latin-1"),
        "{names}:2: byte 0xe9 is not UTF-8 (a Latin-1 or Windows-1252 file?); classnames.txt must be UTF-8: save it as UTF-8 and run again",
    ),
    (
        "utf-16",
        "a class a\nb class b\n".encode("utf-16"),
        "{names} is UTF-16 text; classnames.txt must be UTF-8: save it as UTF-8 and run again",
    ),
    (
        "utf-16 without a mark",
        "a class a\nb class b\n".encode("utf-16-le"),
        "{names} is UTF-16 text; classnames.txt must be UTF-8: save it as UTF-8 and run again",
    ),
    (
        "same class name",
        b"a tumour\nb  Tumour\n",
        "{names}: class folders 'a' (line 1) and 'b' (line 2) are both named 'Tumour'; give each folder its own class name, or merge the two folders",
    ),
    (
        "unclosed quote",
        b'"a class a\nb class b\n',
        "{names}:1: expected '<class_folder> <class name>' (a folder with spaces: '\"<class folder>\" <class name>' or a tab between them), got '\"a class a'",
    ),
]


@pytest.mark.parametrize("case, text, message", BAD_NAMES, ids=[c[0] for c in BAD_NAMES])
def test_classnames_problems_are_one_line_naming_the_file(tmp_path, case, text, message):
    root = _names_folder(tmp_path, ("a", "b"), text)
    result = cli("datasets", "check", root, "--cache-dir", tmp_path / "c")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert flat(result.output) == flat("error: " + message.format(names=root / "classnames.txt"))


def test_prepare_writes_classnames_that_read_back(tmp_path):
    from calbench.data.classnames import format_line

    path = tmp_path / "classnames.txt"
    path.write_text(
        format_line("normal tissue", "normal") + format_line("ADI", "adipose tissue") + format_line('"q', "q")
    )
    assert read_classnames(path) == {"normal tissue": (1, "normal"), "ADI": (2, "adipose tissue"), '"q': (3, "q")}


# ---------------------------------------------------------------- warnings are calbench's


def test_no_plain_warnings_escape_the_data_package(tmp_path):
    """Every warning the data package gives is calbench's (shown by the CLI even under PYTHONWARNINGS=ignore)."""
    from calbench.errors import CalbenchWarning

    root = make_folder(tmp_path / "d", per_class=2)
    (root / "images" / "train" / "a" / "bad.png").write_bytes(b"junk")
    os.symlink("nowhere.png", root / "images" / "train" / "b" / "gone.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_dataset(str(root), tmp_path / "cache").files("train")
    assert [w.category for w in caught] == [CalbenchWarning, CalbenchWarning]
