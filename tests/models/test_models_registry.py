"""The model registry as a user meets it: listing, where weights come from, and the missing-weights error."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import open_clip
import pytest
import torch
from typer.testing import CliRunner

from calbench.cli.app import app
from calbench.errors import CalbenchError
from calbench.models import MODELS, availability, load_vlm
from calbench.models.open_clip_backend import shipped_config

MED_VLMS = {"plip": "histopathology", "quiltnet": "histopathology", "biomedclip": "radiology", "medclip": "radiology"}
runner = CliRunner()


def test_every_family_is_registered_with_what_users_need():
    for name, modality in {
        **MED_VLMS,
        "clip-b32": "general",
        "clip-b16": "general",
        "quiltnet-b16": "histopathology",
    }.items():
        spec = MODELS.get(name)
        assert (
            spec.modality == modality and spec.resolution == 224 and spec.license and spec.template_family == modality
        )
        assert spec.source.startswith(("hf-hub:", "https://"))
    assert MODELS.get("biomedclip").source == "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def _open_clip_folder(folder: Path) -> open_clip.CLIP:
    """A 1-layer model in open_clip's Hub layout (open_clip_config.json + open_clip_pytorch_model.bin)."""
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
    }
    model = open_clip.CLIP(**config)
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    return model


@pytest.mark.e2e
def test_missing_weights_are_one_line_naming_the_model_the_places_and_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv("CALBENCH_WEIGHTS", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("torch.hub._hub_dir", str(tmp_path / "torch"))
    for name in MED_VLMS:
        with pytest.raises(CalbenchError) as info:
            load_vlm(name)
        message = str(info.value)
        assert "\n" not in message and f"model {name!r}" in message
        assert f"$CALBENCH_WEIGHTS/{name}" in message and f"calbench models fetch {name}" in message
        assert availability(name) == (
            False,
            f"run `calbench models fetch {name}` or download {MODELS.get(name).sources[0].hint()} into $CALBENCH_WEIGHTS/{name}/",
        )
    result = runner.invoke(app, ["compare", "--model", "quiltnet", "--data", "synthetic"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_calbench_weights_folder_is_found_and_listed(monkeypatch, tmp_path):
    folder = tmp_path / "quiltnet"
    model = _open_clip_folder(folder)
    monkeypatch.setenv("CALBENCH_WEIGHTS", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert availability("quiltnet") == (True, str(folder))
    vlm = load_vlm("quiltnet")
    torch.testing.assert_close(vlm.model.logit_scale, model.logit_scale)
    listing = runner.invoke(app, ["models"])
    assert listing.exit_code == 0
    rows = {line.split("│")[1].strip(): line for line in listing.output.splitlines() if line.count("│") > 3}
    assert "yes" in rows["quiltnet"] and "no" in rows["plip"].split("│")[-2]
    assert "calbench models fetch NAME" in listing.output


def test_the_hub_cache_is_read_offline(monkeypatch, tmp_path):
    """A model fetched earlier (huggingface_hub's cache layout) loads with HF_HUB_OFFLINE=1 and no CALBENCH_WEIGHTS."""
    monkeypatch.delenv("CALBENCH_WEIGHTS", raising=False)
    cache = tmp_path / "hub"
    repo = cache / "models--wisdomik--QuiltNet-B-16"
    model = _open_clip_folder(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert availability("quiltnet-b16") == (True, str(repo / "snapshots" / "0123abcd"))
    assert availability("quiltnet")[0] is False
    vlm = load_vlm("quiltnet-b16")
    torch.testing.assert_close(vlm.model.token_embedding.weight, model.token_embedding.weight, atol=0, rtol=0)


def test_wrong_weights_fail_strictly(tmp_path):
    torch.save({"visual.proj": torch.zeros(2, 2)}, tmp_path / "bad.bin")
    (tmp_path / "missing").mkdir()
    with pytest.raises(CalbenchError, match="has none of open_clip_model.safetensors"):
        load_vlm("quiltnet", weights=tmp_path / "missing")
    with pytest.raises(CalbenchError, match="do not fit model 'quiltnet': .* missing keys"):
        load_vlm("quiltnet", weights=tmp_path / "bad.bin")
    with pytest.raises(CalbenchError, match="--weights .* does not exist"):
        load_vlm("medclip", weights=tmp_path / "nowhere")


def test_fetch_refuses_politely_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["models", "fetch", "plip"])
    assert result.exit_code == 2 and "HF_HUB_OFFLINE is set" in result.output


@pytest.mark.parametrize(
    "name,open_clip_name",
    [
        ("quiltnet-b32", "ViT-B-32"),
        ("quiltnet-b16", "ViT-B-16"),
        ("clip-b32", "ViT-B-32-quickgelu"),
        ("clip-b16", "ViT-B-16-quickgelu"),
    ],
)
def test_shipped_open_clip_architectures_are_open_clips_own(name, open_clip_name):
    ours = shipped_config(name)["model_cfg"]
    theirs = open_clip.get_model_config(open_clip_name)
    assert ours == theirs


@pytest.mark.e2e
def test_compare_runs_on_a_replica_saved_in_plips_published_format(tmp_path, cache_dir):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path / "plip")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "compare",
            "--model",
            "plip",
            "--weights",
            str(tmp_path / "plip"),
            "--data",
            "synthetic",
            "--methods",
            "zero-shot,coop-ce",
            "--seeds",
            "1",
            "--shots",
            "2",
            "--views",
            "1",
            "--out",
            str(out),
            "--cache-dir",
            str(cache_dir / "plip-replica"),
        ],
    )
    assert result.exit_code == 0, result.output
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["zero-shot", "coop-ce"] and {r["model"] for r in rows} == {"plip"}


def test_medclip_from_the_url_download_folder_and_the_hub_tokenizer(monkeypatch, tmp_path):
    """After `calbench models fetch medclip`: the unzipped checkpoint under TORCH_HOME, the tokenizer in the HF cache."""
    from test_backends import _medclip

    monkeypatch.delenv("CALBENCH_WEIGHTS", raising=False)
    monkeypatch.setattr("torch.hub._hub_dir", str(tmp_path / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    assert availability("medclip")[0] is False
    folder = tmp_path / "torch" / "calbench" / "medclip-vit"
    _medclip(folder)
    (folder / "vocab.txt").rename(tmp_path / "vocab.txt")  # the published zip has no tokenizer
    assert availability("medclip")[0] is False
    with pytest.raises(CalbenchError, match="no tokenizer found"):
        load_vlm("medclip")
    snapshot = tmp_path / "hub" / "models--emilyalsentzer--Bio_ClinicalBERT" / "snapshots" / "f00d"
    snapshot.mkdir(parents=True)
    (tmp_path / "vocab.txt").rename(snapshot / "vocab.txt")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("f00d")
    assert availability("medclip") == (True, str(folder))
    vlm = load_vlm("medclip")
    # [CLS] a photo of x [SEP], padded to 25 as published (CalibPrompt trainers/classification/coop_medclip.py:90)
    assert vlm.tokenize(["a photo of x"]).ids.tolist() == [[2, 5, 6, 7, 9, 3] + [0] * 19]
    # the published CalibPrompt code uses exp(log-scale) unclamped (trainers/classification/coop_medclip.py:258)
    assert vlm.logit_scale == pytest.approx(float(torch.tensor(5.0).exp()), rel=1e-6)
    masked = load_vlm("medclip-masked")  # the variant finds the same downloaded weights
    assert masked.tokenize(["a photo of x"]).ids.tolist() == [[2, 5, 6, 7, 9, 3]]  # cut: padding is masked out
    # MedCLIP's own clamp of log-scale 5.0 to ln 100 (CalibPrompt models/medclip/modeling_medclip.py:229)
    assert masked.logit_scale == pytest.approx(100.0, rel=1e-4)
