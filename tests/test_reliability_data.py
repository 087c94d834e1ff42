"""Issue 11, the data items: decompression bombs, broken links, classnames.txt encodings and forms,
streamed archive members with a size cap, unique prepare output names, and stale synthetic temp folders.

Every case names its culprit in one line, exits 2 through the CLI where it is an error, prints no
traceback, and loses nothing already finished.
"""

import csv
import json
import os
import struct
import tracemalloc
import warnings
import zipfile
import zlib

import pytest
from PIL import Image
from test_datasets_folder import make_folder
from test_datasets_prepare import _png, _tree, _zip, fake_kather
from typer.testing import CliRunner

from calbench.cli.app import app
from calbench.data import load_dataset
from calbench.data.classnames import read_classnames
from calbench.data.prepare import output_stems, prepare_covid, prepare_kather
from calbench.errors import CalbenchError

runner = CliRunner()
LIMIT = Image.MAX_IMAGE_PIXELS  # Pillow's default decompression-bomb limit, 89478485 pixels


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _flat(text):
    """Output without whitespace, so a line wrapped by the console still compares equal."""
    return "".join(text.split())


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


# ---------------------------------------------------------------- 1. decompression bombs


@pytest.mark.parametrize("case, side, why", BOMBS, ids=[b[0] for b in BOMBS])
def test_bomb_in_a_folder_is_skipped_by_datasets_check_and_refused_with_strict(tmp_path, case, side, why):
    root = make_folder(tmp_path / "d", per_class=3)
    bomb = root / "images" / "train" / "a" / "huge.png"
    bomb.write_bytes(bomb_png(side, side))
    result = _run("datasets", "check", root, "--cache-dir", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "DOS attack" not in result.output  # Pillow's own warning is silenced
    assert _flat(f"warning: skipping unreadable image {bomb} ({why})") in _flat(result.output)
    assert "ok: 2 classes" in result.output and "1 unreadable image(s) skipped" in result.output
    strict = _run("datasets", "check", root, "--strict", "--cache-dir", tmp_path / "c")
    assert strict.exit_code == 2 and "Traceback" not in strict.output
    assert _flat(strict.output) == _flat(
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
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert _flat(f"warning: skipping unreadable image {bomb} ({BOMBS[0][2]})") in _flat(result.output)
    with open(tmp_path / "out" / "results.csv") as handle:
        assert [row["method"] for row in csv.DictReader(handle)] == ["zero-shot"]


def test_prepare_skips_a_bomb_member_names_it_and_leaves_no_partial(tmp_path):
    train, test = fake_kather(tmp_path / "dl", train_per_class=2, test_per_class=1)
    (test / "CRC-VAL-HE-7K" / "ADI" / "ADI-TEST-9.png").write_bytes(bomb_png(20000, 20000))
    out = tmp_path / "data" / "kather"
    result = _run("data", "prepare", "kather", "--train", train, "--test", test, "--out", out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert _flat(
        f"warning: skipping unreadable image test/ADI/CRC-VAL-HE-7K/ADI/ADI-TEST-9.png ({BOMBS[1][2]})"
    ) in _flat(result.output)
    assert "28 source item(s) read, 1 skipped as unreadable, 27 image(s) written" in result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["kather"]  # no .kather.partial left
    again = _run("data", "prepare", "kather", "--train", train, "--test", test, "--out", out)
    assert again.exit_code == 0 and "already prepared from these downloads; nothing to do" in again.output
    assert _flat(
        f"warning: skipping unreadable image test/ADI/CRC-VAL-HE-7K/ADI/ADI-TEST-9.png ({BOMBS[1][2]})"
    ) in _flat(again.output)  # still named: it is not in the folder
    assert "28 source item(s) read, 1 skipped as unreadable, 27 image(s) written" in again.output


def test_prepare_with_strict_stops_at_a_bomb_and_a_rerun_without_it_resumes(tmp_path):
    train, test = fake_kather(tmp_path / "dl", train_per_class=2, test_per_class=1)
    (test / "CRC-VAL-HE-7K" / "ADI" / "ADI-TEST-9.png").write_bytes(bomb_png(20000, 20000))
    out = tmp_path / "data" / "kather"
    strict = _run("data", "prepare", "kather", "--train", train, "--test", test, "--out", out, "--strict")
    assert strict.exit_code == 2 and "Traceback" not in strict.output
    assert _flat(
        f"error: cannot read test/ADI/CRC-VAL-HE-7K/ADI/ADI-TEST-9.png ({BOMBS[1][2]}); remove or replace it, "
        "or drop --strict to skip it"
    ) in _flat(strict.output)
    assert not out.exists() and (out.parent / ".kather.partial" / ".done").is_file()  # finished items kept
    resumed = _run("data", "prepare", "kather", "--train", train, "--test", test, "--out", out)  # no --strict
    assert resumed.exit_code == 0, resumed.output
    assert "resuming:" in resumed.output
    assert "28 source item(s) read, 1 skipped as unreadable, 27 image(s) written" in resumed.output


def test_a_partial_folder_left_by_a_crash_is_resumed_not_fatal(tmp_path, monkeypatch):
    """The state an older calbench left after crashing on a bomb: a .partial folder with some units journalled."""
    train, test = fake_kather(tmp_path / "dl", train_per_class=2, test_per_class=1)
    (test / "CRC-VAL-HE-7K" / "ADI" / "ADI-TEST-9.png").write_bytes(bomb_png(20000, 20000))
    out = tmp_path / "k"
    import calbench.data.prepare.writer as prepare

    original, written = prepare.write_image, []

    def crash_on_the_bomb(payload, target, what, size):
        if what.endswith("ADI-TEST-9.png"):
            raise Image.DecompressionBombError("as Pillow raised it before calbench caught it")
        written.append(what)
        original(payload, target, what, size)

    monkeypatch.setattr(prepare, "write_image", crash_on_the_bomb)
    with pytest.raises(Image.DecompressionBombError):
        prepare_kather(train, test, out=out)
    partial = tmp_path / ".k.partial"
    assert partial.is_dir() and not out.exists()
    with open(partial / ".done", "a") as journal:
        journal.write('["train/TUM/NCT-CRC-HE-100K/TUM/TUM-00')  # a line cut short by a kill
    assert len(written) == 19  # the 18 train images and ADI-TEST-0 were written before the crash
    resumed = []
    monkeypatch.setattr(prepare, "write_image", lambda *args: (resumed.append(args[2]), original(*args)))
    with pytest.warns(UserWarning, match="skipping unreadable image test/ADI/CRC-VAL-HE-7K/ADI/ADI-TEST-9.png"):
        report = prepare_kather(train, test, out=out)
    assert len(resumed) == 9 and not set(resumed) & set(written)  # only what was not finished is done again
    assert report.inputs == 28 and len(report.skipped) == 1
    assert sum(sum(c.values()) for c in report.counts.values()) == 27 and not partial.exists()


# ---------------------------------------------------------------- 2. broken links


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
    result = _run("datasets", "check", root, "--cache-dir", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert _flat(f"warning: skipping unreadable {what} {root / link} ({why})") in _flat(result.output)
    assert "ok: 2 classes" in result.output and "Traceback" not in result.output
    strict = _run("datasets", "check", root, "--strict", "--cache-dir", tmp_path / "c")
    assert strict.exit_code == 2 and "Traceback" not in strict.output
    assert _flat(strict.output) == _flat(
        f"error: cannot read {what} {root / link} ({why}) and 0 more; remove or replace them, or drop --strict to skip them"
    )


def test_a_link_to_an_ancestor_in_a_download_folder_does_not_hang_prepare(tmp_path):
    members = {
        f"COVID-19_Radiography_Dataset/{c}/images/{c}-{i}.png": _png() for c in ("COVID", "Normal") for i in range(3)
    }
    download = _tree(tmp_path / "dl", members)
    os.symlink("..", download / "COVID-19_Radiography_Dataset" / "COVID" / "images" / "up")
    dangling = download / "COVID-19_Radiography_Dataset" / "Normal" / "images" / "Normal-9.png"
    os.symlink("/nonexistent/x.png", dangling)
    with pytest.warns(UserWarning) as caught:
        report = prepare_covid(download, out=tmp_path / "covid")
    assert [str(w.message) for w in caught] == [
        f"skipping unreadable file {dangling} (a dangling symbolic link to /nonexistent/x.png)"
    ]
    assert report.inputs == 6 and sum(sum(c.values()) for c in report.counts.values()) == 6


# ---------------------------------------------------------------- 3. classnames.txt


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
    assert _run("datasets", "check", root, "--cache-dir", tmp_path / "c").exit_code == 0


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
    result = _run("datasets", "check", root, "--cache-dir", tmp_path / "c")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert _flat(result.output) == _flat("error: " + message.format(names=root / "classnames.txt"))


def test_prepare_writes_classnames_that_read_back(tmp_path):
    from calbench.data.classnames import format_line

    path = tmp_path / "classnames.txt"
    path.write_text(
        format_line("normal tissue", "normal") + format_line("ADI", "adipose tissue") + format_line('"q', "q")
    )
    assert read_classnames(path) == {"normal tissue": (1, "normal"), "ADI": (2, "adipose tissue"), '"q': (3, "q")}


# ---------------------------------------------------------------- 4. streamed members, capped


def test_a_large_member_is_streamed_not_read_into_memory(tmp_path):
    junk = os.urandom(48 * 2**20)  # 48 MiB after a valid 224 px PNG: copied as it is, byte for byte
    members = {
        f"COVID-19_Radiography_Dataset/{c}/images/{c}-{i}.png": _png((224, 224))
        for c in ("COVID", "Normal")
        for i in range(2)
    }
    members["COVID-19_Radiography_Dataset/COVID/images/COVID-big.png"] = _png((224, 224)) + junk
    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as archive:  # stored: the member is 48 MiB in the zip too
        for name, data in members.items():
            archive.writestr(name, data)
    del junk, members
    tracemalloc.start()
    try:
        report = prepare_covid(tmp_path / "archive.zip", out=tmp_path / "covid", test_fraction=0.4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 * 2**20, f"peak {peak / 2**20:.0f} MiB"  # reading it whole took more than 48 MiB
    big = next((tmp_path / "covid" / "images").rglob("COVID-big.png"))
    assert big.stat().st_size > 48 * 2**20 and report.inputs == 5


def test_a_member_over_the_cap_is_skipped_with_the_cap_named(tmp_path, monkeypatch):
    import calbench.data.archive as archive

    monkeypatch.setattr(archive, "MAX_MEMBER_BYTES", 200_000)  # the fake's 224 px TIFFs are 150 kB
    train, test = fake_kather(tmp_path / "dl", train_per_class=2, test_per_class=2)
    member = "NCT-CRC-HE-100K/ADI/ADI-big.tif"
    with zipfile.ZipFile(train, "a") as archive_file:  # in the zip: streamed until it proves too long
        archive_file.writestr(member, _png((224, 224), fmt="TIFF") + b"\0" * 100_000)
    big = test / "CRC-VAL-HE-7K" / "ADI" / "ADI-TEST-big.png"  # in a folder: refused by its size alone
    big.write_bytes(_png((300, 250)) + b"\0" * 250_000)
    result = _run("data", "prepare", "kather", "--train", train, "--test", test, "--out", tmp_path / "k")
    assert result.exit_code == 0, result.output
    limit = "over calbench's limit of 200000 bytes for one member, MAX_MEMBER_BYTES in calbench/data/archive.py"
    for name, size in (
        (member, zipfile.ZipFile(train).getinfo(member).file_size),
        (big.relative_to(test), 250_000 + len(_png((300, 250)))),
    ):
        assert _flat(f"warning: skipping unreadable image {name} ({size} bytes, {limit})") in _flat(result.output)
    assert "38 source item(s) read, 2 skipped as unreadable, 36 image(s) written" in result.output


# ---------------------------------------------------------------- 5. unique output names


def _same_names_zip(tmp_path):
    """Kather's train download holding both the normalised and the NONORM folders: 6 inputs with 3 names per class."""
    classes = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    members = {}
    for k, c in enumerate(classes):
        for top in ("NCT-CRC-HE-100K", "NCT-CRC-HE-100K-NONORM"):
            for i in range(3):
                members[f"{top}/{c}/{c}-{i}.tif"] = _png(
                    (224, 224), (20 * k, 10 * i, 100 if "NONORM" in top else 0), fmt="TIFF"
                )
    test = _tree(tmp_path / "CRC-VAL-HE-7K", {f"CRC-VAL-HE-7K/{c}/{c}-T.png": _png() for c in classes})
    return _zip(tmp_path / "train.zip", members), test


def test_same_named_members_in_different_folders_all_survive(tmp_path):
    train, test = _same_names_zip(tmp_path)
    result = _run("data", "prepare", "kather", "--train", train, "--test", test, "--out", tmp_path / "k")
    assert result.exit_code == 0, result.output
    assert "63 source item(s) read, 0 skipped as unreadable, 63 image(s) written" in result.output
    adi = sorted(p.name for p in (tmp_path / "k" / "images" / "train" / "ADI").iterdir())
    assert adi == sorted(f"NCT-CRC-HE-100K{n}__ADI__ADI-{i}.tif" for n in ("", "-NONORM") for i in range(3))
    copied = (tmp_path / "k" / "images" / "train" / "ADI" / "NCT-CRC-HE-100K-NONORM__ADI__ADI-2.tif").read_bytes()
    assert copied == zipfile.ZipFile(train).read("NCT-CRC-HE-100K-NONORM/ADI/ADI-2.tif")
    assert sorted(p.name for p in (tmp_path / "k" / "images" / "test" / "ADI").iterdir()) == ["ADI-T.png"]


def test_a_folder_prepared_with_the_old_names_is_reused_or_refused_with_what_to_do(tmp_path):
    train, test = _same_names_zip(tmp_path)
    out = tmp_path / "k"
    prepare_kather(train, test, out=out)
    marker = out / "PREPARED.json"
    stored = json.loads(marker.read_text())
    assert stored["recipe"]["renamed"] == 54 and stored["inputs"] == 63
    del stored["recipe"]["renamed"], stored["inputs"]  # what an older calbench wrote for the same downloads
    marker.write_text(json.dumps(stored))
    with pytest.raises(CalbenchError) as info:
        prepare_kather(train, test, out=out)
    assert str(info.value) == (
        f"{out} was prepared from these downloads by an older calbench, which named images by file name alone, "
        "so same-named files overwrote each other; remove it and run again to rebuild it with every image"
    )
    # without same-named files nothing is renamed: an older folder is reused as it is
    plain_train, plain_test = fake_kather(tmp_path / "plain", train_per_class=2, test_per_class=1)
    plain = prepare_kather(plain_train, plain_test, out=tmp_path / "plain-k")
    stored = json.loads((plain.out / "PREPARED.json").read_text())
    assert "renamed" not in stored["recipe"]
    del stored["inputs"]
    (plain.out / "PREPARED.json").write_text(json.dumps(stored))
    again = prepare_kather(plain_train, plain_test, out=tmp_path / "plain-k")
    assert again.reused and again.counts == plain.counts and again.inputs == 0


def test_output_stems_are_distinct_ignoring_case_and_keep_dotted_names():
    stems = output_stems(["a/x.png", "b/x.png", "b/x.tif", "c/X.png", "img.1.png", "img.2.png", "a__x.png"])
    assert stems == {
        "a/x.png": "a__x_png",
        "b/x.png": "b__x_png",
        "b/x.tif": "b__x_tif",
        "c/X.png": "c__X",
        "img.1.png": "img.1",
        "img.2.png": "img.2",
        "a__x.png": "a__x",
    }
    assert len({s.lower() for s in stems.values()}) == len(stems)


def test_dotted_file_names_are_no_longer_truncated_into_one(tmp_path):
    members = {
        f"COVID-19_Radiography_Dataset/{c}/images/{c}.{i}.png": _png((30, 30), (9 * i, 0, 0))
        for c in ("COVID", "Normal")
        for i in range(3)
    }
    report = prepare_covid(_zip(tmp_path / "archive.zip", members), out=tmp_path / "covid")
    assert sum(sum(c.values()) for c in report.counts.values()) == 6
    names = sorted(p.name for p in (tmp_path / "covid" / "images").rglob("*.png"))
    assert names == sorted(f"{c}.{i}.png" for c in ("COVID", "Normal") for i in range(3))


# ---------------------------------------------------------------- 6. stale synthetic temp folders


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
