"""Issue 11, sections 4 and 5: no lost encoding work, files others can read, weights that cannot run code,
and a report.md that shows names and errors as text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import calbench.cache as cache_module
from calbench import atomic
from calbench.cache import CHUNK_SECONDS, CHUNK_VIEWS, FeatureCache
from calbench.cli.app import app
from calbench.data import load_dataset
from calbench.errors import CalbenchError
from calbench.metrics import METRICS
from calbench.models import load_vlm
from calbench.report.blocks import Heading, Image, Table, Text, render_html, render_markdown
from calbench.results import RESULT_COLUMNS

runner = CliRunner()

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


# ---------------------------------------------------------------- file modes follow the umask


def _write_each_kind(folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    atomic.write_text_atomic(folder / "report.md", "text")
    atomic.write_csv_atomic([{"a": 1.5}], folder / "results.csv", ["a"])
    atomic.save_npy_atomic(folder / "predictions.npy", np.zeros(3))
    atomic.save_safetensors_atomic(folder / "cache.safetensors", {"x": torch.zeros(2)})
    atomic.save_figure_atomic(folder / "diagram.png", plt.figure(figsize=(1, 1)))
    return [folder / n for n in ("report.md", "results.csv", "predictions.npy", "cache.safetensors", "diagram.png")]


@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("existing", [None, 0o600, 0o644])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, existing):
    """A new file, and one replacing an older file (0600 as older calbench wrote them, or 0644)."""
    if existing is not None:
        for name in ("report.md", "results.csv", "predictions.npy", "cache.safetensors", "diagram.png"):
            (tmp_path / name).write_bytes(b"old")
            os.chmod(tmp_path / name, existing)
    previous = os.umask(umask)
    try:
        written = _write_each_kind(tmp_path)
    finally:
        os.umask(previous)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(0o666 & ~umask) for p in written}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _no_proc(*args, **kwargs):
    raise OSError("no /proc here")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_umask_is_read_without_proc_too(monkeypatch, umask):
    previous = os.umask(umask)
    try:
        assert atomic.current_umask() == umask
        monkeypatch.setattr(atomic, "open", _no_proc, raising=False)
        assert atomic.current_umask() == umask
        assert os.umask(previous) == umask  # reading it left it as it was
    finally:
        os.umask(previous)


# ---------------------------------------------------------------- TorchScript weights


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchscript_archive(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A TorchScript archive holding ``state`` (as an OpenAI CLIP .pt file holds its weights)."""
    root = _Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, _Holder())
            module = getattr(module, name)
        module.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(root, torch.zeros(1)), str(path))
    return path


@pytest.fixture()
def torchscript_weights(tiny, tmp_path):
    return _torchscript_archive(tiny.model.state_dict(), tmp_path / "tiny_vit.pt")


def _cache_cli(tmp_path: Path, *extra: str):
    args = ["cache", "--seeds", "1", "--shots", "1", "--views", "1", "--device", "cpu"]
    return runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "cache"), *extra])


def test_a_torchscript_weights_file_is_refused_without_running_it(torchscript_weights, tmp_path, monkeypatch):
    def no_code(*args, **kwargs):
        raise AssertionError("TorchScript was loaded")

    monkeypatch.setattr(torch.jit, "load", no_code)
    monkeypatch.setattr(torch, "load", no_code)
    result = _cache_cli(tmp_path, "--weights", str(torchscript_weights))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        f"error: weights file {torchscript_weights} is a TorchScript archive, which runs code embedded in it when "
        "loaded (OpenAI-format CLIP .pt files such as PLIP's are); pass --trust-weights if you trust its source, "
        "or convert it to a state dict"
    ]


def test_a_torchscript_weights_file_loads_with_trust_weights(tiny, torchscript_weights, tmp_path):
    result = _cache_cli(tmp_path, "--weights", str(torchscript_weights), "--trust-weights")
    assert result.exit_code == 0, result.output
    assert "image views encoded" in result.output
    assert load_vlm("tiny", weights=torchscript_weights, trust_weights=True).fingerprint == tiny.fingerprint
    with pytest.raises(CalbenchError, match="is a TorchScript archive"):  # the trust ends with the call
        load_vlm("tiny", weights=torchscript_weights)


def test_a_plain_state_dict_loads_without_trust_weights(tiny, tmp_path, monkeypatch):
    path = tmp_path / "tiny_state.pt"
    torch.save(tiny.model.state_dict(), path)
    real_load = torch.load
    seen: list[object] = []

    def tensors_only(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", tensors_only)
    result = _cache_cli(tmp_path, "--weights", str(path))
    assert result.exit_code == 0, result.output
    assert seen == [True]


@pytest.mark.parametrize("command", ["compare", "train", "evaluate", "cache", "certify", "tune"])
def test_every_command_with_weights_offers_trust_weights_and_says_it_runs_code(command):
    import typer

    options = {o: p for p in typer.main.get_command(app).commands[command].params for o in p.opts}
    assert "--weights" in options
    assert "this runs code embedded in the file" in options["--trust-weights"].help


# ---------------------------------------------------------------- report.md escapes names and errors

HOSTILE_METHOD = "<img src=x onerror=alert(1)>|*x*_[a](b)\\\n# not a heading"
HOSTILE_ERROR = "boom <script>alert(1)</script>\nsecond line | `code` & more"


def test_markdown_blocks_escape_html_pipes_newlines_backslashes_and_links(tmp_path):
    image = tmp_path / "reliability" / "a b(1)[x]<y>.png"
    blocks = [
        Heading("run of " + HOSTILE_METHOD),
        Text(HOSTILE_ERROR),
        Table(["method", "status"], [[HOSTILE_METHOD, HOSTILE_ERROR]], bold={(0, 0)}),
        Image(image, "caption ](javascript:x) <b>"),
    ]
    md = render_markdown(blocks, tmp_path)
    escaped_method = "&lt;img src=x onerror=alert(1)&gt;\\|\\*x\\*\\_\\[a\\](b)\\\\ # not a heading"
    escaped_error = "boom &lt;script&gt;alert(1)&lt;/script&gt; second line \\| \\`code\\` &amp; more"
    assert md.splitlines() == [
        f"## run of {escaped_method}",
        "",
        escaped_error,
        "",
        "| method | status |",
        "|---|---|",
        f"| **{escaped_method}** | {escaped_error} |",
        "",
        "![caption \\](javascript:x) &lt;b&gt;](reliability/a%20b%281%29%5Bx%5D%3Cy%3E.png)",
    ]
    page = render_html(blocks[:3], "t")
    assert "<img src=x" not in page and "<script>" not in page and "&lt;script&gt;" in page


def test_report_md_of_a_hostile_results_file_shows_it_as_text(tmp_path):
    rows = []
    for method, status, error in (("zero-shot", "ok", ""), (HOSTILE_METHOD, "failed", HOSTILE_ERROR)):
        row = {"model": "tiny", "dataset": "synthetic", "method": method, "seed": 1, "config": "c", "status": status}
        row.update({k: 0.5 for k in METRICS}, ece_ci_low=0.4, ece_ci_high=0.6, error=error)
        rows.append(row)
    atomic.write_csv_atomic(rows, tmp_path / "results.csv", RESULT_COLUMNS)
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "report.md").read_text()
    assert "<img" not in md and "<script>" not in md and not any(line.startswith("# not") for line in md.splitlines())
    (run,) = [line for line in md.splitlines() if "failed: boom" in line]
    assert run.startswith("| tiny | synthetic | &lt;img src=x onerror=alert(1)&gt;\\|\\*x\\*")
    assert run.endswith("| failed: boom &lt;script&gt;alert(1)&lt;/script&gt; second line \\| \\`code\\` &amp; more |")
    assert len(re.findall(r"(?<!\\)\|", run)) == 9  # 8 columns: the escaped pipes do not split cells
