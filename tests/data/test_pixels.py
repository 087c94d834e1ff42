"""Cache builds with decoding workers (as on CUDA) store the features a build without them stores."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from calbench.cache import FeatureCache
from calbench.data import load_dataset
from calbench.data.pixels import default_workers, view_batches
from calbench.errors import CalbenchError
from calbench.models import load_vlm


def test_workers_store_the_features_of_a_build_without_them(cache_dir, tmp_path):
    vlm = load_vlm("tiny-random", device="cpu")
    dataset = load_dataset("synthetic", cache_dir)
    indices = np.arange(10)
    alone = FeatureCache(tmp_path / "alone", vlm, batch_size=4, progress=False, workers=0)
    helped = FeatureCache(tmp_path / "helped", vlm, batch_size=4, progress=False, workers=2)
    for kind, views, seed in (("eval", (0,), None), ("train", (0, 1, 2), 7)):
        expected = alone.features(dataset, "train", indices, kind, views, seed)
        torch.testing.assert_close(
            helped.features(dataset, "train", indices, kind, views, seed), expected, rtol=0, atol=0
        )
    assert helped.stats.encoded == alone.stats.encoded == 10 + 30
    assert default_workers(torch.device("cpu")) == 0


def test_an_unreadable_image_in_a_worker_is_the_one_line_error(tmp_path, cache_dir):
    folder = tmp_path / "data"
    shutil.copytree(load_dataset("synthetic", cache_dir).root, folder)
    dataset = load_dataset(str(folder), tmp_path / "cache")
    path = dataset.files("test")[5][0]
    path.write_bytes(b"not an image any more")  # changed after the folder was checked
    vlm = load_vlm("tiny-random", device="cpu")
    pending = [(i, 0) for i in range(8)]
    with pytest.raises(CalbenchError, match=f"cannot read image {path}") as caught:
        list(view_batches(dataset, "test", "eval", vlm.preprocess, None, pending, 2, workers=2))
    assert "\n" not in str(caught.value)
