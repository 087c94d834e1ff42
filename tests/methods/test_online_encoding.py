"""``--online-encoding``: the image encoder in the training loop trains the prompt the cached views train."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from calbench.cli.app import app
from calbench.methods import make_method
from calbench.online_encoding import OnlineViews
from calbench.session import FewShot, RunContext, Session


def test_online_encoding_trains_the_prompt_cached_views_train(cache_dir):
    session = Session("tiny-random", "synthetic", RunContext(device="cpu", cache_dir=cache_dir))
    fewshot = FewShot(shots=2, views=3)
    params = {"epochs": 3, "batch_size": 4, "lr": 0.5, "n_ctx": 4}
    cached = make_method("calibprompt", **params)
    cached.fit(session.fit_data(1, fewshot, cached))
    online = make_method("calibprompt", **params)
    data = session.fit_data(1, fewshot, online, online=True)
    assert isinstance(data.train_features, OnlineViews)
    # epoch e encodes view e now: the very features the cache holds as view e
    views = session.fit_data(1, fewshot, cached).train_features
    rows = torch.tensor([3, 0, 5])
    torch.testing.assert_close(data.train_features.batch(2, rows), views[2][rows], rtol=0, atol=1e-5)
    online.fit(data)
    assert len(online.history) == 3
    torch.testing.assert_close(online.learner.ctx, cached.learner.ctx, rtol=0, atol=1e-5)
    assert (online.learner.ctx - make_method("calibprompt", **params).training_run(data).learner.ctx).abs().max() > 1e-3


@pytest.mark.e2e
def test_train_online_encoding_caches_one_view_not_one_per_epoch(tmp_path, cache_dir):
    """`calbench train --online-encoding`: the prompt trains with the encoder in the loop; the cache holds
    the validation images and a single training view, not the 3 a cached run of 3 epochs reads."""
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"coop-ce": {"epochs": 3, "n_ctx": 4}}))
    args = ["train", "--method", "coop-ce", "--model", "tiny-random", "--params", str(params), "--cache-dir"]
    result = CliRunner().invoke(app, [*args, str(tmp_path / "c"), "--out", str(tmp_path / "p"), "--online-encoding"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "coop-ce-tiny-random-synthetic-seed1.safetensors").is_file()
    views = {p.name.split("-train-")[1].split("-")[0] for p in (tmp_path / "c" / "features").glob("*-train-train*")}
    assert views == {"train0"}
