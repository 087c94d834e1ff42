import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from cli_checks import FAST_ARGS, cli
from safetensors.torch import save_file

import calbench.atomic
import calbench.cache as cache_module
from calbench.cache import CHUNK_SECONDS, CHUNK_VIEWS, FeatureCache
from calbench.data import load_dataset
from calbench.data.transforms import eval_transform
from calbench.results import read_results


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


# --- a read-only cache ---------------------------------------------------------------------------


def _fail_temp_files(monkeypatch, under: Path, code: int) -> None:
    """Atomic writes under ``under`` fail as on a read-only (or full) disk: mkstemp raises, naming its temp file."""
    real = tempfile.mkstemp

    def failing(suffix=None, prefix=None, dir=None, text=False):
        if dir is not None and (Path(dir) == under or under in Path(dir).parents):
            raise OSError(code, os.strerror(code), str(Path(dir) / f"{prefix}abcd1234{suffix}"))
        return real(suffix=suffix, prefix=prefix, dir=dir, text=text)

    monkeypatch.setattr(calbench.atomic.tempfile, "mkstemp", failing)


@pytest.mark.e2e
def test_read_only_cache_with_a_miss_names_the_cache_file(tmp_path, cache_dir, monkeypatch):
    cache = tmp_path / "cache"
    cli("datasets", "check", "synthetic", "--cache-dir", cache)  # the dataset is there; its features are not
    _fail_temp_files(monkeypatch, cache / "features", errno.EROFS)
    result = cli("compare", *FAST_ARGS, "--out", tmp_path / "out", "--cache-dir", cache)
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: cannot write {cache / 'features'}{os.sep}")
    assert ".tmp" not in line  # the file being written, not the temp file
    assert line.endswith(": read-only file system; pass --cache-dir on a writable disk")
    assert read_results(tmp_path / "out" / "results.csv") == []


# ---------------------------------------------------------------- feature cache: chunked saves

KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    import calbench.cache
    from calbench.cache import FeatureCache
    from calbench.data import load_dataset
    from calbench.models import load_vlm

    cache_dir, data, kind, views, count = sys.argv[1:]
    views = [int(v) for v in views.split(",")]
    real_save, saved = calbench.cache.save_safetensors_atomic, []

    def save_then_die(path, tensors, meta=None):
        real_save(path, tensors, meta)
        saved.append(path)
        if len(saved) == len(views):
            os.kill(os.getpid(), signal.SIGKILL)  # killed right after the first chunk (one file per view) is on disk

    calbench.cache.save_safetensors_atomic = save_then_die
    cache = FeatureCache(Path(cache_dir), load_vlm("tiny"), batch_size=4, progress=False, chunk_size=16)
    cache.features(load_dataset(data, cache_dir=Path(cache_dir)), "test", range(int(count)), kind=kind, views=views)
    """
)


@pytest.mark.parametrize(("kind", "views"), [("eval", (0,)), ("score-noise0.25", (0, 1, 2))])
def test_a_killed_encoding_keeps_its_saved_chunk_and_the_rerun_encodes_only_the_rest(
    tiny, synthetic, tmp_path, kind, views
):
    count = 30
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CALBENCH_CACHE": str(tmp_path)}
    args = [str(tmp_path / "c"), str(synthetic.root), kind, ",".join(map(str, views)), str(count)]
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, *args], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    dataset = load_dataset(str(synthetic.root), cache_dir=tmp_path)
    rerun = FeatureCache(tmp_path / "c", tiny, progress=False)
    features = rerun.features(dataset, "test", range(count), kind=kind, views=views)
    assert (rerun.stats.loaded, rerun.stats.encoded) == (16, count * len(views) - 16)
    fresh = FeatureCache(tmp_path / "fresh", tiny, progress=False)
    torch.testing.assert_close(
        features, fresh.features(dataset, "test", range(count), kind=kind, views=views), atol=1e-6, rtol=0
    )


def test_unsaved_features_never_exceed_one_chunk(tiny, synthetic, tmp_path, monkeypatch):
    saves = _recording_saves(monkeypatch)
    cache = FeatureCache(tmp_path / "c", tiny, batch_size=8, progress=False, chunk_size=10)
    cache.features(synthetic, "test", range(25), kind="eval")
    unsaved = [
        rows for what, rows in saves if what == "chunk"
    ]  # what each chunk file holds: the rows unsaved till then
    assert unsaved == [10, 10, 5] and cache.stats.encoded == 25  # batches never cross a chunk: 8 + 2, 8 + 2, 5
    assert (CHUNK_VIEWS, CHUNK_SECONDS) == (1000, 60.0)  # the documented defaults


def _recording_saves(monkeypatch) -> list[tuple[str, int]]:
    saves: list[tuple[str, int]] = []
    real = cache_module.save_safetensors_atomic

    def record(path, tensors, meta=None):
        saves.append(("chunk" if ".part-" in Path(path).name else "main", len(tensors["indices"])))
        real(path, tensors, meta)

    monkeypatch.setattr(cache_module, "save_safetensors_atomic", record)
    return saves


def test_a_slow_encoder_saves_every_chunk_seconds(tiny, synthetic, tmp_path, monkeypatch):
    saves = _recording_saves(monkeypatch)
    cache = FeatureCache(tmp_path / "c", tiny, batch_size=4, progress=False, chunk_seconds=0)
    cache.features(synthetic, "test", range(12), kind="eval")
    # after each batch of 4 (the time limit; the chunk's end has nothing new), then folded into the main file
    assert saves == [("chunk", 4), ("chunk", 4), ("chunk", 4), ("main", 12)]


def test_each_row_is_written_twice_at_most_and_no_chunk_file_is_left(tiny, synthetic, tmp_path, monkeypatch):
    saves = _recording_saves(monkeypatch)
    cache = FeatureCache(tmp_path / "c", tiny, batch_size=8, progress=False, chunk_size=10)
    cache.features(synthetic, "test", range(25), kind="eval")
    assert saves == [("chunk", 10), ("chunk", 10), ("chunk", 5), ("main", 25)]  # linear, not a rewrite per chunk
    assert [p.name for p in (tmp_path / "c" / "features").iterdir() if ".part-" in p.name] == []
    more = cache.features(synthetic, "test", range(30), kind="eval")
    assert saves[4:] == [("chunk", 5), ("main", 30)] and more.shape == (1, 30, tiny.embed_dim)


def test_a_cache_file_in_the_existing_format_still_loads(tiny, synthetic, tmp_path):
    cache = FeatureCache(tmp_path / "c", tiny, progress=False)
    path, meta = cache.key(synthetic, "test", "eval", 0, None)
    stored = torch.randn(2, tiny.embed_dim)
    path.parent.mkdir(parents=True)
    save_file({"features": stored, "indices": torch.tensor([7, 3])}, str(path), metadata=meta)
    features = cache.features(synthetic, "test", [3, 7], kind="eval")
    assert (cache.stats.loaded, cache.stats.encoded) == (2, 0)
    torch.testing.assert_close(features[0], stored.flip(0), atol=0, rtol=0)
