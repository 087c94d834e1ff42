"""`calbench data prepare` on small fakes of each official download layout; archive safety; re-runs."""

import csv
import io
import json
import os
import tarfile
import tracemalloc
import zipfile

import numpy as np
import pytest
from cli_checks import cli, flat
from PIL import Image
from test_datasets_folder import BOMBS, bomb_png

from calbench.data import availability, load_dataset
from calbench.data.archive import Source
from calbench.data.prepare import (
    OFFICIAL,
    fit_square,
    output_stems,
    prepare_covid,
    prepare_digestpath,
    prepare_kather,
    prepare_pannuke,
    prepare_rsna18,
    stratified_test_keys,
)
from calbench.errors import CalbenchError

KATHER = [folder for folder, _ in OFFICIAL["kather"].classes]


def _png(size=(8, 8), colour=(120, 40, 90), mode="RGB", fmt="PNG"):
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode != "L" else colour[0]).save(buffer, format=fmt)
    return buffer.getvalue()


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _tree(root, members):
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def fake_kather(tmp_path, train_per_class=3, test_per_class=2):
    """NCT-CRC-HE-100K.zip (224 px tif, copied as is) and CRC-VAL-HE-7K as an extracted folder (non-square png, resized)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = {
        f"NCT-CRC-HE-100K/{c}/{c}-{i:04d}.tif": _png((224, 224), (20 * k, 10 * i, 100), fmt="TIFF")
        for k, c in enumerate(KATHER)
        for i in range(train_per_class)
    }
    train["NCT-CRC-HE-100K/README.txt"] = b"not an image"
    test = {
        f"CRC-VAL-HE-7K/{c}/{c}-TEST-{i}.png": _png((300, 250), (20 * k, 5, 50 + i))
        for k, c in enumerate(KATHER)
        for i in range(test_per_class)
    }
    return _zip(tmp_path / "NCT-CRC-HE-100K.zip", train), _tree(tmp_path / "CRC-VAL-HE-7K", test)


def _counts(out):
    return {
        split: {c.name: len(list(c.iterdir())) for c in sorted((out / "images" / split).iterdir())}
        for split in ("train", "test")
    }


def test_kather_from_the_official_zip_and_folder_loads_by_name(tmp_path):
    train, test = fake_kather(tmp_path / "dl")
    root = tmp_path / "data"
    assert availability("kather", root) == (
        False,
        f"kather is not in {root / 'kather'}; download it from https://zenodo.org/records/1214456 and run: "
        f"calbench data prepare kather --train NCT-CRC-HE-100K.zip --test CRC-VAL-HE-7K.zip --data-root {root}",
    )
    report = prepare_kather(train, test, data_root=root)
    out = root / "kather"
    assert report.out == out and not report.reused
    assert report.counts == {"train": {c: 3 for c in KATHER}, "test": {c: 2 for c in KATHER}} == _counts(out)
    assert (out / "classnames.txt").read_text().splitlines()[0] == "ADI adipose tissue"
    copied = out / "images" / "train" / "ADI" / "ADI-0001.tif"
    assert copied.read_bytes() == zipfile.ZipFile(train).read(
        "NCT-CRC-HE-100K/ADI/ADI-0001.tif"
    )  # 224 px: byte-for-byte
    resized = Image.open(out / "images" / "test" / "MUS" / "MUS-TEST-1.png")
    assert resized.size == (224, 224) and resized.getpixel((100, 100)) == (100, 5, 51)
    assert availability("kather", root) == (True, "")
    dataset = load_dataset("kather", cache_dir=tmp_path / "cache", data_root=root)
    assert (
        dataset.template == "An H&E image of {}." and dataset.classnames[-1] == "colorectal adenocarcinoma epithelium"
    )
    assert dataset.labels("test").tolist() == np.repeat(np.arange(9), 2).tolist()
    assert not list(root.glob(".*"))  # no temp folder left


def test_rerun_skips_finished_work_and_resumes_a_partial_one(tmp_path):
    train, test = fake_kather(tmp_path / "dl", train_per_class=2, test_per_class=1)
    out = tmp_path / "k"
    first = prepare_kather(train, test, out=out)
    mtime = (out / "PREPARED.json").stat().st_mtime_ns
    again = prepare_kather(train, test, out=out)
    assert again.reused and again.counts == first.counts and (out / "PREPARED.json").stat().st_mtime_ns == mtime
    # an interrupted run: the partial folder and its journal are picked up, journalled units are not redone
    out2 = tmp_path / "k2"
    import calbench.data.prepare.writer as prepare

    calls = []
    original = prepare.write_image

    def interrupt_after_five(payload, target, what, size):
        calls.append(what)
        if len(calls) == 6:
            raise KeyboardInterrupt
        original(payload, target, what, size)

    prepare.write_image = interrupt_after_five
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare_kather(train, test, out=out2)
    finally:
        prepare.write_image = original
    assert not out2.exists() and (tmp_path / ".k2.partial").is_dir()
    written = []
    prepare.write_image = lambda payload, target, what, size: (
        written.append(what),
        original(payload, target, what, size),
    )
    try:
        resumed = prepare_kather(train, test, out=out2)
    finally:
        prepare.write_image = original
    assert len(written) == 27 - 5 and resumed.counts == first.counts
    assert not (tmp_path / ".k2.partial").exists()


def test_existing_unrelated_folder_and_changed_downloads_are_refused(tmp_path):
    train, test = fake_kather(tmp_path / "dl", train_per_class=2, test_per_class=1)
    (tmp_path / "mine").mkdir()
    with pytest.raises(CalbenchError) as info:
        prepare_kather(train, test, out=tmp_path / "mine")
    assert (
        str(info.value)
        == f"{tmp_path / 'mine'} exists and was not written by `calbench data prepare`; remove it or choose another --out"
    )
    prepare_kather(train, test, out=tmp_path / "k")
    os.utime(train, ns=(0, 10**18))
    with pytest.raises(CalbenchError) as info:
        prepare_kather(train, test, out=tmp_path / "k")
    assert (
        str(info.value)
        == f"{tmp_path / 'k'} was prepared from other downloads or options; remove it to rebuild, or choose another --out"
    )


def test_wrong_download_names_the_missing_classes_and_writes_nothing(tmp_path):
    train, _ = fake_kather(tmp_path / "dl")
    wrong = _tree(tmp_path / "dl" / "other", {"CRC-VAL-HE-7K/ADI/a.png": _png()})
    with pytest.raises(CalbenchError) as info:
        prepare_kather(train, wrong, out=tmp_path / "k")
    assert (
        str(info.value)
        == f"{wrong} has no images in class folder(s) BACK, DEB, LYM, MUC, MUS, NORM, STR, TUM; is it the CRC-VAL-HE-7K download?"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl"]


def test_corrupt_source_image_is_skipped_with_a_warning(tmp_path):
    train, test = fake_kather(tmp_path / "dl", train_per_class=2, test_per_class=1)
    (test / "CRC-VAL-HE-7K" / "ADI" / "ADI-TEST-9.png").write_bytes(b"broken")
    with pytest.warns(
        UserWarning,
        match=r"skipping unreadable image test/ADI/CRC-VAL-HE-7K/ADI/ADI-TEST-9.png \(cannot identify image file",
    ):
        report = prepare_kather(train, test, out=tmp_path / "k")
    assert report.counts["test"]["ADI"] == 1 and len(report.skipped) == 1


@pytest.mark.parametrize(
    "kind, member, why",
    [
        ("zip", "/etc/evil.png", "has an absolute path"),
        ("zip", "NCT/ADI/../../evil.png", "contains '..'"),
        ("tar", "../evil.png", "contains '..'"),
        ("tar-link", "NCT/ADI/link.png", "is a link pointing outside ('../../../outside.png')"),
        ("zip-link", "NCT/ADI/link.png", "is a link pointing outside ('/etc/passwd')"),
    ],
)
def test_unsafe_archives_are_refused_before_anything_is_written(tmp_path, kind, member, why):
    path = tmp_path / ("bad.zip" if kind.startswith("zip") else "bad.tar")
    if kind == "zip":
        _zip(path, {"NCT/ADI/a.png": _png(), member: _png()})
    elif kind == "zip-link":
        with zipfile.ZipFile(path, "w") as archive:
            info = zipfile.ZipInfo(member)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, "/etc/passwd")
    else:
        with tarfile.open(path, "w") as archive:
            info = tarfile.TarInfo(member)
            if kind == "tar-link":
                info.type, info.linkname = tarfile.SYMTYPE, "../../../outside.png"
                archive.addfile(info)
            else:
                data = _png()
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    with pytest.raises(CalbenchError) as info:
        prepare_kather(path, path, out=tmp_path / "out" / "k")
    assert (
        str(info.value)
        == f"{path}: archive member {member!r} {why}; refusing to read this archive (nothing was written)"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "outside.png").exists()


def test_links_inside_an_archive_are_allowed_and_tar_is_read(tmp_path):
    path = tmp_path / "ok.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        data = _png()
        info = tarfile.TarInfo("top/a/x.png")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("top/b/y.png")
        link.type, link.linkname = tarfile.SYMTYPE, "../a/x.png"
        archive.addfile(link)
    with Source(path) as source:
        assert source.names == ["top/a/x.png"] and source.read("top/a/x.png") == data


def test_covid_from_the_kaggle_class_folders(tmp_path):
    members = {}
    for i in range(5):
        members[f"COVID-19_Radiography_Dataset/COVID/images/COVID-{i}.png"] = _png((299, 299), (200, 0, 0), mode="L")
        members[f"COVID-19_Radiography_Dataset/COVID/masks/COVID-{i}.png"] = _png((256, 256), (255, 0, 0), mode="L")
        members[f"COVID-19_Radiography_Dataset/Normal/images/Normal-{i}.png"] = _png((299, 299), (50, 0, 0), mode="L")
        members[f"COVID-19_Radiography_Dataset/Viral Pneumonia/images/Viral Pneumonia-{i}.png"] = _png(mode="L")
    archive = _zip(tmp_path / "archive.zip", members)
    report = prepare_covid(archive, out=tmp_path / "covid", test_fraction=0.2, seed=0)
    assert report.counts == {"train": {"covid": 4, "normal": 4}, "test": {"covid": 1, "normal": 1}}
    image = Image.open(next((tmp_path / "covid" / "images" / "test" / "covid").iterdir()))
    assert image.size == (224, 224) and image.mode == "L" and image.getpixel((0, 0)) == 200
    expected_test = stratified_test_keys(
        [f"COVID-19_Radiography_Dataset/COVID/images/COVID-{i}.png" for i in range(5)], ["covid"] * 5, 0.2, 0
    )
    assert {p.stem for p in (tmp_path / "covid" / "images" / "test" / "covid").iterdir()} == {
        k.rsplit("/", 1)[1][:-4] for k in expected_test
    }
    dataset = load_dataset(str(tmp_path / "covid"), tmp_path / "cache")
    assert dataset.template == "A chest X-ray image of {} patient" and dataset.classnames == ["covid", "normal"]


def test_stratified_split_is_seeded_and_keeps_a_train_image():
    keys = [f"k{i}" for i in range(10)]
    labels = ["a"] * 6 + ["b"] * 4
    test = stratified_test_keys(keys, labels, 0.25, seed=3)
    assert test == stratified_test_keys(keys, labels, 0.25, seed=3)
    assert sum(k in test for k in keys[:6]) == 2 and sum(k in test for k in keys[6:]) == 1  # round(1.5)=2, round(1.0)=1
    assert stratified_test_keys(["x", "y"], ["a", "a"], 0.9, 0) in ({"x"}, {"y"})


def _dicom(path, pixels, monochrome1=False):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_rsna18_from_dicom_files_and_the_label_csv(tmp_path):
    images = tmp_path / "stage_2_train_images"
    images.mkdir()
    classes = {"Normal": "normal", "No Lung Opacity / Not Normal": "not_normal", "Lung Opacity": "opacity"}
    rows = []
    gradient = np.tile(np.arange(256) * 16, (256, 1))  # 12-bit ramp, 0..4080
    for k, label in enumerate(classes):
        for i in range(3):
            patient = f"p{k}{i}"
            _dicom(images / f"{patient}.dcm", gradient, monochrome1=(patient == "p00"))
            rows += [(patient, label)] * (2 if label == "Lung Opacity" else 1)  # opacity rows repeat per box
    rows.append(("no-image-patient", "Normal"))
    with open(tmp_path / "stage_2_detailed_class_info.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patientId", "class"])
        writer.writerows(rows)
    report = prepare_rsna18(images, tmp_path / "stage_2_detailed_class_info.csv", out=tmp_path / "rsna18", seed=1)
    assert report.counts == {
        "train": {"normal": 2, "not_normal": 2, "opacity": 2},
        "test": {"normal": 1, "not_normal": 1, "opacity": 1},
    }
    dataset = load_dataset(str(tmp_path / "rsna18"), tmp_path / "cache")
    assert dataset.classnames == ["normal", "no lung opacity, not normal", "lung opacity"]
    path = next(p for p in (tmp_path / "rsna18" / "images").rglob("p01.png"))
    ramp = np.asarray(Image.open(path))
    assert ramp.shape == (224, 224) and ramp[0, 0] == 0 and ramp[0, -1] >= 250  # 12-bit scaled to 8-bit
    inverted = np.asarray(Image.open(next(p for p in (tmp_path / "rsna18" / "images").rglob("p00.png"))))
    assert inverted[0, 0] == 255 and inverted[0, -1] <= 5  # MONOCHROME1: bright means low values
    with pytest.raises(CalbenchError) as info:
        prepare_rsna18(images, tmp_path / "missing.csv", out=tmp_path / "r2")
    assert (
        str(info.value)
        == f"label file {tmp_path / 'missing.csv'} does not exist; give stage_2_detailed_class_info.csv from the challenge"
    )


def _pannuke_fold(path, n, neoplastic):
    """A fold zip in the published layout: Fold k/images/foldk/images.npy and Fold k/masks/foldk/masks.npy."""
    images = np.full((n, 256, 256, 3), 128.0)
    images[:, :, :, 0] = np.arange(n)[:, None, None] * 10.0
    masks = np.zeros((n, 256, 256, 6))
    for i in neoplastic:
        masks[i, 100:110, 100:110, 0] = 7
    masks[:, 0:5, 0:5, 1] = 3  # other nuclei types never make a patch malignant
    members = {}
    for name, array in (("Fold 1/images/fold1/images.npy", images), ("Fold 1/masks/fold1/masks.npy", masks)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        members[name] = buffer.getvalue()
    members["Fold 1/images/fold1/types.npy"] = b"ignored"
    return _zip(path, members)


def test_pannuke_folds_label_by_neoplastic_nuclei(tmp_path):
    fold1 = _pannuke_fold(tmp_path / "fold_1.zip", 4, neoplastic=[1, 2])
    fold2 = _pannuke_fold(tmp_path / "fold_2.zip", 3, neoplastic=[0])
    fold3 = _pannuke_fold(tmp_path / "fold_3.zip", 3, neoplastic=[2])
    report = prepare_pannuke([fold1, fold2], [fold3], out=tmp_path / "pannuke")
    assert report.counts == {"train": {"benign": 4, "malignant": 3}, "test": {"benign": 2, "malignant": 1}}
    malignant = sorted(p.name for p in (tmp_path / "pannuke" / "images" / "train" / "malignant").iterdir())
    assert malignant == ["fold_1_00001.png", "fold_1_00002.png", "fold_2_00000.png"]
    patch = Image.open(tmp_path / "pannuke" / "images" / "train" / "malignant" / "fold_1_00002.png")
    assert patch.size == (224, 224) and patch.getpixel((5, 5)) == (20, 128, 128)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_digestpath_tiles_by_mask_and_tissue_and_splits_by_image(tmp_path):
    def jpeg(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    pos, neg = {}, {}
    for i in range(3):
        image = np.full((448, 672, 3), 150, np.uint8)
        image[:, 448:] = 245  # a background column of tiles: dropped
        mask = np.zeros((448, 672), np.uint8)
        mask[:224, :224] = 255  # only the top-left tile is lesion
        pos[f"tissue-train-pos-v1/{i}.png"] = jpeg(image)
        pos[f"tissue-train-pos-v1/{i}_mask.png"] = jpeg(mask)
        neg[f"tissue-train-neg/n{i}.png"] = jpeg(image)
    pos_zip, neg_zip = _zip(tmp_path / "pos.zip", pos), _zip(tmp_path / "neg.zip", neg)
    report = prepare_digestpath(pos_zip, neg_zip, out=tmp_path / "dp", test_fraction=0.3, seed=0, max_patches=3)
    # malignant: 1 lesion tile per image; benign: 4 tissue tiles per image, capped at 3; 1 of 3 images per class to test
    assert report.counts == {"train": {"benign": 6, "malignant": 2}, "test": {"benign": 3, "malignant": 1}}
    names = {p.name for p in (tmp_path / "dp" / "images").rglob("*.png")}
    assert all(n.endswith("_0_0.png") for n in names if not n.startswith("n"))
    train_sources = {n.split("_")[0] for n in os.listdir(tmp_path / "dp" / "images" / "train" / "benign")}
    test_sources = {n.split("_")[0] for n in os.listdir(tmp_path / "dp" / "images" / "test" / "benign")}
    assert not train_sources & test_sources


def test_fit_square_resizes_the_short_side_and_centre_crops():
    wide = Image.fromarray(np.tile((np.arange(448) // 2).astype(np.uint8)[None, :], (224, 1)))
    fitted = fit_square(wide)  # short side already 224: only the centre crop, columns 112..335
    assert fitted.size == (224, 224) and fitted.getpixel((0, 0)) == 56 and fitted.getpixel((223, 0)) == 167
    tall = Image.fromarray(np.repeat((np.arange(600) // 100 * 40).astype(np.uint8)[:, None], 300, axis=1))
    fitted = fit_square(tall)  # 300x600 -> 224x448, rows 112..335 kept: original rows 150..449
    assert fitted.size == (224, 224) and fitted.getpixel((100, 0)) == 40 and fitted.getpixel((100, 223)) == 160
    assert fit_square(Image.new("RGBA", (10, 10))).mode == "RGB" and fit_square(Image.new("L", (10, 10))).mode == "L"


def test_macos_metadata_in_an_archive_is_ignored(tmp_path):
    path = _zip(
        tmp_path / "mac.zip",
        {"top/a/x.png": _png(), "__MACOSX/top/a/._x.png": b"\0\5\26\7", "top/a/.DS_Store": b"junk"},
    )
    with Source(path) as source:
        assert source.names == ["top/a/x.png"]


def test_a_prepared_folder_skips_the_image_check_until_a_file_changes(tmp_path, monkeypatch):
    train, test = fake_kather(tmp_path / "dl", train_per_class=2, test_per_class=1)
    out = prepare_kather(train, test, out=tmp_path / "k").out
    import calbench.data.folder as folder

    decoded = []
    original = folder.decode_problem
    monkeypatch.setattr(folder, "decode_problem", lambda path: decoded.append(path) or original(path))
    assert len(load_dataset(str(out), tmp_path / "cache").files("train")) == 18 and decoded == []
    (out / "images" / "train" / "ADI" / "extra.png").write_bytes(_png((224, 224)))
    assert len(load_dataset(str(out), tmp_path / "cache").files("train")) == 19 and len(decoded) == 19


# ---------------------------------------------------------------- decompression bombs


def test_prepare_skips_a_bomb_member_names_it_and_leaves_no_partial(tmp_path):
    train, test = fake_kather(tmp_path / "dl", train_per_class=2, test_per_class=1)
    (test / "CRC-VAL-HE-7K" / "ADI" / "ADI-TEST-9.png").write_bytes(bomb_png(20000, 20000))
    out = tmp_path / "data" / "kather"
    result = cli("data", "prepare", "kather", "--train", train, "--test", test, "--out", out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert flat(
        f"warning: skipping unreadable image test/ADI/CRC-VAL-HE-7K/ADI/ADI-TEST-9.png ({BOMBS[1][2]})"
    ) in flat(result.output)
    assert "28 source item(s) read, 1 skipped as unreadable, 27 image(s) written" in result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["kather"]  # no .kather.partial left
    again = cli("data", "prepare", "kather", "--train", train, "--test", test, "--out", out)
    assert again.exit_code == 0 and "already prepared from these downloads; nothing to do" in again.output
    assert flat(
        f"warning: skipping unreadable image test/ADI/CRC-VAL-HE-7K/ADI/ADI-TEST-9.png ({BOMBS[1][2]})"
    ) in flat(again.output)  # still named: it is not in the folder
    assert "28 source item(s) read, 1 skipped as unreadable, 27 image(s) written" in again.output


def test_prepare_with_strict_stops_at_a_bomb_and_a_rerun_without_it_resumes(tmp_path):
    train, test = fake_kather(tmp_path / "dl", train_per_class=2, test_per_class=1)
    (test / "CRC-VAL-HE-7K" / "ADI" / "ADI-TEST-9.png").write_bytes(bomb_png(20000, 20000))
    out = tmp_path / "data" / "kather"
    strict = cli("data", "prepare", "kather", "--train", train, "--test", test, "--out", out, "--strict")
    assert strict.exit_code == 2 and "Traceback" not in strict.output
    assert flat(
        f"error: cannot read test/ADI/CRC-VAL-HE-7K/ADI/ADI-TEST-9.png ({BOMBS[1][2]}); remove or replace it, "
        "or drop --strict to skip it"
    ) in flat(strict.output)
    assert not out.exists() and (out.parent / ".kather.partial" / ".done").is_file()  # finished items kept
    resumed = cli("data", "prepare", "kather", "--train", train, "--test", test, "--out", out)  # no --strict
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


# ---------------------------------------------------------------- broken links


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


# ---------------------------------------------------------------- streamed members, capped


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
    result = cli("data", "prepare", "kather", "--train", train, "--test", test, "--out", tmp_path / "k")
    assert result.exit_code == 0, result.output
    limit = "over calbench's limit of 200000 bytes for one member, MAX_MEMBER_BYTES in calbench/data/archive.py"
    for name, size in (
        (member, zipfile.ZipFile(train).getinfo(member).file_size),
        (big.relative_to(test), 250_000 + len(_png((300, 250)))),
    ):
        assert flat(f"warning: skipping unreadable image {name} ({size} bytes, {limit})") in flat(result.output)
    assert "38 source item(s) read, 2 skipped as unreadable, 36 image(s) written" in result.output


# ---------------------------------------------------------------- unique output names


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
    result = cli("data", "prepare", "kather", "--train", train, "--test", test, "--out", tmp_path / "k")
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
