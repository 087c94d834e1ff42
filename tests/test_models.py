import pytest
import torch
from safetensors.torch import save_file

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
