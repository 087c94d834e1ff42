import shutil

import pytest
import torch

from calbench.cache import FeatureCache
from calbench.data import load_dataset
from calbench.data.transforms import eval_transform


@pytest.fixture()
def own_dataset(synthetic, tmp_path):
    """A private copy, so tests that change files do not disturb the shared one."""
    root = tmp_path / "mini"
    shutil.copytree(synthetic.root, root)
    return load_dataset(str(root), cache_dir=tmp_path)


def test_second_request_encodes_nothing_and_returns_the_same(tiny, own_dataset, tmp_path):
    cache = FeatureCache(tmp_path / "c", tiny, progress=False)
    first = cache.features(own_dataset, "test", [0, 5, 9], kind="eval")
    assert first.shape == (1, 3, 128) and cache.stats.encoded == 3
    again = FeatureCache(tmp_path / "c", tiny, progress=False)
    second = again.features(own_dataset, "test", [0, 5, 9], kind="eval")
    assert again.stats.encoded == 0 and again.stats.loaded == 3
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_cached_feature_is_the_encoder_output(tiny, own_dataset, tmp_path):
    cache = FeatureCache(tmp_path / "c", tiny, progress=False)
    cached = cache.features(own_dataset, "test", [7], kind="eval")[0, 0]
    direct = tiny.encode_images(eval_transform(own_dataset.load_image("test", 7), tiny.preprocess)[None])[0]
    torch.testing.assert_close(cached, direct, atol=1e-6, rtol=0)


def test_only_missing_images_are_encoded(tiny, own_dataset, tmp_path):
    cache = FeatureCache(tmp_path / "c", tiny, progress=False)
    small = cache.features(own_dataset, "train", [1, 2], kind="eval")
    big = cache.features(own_dataset, "train", [4, 2, 1, 3], kind="eval")
    assert cache.stats.encoded == 4  # 2, then only 3 and 4
    torch.testing.assert_close(big[0, 1:3], small[0].flip(0), atol=0, rtol=0)


def test_augmented_views_are_seeded_and_distinct(tiny, own_dataset, tmp_path):
    cache = FeatureCache(tmp_path / "c", tiny, progress=False)
    views = cache.features(own_dataset, "train", [0, 1], kind="train", views=range(3), seed=1)
    assert views.shape == (3, 2, 128)
    assert not torch.allclose(views[0], views[1])
    # a fresh cache folder re-draws the same augmentations: views depend on (run seed, view, image) only
    fresh = FeatureCache(tmp_path / "other", tiny, progress=False).features(
        own_dataset, "train", [1], kind="train", views=[2], seed=1
    )
    torch.testing.assert_close(fresh[0, 0], views[2, 1], atol=1e-6, rtol=0)
    # each image is decoded once per batch of views, and every view file is written
    assert len(list((tmp_path / "c" / "features").glob("*train*.safetensors"))) == 3


def test_changed_file_gives_a_new_key(tiny, own_dataset, tmp_path):
    cache = FeatureCache(tmp_path / "c", tiny, progress=False)
    cache.features(own_dataset, "test", [0], kind="eval")
    before = own_dataset.fingerprint("test")
    path, _ = own_dataset.files("test")[0]
    path.write_bytes(path.read_bytes() + b"\0")  # same name, new size
    changed = load_dataset(str(own_dataset.root), cache_dir=tmp_path)
    assert changed.fingerprint("test") != before
    again = FeatureCache(tmp_path / "c", tiny, progress=False)
    again.features(changed, "test", [0], kind="eval")
    assert again.stats.encoded == 1


def test_corrupt_cache_file_is_rebuilt_with_a_warning(tiny, own_dataset, tmp_path):
    cache = FeatureCache(tmp_path / "c", tiny, progress=False)
    good = cache.features(own_dataset, "test", [0, 1], kind="eval")
    (file,) = list((tmp_path / "c" / "features").glob("*.safetensors"))
    file.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = FeatureCache(tmp_path / "c", tiny, progress=False).features(own_dataset, "test", [0, 1], kind="eval")
    torch.testing.assert_close(rebuilt, good, atol=0, rtol=0)
    leftovers = [p.name for p in (tmp_path / "c" / "features").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # temp files were renamed into place


def test_a_different_model_never_reads_another_models_features(tiny, own_dataset, tmp_path):
    from safetensors.torch import save_file

    from calbench.models import load_vlm

    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    state["visual.proj"] = state["visual.proj"] * 2.0
    save_file(state, str(tmp_path / "other.safetensors"))
    other = load_vlm("tiny", weights=tmp_path / "other.safetensors")
    FeatureCache(tmp_path / "c", tiny, progress=False).features(own_dataset, "test", [0], kind="eval")
    cache = FeatureCache(tmp_path / "c", other, progress=False)
    cache.features(own_dataset, "test", [0], kind="eval")
    assert cache.stats.encoded == 1
