"""The feature cache on a file system several nodes share: two processes encoding the same key at
once neither corrupt the cache nor lose each other's work."""

import multiprocessing
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import calbench.cache as cache_module
from calbench.cache import FeatureCache
from calbench.data import load_dataset
from calbench.models import load_vlm

MODEL = "tiny-random"  # the fastest encoder: these tests are about files, not features
#: features of one image encoded in another batch shape or with another thread count differ by float32
#: rounding only: the kernels sum in another order (up to 9e-8 seen on an AMD EPYC, 0 on an Intel Xeon);
#: the unit-length features are within 1e-6 (about 16 float32 steps at 1.0) of each other
ROUNDING = 1e-6


@pytest.fixture(scope="module")
def model():
    return load_vlm(MODEL, device="cpu")


@pytest.fixture()
def dataset(synthetic, tmp_path):
    root = tmp_path / "mini"
    shutil.copytree(synthetic.root, root)
    return load_dataset(str(root), cache_dir=tmp_path)


def _stored_indices(root):
    """The image indices of the one main cache file under ``root``, in the order stored."""
    (main,) = (root / "features").glob("*.safetensors")
    return load_file(str(main))["indices"].tolist()


def _fresh(root, model, dataset, indices):
    """What a new process reads back, and how many views it had to encode."""
    cache = FeatureCache(root, model, progress=False)
    features = cache.features(dataset, "test", indices, kind="eval")
    return features, cache.stats.encoded


def test_a_fold_keeps_rows_another_process_folded_meanwhile(model, dataset, tmp_path, monkeypatch):
    """B reads the key (empty), A encodes and folds 0-4, then B encodes and folds 5-9: without
    re-reading under the fold marker, B's main file would replace A's and lose images 0-4."""
    a, b = (FeatureCache(tmp_path / "shared", model, progress=False) for _ in range(2))
    batches = cache_module.view_batches
    folded = {}

    def a_folds_first(*args, **kwargs):  # B's first batch: A runs in between, with the real loader
        monkeypatch.setattr(cache_module, "view_batches", batches)
        folded["a"] = a.features(dataset, "test", range(5), kind="eval")
        return batches(*args, **kwargs)

    monkeypatch.setattr(cache_module, "view_batches", a_folds_first)
    folded["b"] = b.features(dataset, "test", range(5, 10), kind="eval")
    assert (a.stats.encoded, b.stats.encoded) == (5, 5)
    features, encoded = _fresh(tmp_path / "shared", model, dataset, range(10))
    assert encoded == 0  # nothing lost: all ten in one main file, no chunk left
    assert [p.name.split(".")[-1] for p in (tmp_path / "shared" / "features").iterdir()] == ["safetensors"]
    assert sorted(_stored_indices(tmp_path / "shared")) == list(range(10))  # each image once
    # each row read back is the one its process encoded, bit for bit: the fold copies rows, never recomputes
    assert torch.equal(features, torch.cat([folded["a"], folded["b"]], dim=1))
    reference, _ = _fresh(tmp_path / "alone", model, dataset, range(10))  # one batch of ten, not two of five
    torch.testing.assert_close(features, reference, atol=ROUNDING, rtol=0)


def test_a_process_that_finds_the_fold_marker_leaves_its_chunks_for_the_next_read(model, dataset, tmp_path):
    cache = FeatureCache(tmp_path / "shared", model, progress=False)
    key, _ = cache.key(dataset, "test", "eval", 0, None)
    key.parent.mkdir(parents=True)
    marker = key.with_name(key.name + ".folding")
    marker.touch()  # another process is folding this key
    cache.features(dataset, "test", range(4), kind="eval")
    assert not key.exists() and len(list(key.parent.glob("*.part-*"))) == 1
    marker.unlink()
    _, encoded = _fresh(tmp_path / "shared", model, dataset, range(4))
    assert encoded == 0 and key.exists() and not list(key.parent.glob("*.part-*"))


def _encode(root, indices, cache_dir, done):
    torch.set_num_threads(1)
    from calbench.data import load_dataset as load
    from calbench.models import load_vlm as vlm

    dataset = load(str(root / "mini"), cache_dir=cache_dir)
    cache = FeatureCache(root / "shared", vlm(MODEL, device="cpu"), progress=False, chunk_size=3)
    for start in range(0, len(indices), 3):  # many small folds, to interleave with the other process
        cache.features(dataset, "test", indices[start : start + 3], kind="eval")
    done.put(cache.stats.encoded)


@pytest.mark.e2e
def test_two_processes_racing_on_one_key_lose_nothing(model, dataset, tmp_path):
    context = multiprocessing.get_context("spawn")  # fresh processes, as on two nodes
    done = context.Queue()
    shares = [list(range(0, 30)), list(range(15, 45))]  # overlapping: both encode 15-29
    workers = [context.Process(target=_encode, args=(tmp_path, s, tmp_path, done)) for s in shares]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0]
    assert sum(done.get(timeout=5) for _ in workers) >= 45
    features, encoded = _fresh(tmp_path / "shared", model, dataset, range(45))
    assert encoded == 0  # every image either process encoded is in the cache
    assert sorted(_stored_indices(tmp_path / "shared")) == list(range(45))  # each image once
    # the workers encode on one thread in batches of 3, this process on its own threads in batches of 45
    reference, _ = _fresh(tmp_path / "alone", model, dataset, range(45))
    torch.testing.assert_close(features, reference, atol=ROUNDING, rtol=0)


def test_a_cache_file_replaced_while_it_is_read_gives_one_files_rows(model, dataset, tmp_path, monkeypatch):
    """Another process may replace a cache file (folding its chunks in) while this process reads it. safetensors'
    load_file parses the header from one open of the path and maps the tensors from a second open
    (torch.UntypedStorage.from_file): this test replaces the file just before that second open. The cache
    reads each file in one open, so it gets the rows of the file it opened, never the new file's bytes at the
    old offsets."""
    first = FeatureCache(tmp_path / "shared", model, progress=False)
    before = first.features(dataset, "test", range(6), kind="eval")
    (main,) = (tmp_path / "shared" / "features").glob("*.safetensors")
    other = tmp_path / "other.safetensors"
    stored = load_file(str(main))
    meta = {"padding": " " * 1000}  # a longer header: the old offsets fall in its padding
    save_file(
        {"features": stored["features"][:2].contiguous(), "indices": stored["indices"][:2].contiguous()},
        str(other),
        meta,
    )
    original = torch.UntypedStorage.from_file

    def replaced_first(*args, **kwargs):
        if other.exists():
            other.replace(main)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.UntypedStorage, "from_file", replaced_first)
    again = FeatureCache(tmp_path / "shared", model, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unreadable file would be warned about and rebuilt
        after = again.features(dataset, "test", range(6), kind="eval")
    assert again.stats.encoded == 0
    assert torch.equal(after, before)
