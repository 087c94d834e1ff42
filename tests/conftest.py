"""Shared fixtures. Tests never touch the network and never write outside tmp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from folders import class_copy

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """Each test starts with the thread count the one before it started with. A test that sets it (directly, or
    in-process through `--threads`) would otherwise change the float rounding of every later test, and tests
    that compare this process's numbers with another process's would pass or fail by the order they run in."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the session, so the synthetic dataset is written once."""
    path = tmp_path_factory.mktemp("calbench-cache")
    os.environ["CALBENCH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny():
    from calbench.models import load_vlm

    return load_vlm("tiny", device="cpu")


@pytest.fixture(scope="session")
def synthetic(cache_dir: Path):
    from calbench.data import load_dataset

    return load_dataset("synthetic", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def session(cache_dir: Path):
    """The tiny model on the synthetic dataset, reading the session's feature cache."""
    from calbench.session import RunContext, Session

    return Session("tiny", "synthetic", RunContext(device="cpu", cache_dir=cache_dir))


@pytest.fixture(scope="module")
def binary_folder(synthetic, tmp_path_factory):
    return class_copy(synthetic.root, tmp_path_factory.mktemp("binary") / "binary", 2)
