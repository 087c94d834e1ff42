import warnings
from pathlib import Path

import pytest
import torch
from cli_checks import runner
from safetensors.torch import save_file
from torch import nn

from calbench.cli.app import app
from calbench.errors import CalbenchError
from calbench.models import list_models, load_vlm


def test_tiny_is_the_same_model_on_every_load(tiny):
    again = load_vlm("tiny")
    assert again.fingerprint == tiny.fingerprint
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.encode_images(pixels), tiny.encode_images(pixels), atol=0, rtol=0)


def test_features_are_normalised(tiny):
    image = tiny.encode_images(torch.randn(5, 3, 64, 64))
    text = tiny.encode_texts(["an H&E image of pale round nuclei.", "an H&E image of dark oval nuclei."])
    assert image.shape == (5, 128) and text.shape == (2, 128)
    torch.testing.assert_close(image.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(text.norm(dim=1), torch.ones(2))


def test_tiny_random_has_random_weights_from_seed_0_and_clips_initial_scale():
    random = load_vlm("tiny-random")
    assert random.fingerprint == load_vlm("tiny-random").fingerprint != load_vlm("tiny").fingerprint
    assert random.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)  # open_clip's initial value (CLIP's 0.07)
    assert random.encode_images(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_weights_file_round_trip_and_fingerprint(tiny, tmp_path):
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    save_file(state, str(tmp_path / "same.safetensors"))
    assert load_vlm("tiny", weights=tmp_path / "same.safetensors").fingerprint == tiny.fingerprint
    state["logit_scale"] = state["logit_scale"] + 1.0
    save_file(state, str(tmp_path / "changed.safetensors"))
    changed = load_vlm("tiny", weights=tmp_path / "changed.safetensors")
    assert changed.fingerprint != tiny.fingerprint  # new weights, new cache keys


def test_wrong_weights_are_a_clear_error(tmp_path):
    save_file({"nonsense": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(CalbenchError, match="do not fit model 'tiny'"):
        load_vlm("tiny", weights=tmp_path / "w.safetensors")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CalbenchError, match="cannot read weights file"):
        load_vlm("tiny", weights=tmp_path / "broken.pt")
    with pytest.raises(CalbenchError, match="does not exist"):
        load_vlm("tiny", weights=tmp_path / "missing.pt")


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(CalbenchError, match="unknown model 'plipp'; choose one of: .*tiny"):
        load_vlm("plipp")
    assert "tiny" in list_models()


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
