"""MedMNIST: a fake .npz in the package's layout is materialised; class names come from its INFO; offline error."""

import numpy as np
import pytest
from PIL import Image

from calbench.data import DATASETS, availability, classes_of, load_dataset
from calbench.data.medmnist_data import SETS, SIZES
from calbench.errors import CalbenchError

medmnist_info = pytest.importorskip("medmnist.info")


def fake_npz(path, n_classes, size=28, channels=3, per_class=(3, 1, 2)):
    """train/val/test images (N,H,W[,C]) uint8 and labels (N,1), as the package ships them."""
    arrays = {}
    for split, count in zip(("train", "val", "test"), per_class):
        labels = np.repeat(np.arange(n_classes), count)
        shape = (len(labels), size, size) + ((channels,) if channels == 3 else ())
        images = np.zeros(shape, np.uint8) + (labels * 20).reshape((-1,) + (1,) * (len(shape) - 1)).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture(autouse=True)
def no_home_npz(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_every_set_and_size_is_registered_outside_the_paper_grid():
    assert list(SETS) == [
        "pathmnist",
        "pneumoniamnist",
        "dermamnist",
        "bloodmnist",
        "breastmnist",
        "octmnist",
        "retinamnist",
        "organamnist",
    ]
    for flag in SETS:
        for size in SIZES:
            name = flag if size == 28 else f"{flag}_{size}"
            spec = DATASETS.get(name)
            assert not spec.in_grid and spec.variant_of == ("" if size == 28 else flag)
    assert "chestmnist" not in DATASETS


def test_class_names_come_from_the_package_metadata():
    assert list(classes_of("pathmnist")) == [medmnist_info.INFO["pathmnist"]["label"][str(i)] for i in range(9)]
    assert classes_of("bloodmnist_64")[0] == "basophil"
    assert classes_of("retinamnist") == tuple(f"diabetic retinopathy grade {i}" for i in range(5))


def test_a_downloaded_npz_is_materialised_into_the_layout_once(tmp_path):
    root = tmp_path / "data"
    fake_npz(root / "medmnist" / "pathmnist_64.npz", 9, size=64)
    assert availability("pathmnist_64", root) == (True, "")
    dataset = load_dataset("pathmnist_64", tmp_path / "cache", data_root=root)
    assert dataset.root == root / "pathmnist_64"
    assert dataset.classnames == list(classes_of("pathmnist"))
    assert dataset.class_folders[3] == "03_lymphocytes" and dataset.template == "An H&E image of {}."
    assert dataset.labels("train").tolist() == np.repeat(np.arange(9), 3).tolist()  # official val split unused
    assert dataset.labels("test").tolist() == np.repeat(np.arange(9), 2).tolist()
    image = dataset.load_image("test", 4)
    assert image.size == (64, 64) and image.getpixel((0, 0)) == (40, 40, 40)
    marker = (root / "pathmnist_64" / "PREPARED.json").stat().st_mtime_ns
    load_dataset("pathmnist_64", tmp_path / "cache", data_root=root)
    assert (root / "pathmnist_64" / "PREPARED.json").stat().st_mtime_ns == marker
    assert sorted(p.name for p in root.iterdir()) == ["medmnist", "pathmnist_64"]


def test_grey_sets_keep_grey_files_and_load_as_rgb(tmp_path):
    root = tmp_path / "data"
    fake_npz(root / "medmnist" / "pneumoniamnist.npz", 2, channels=1)
    dataset = load_dataset("pneumoniamnist", tmp_path / "cache", data_root=root)
    assert dataset.classnames == ["normal", "pneumonia"] and dataset.template == "A chest X-ray image of {} patient"
    assert Image.open(dataset.files("train")[0][0]).mode == "L" and dataset.load_image("train", 3).mode == "RGB"


def test_offline_and_absent_is_one_clear_line(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    root = tmp_path / "data"
    ok, hint = availability("dermamnist", root)
    url = medmnist_info.INFO["dermamnist"]["url"]
    assert (
        not ok
        and hint
        == f"dermamnist is not downloaded; it downloads on first use when online, or put {url} into {root / 'medmnist'}"
    )
    with pytest.raises(CalbenchError) as info:
        load_dataset("dermamnist", tmp_path / "cache", data_root=root)
    assert (
        str(info.value)
        == f"dermamnist.npz is not in {root / 'medmnist'} and could not be downloaded (offline?); download {url} into {root / 'medmnist'} and run again"
    )
    assert not (root / "dermamnist").exists()


def test_a_damaged_npz_is_an_error_not_a_half_folder(tmp_path):
    root = tmp_path / "data"
    path = root / "medmnist" / "breastmnist.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(CalbenchError) as info:
        load_dataset("breastmnist", tmp_path / "cache", data_root=root)
    assert str(info.value) == f"{path} has no train_labels array; it is not a MedMNIST .npz, delete it and run again"
    assert sorted(p.name for p in root.iterdir()) == ["medmnist"]


def test_without_the_package_the_error_says_how_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "medmnist.info", None)
    assert availability("octmnist", tmp_path) == (
        False,
        "octmnist needs the medmnist package: pip install 'calbench[medmnist]' (then it downloads on first use)",
    )
    with pytest.raises(CalbenchError) as info:
        classes_of("octmnist")
    assert str(info.value) == "MedMNIST needs the medmnist package: pip install 'calbench[medmnist]'"
