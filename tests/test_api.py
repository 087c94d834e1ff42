"""The public API: ``import calbench``, its lazily loaded names, and the README's Python snippet run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import calbench
from calbench.errors import CalbenchError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_version_and_public_names():
    assert re.fullmatch(r"\d+\.\d+\.\d+", calbench.__version__)
    from importlib.metadata import version

    assert version("calbench") == calbench.__version__  # pyproject reads it from calbench/__init__.py
    for name in calbench.__all__:
        assert getattr(calbench, name) is not None
    assert calbench.metrics.ece is calbench.evaluate.__globals__["ece"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        calbench.nope  # noqa: B018


def test_importing_calbench_loads_nothing_heavy():
    script = "import sys, calbench; calbench.__version__; print(sorted(m for m in ('torch', 'optuna', 'open_clip') if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
        == "[]"
    )


def _readme_python() -> str:
    section = README.read_text(encoding="utf-8").split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.e2e
def test_the_readme_snippet_runs_as_written(cache_dir, capsys):
    code = _readme_python()
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the documented snippet, verbatim
    printed = capsys.readouterr().out
    metrics = namespace["calbench"].evaluate(
        namespace["method"].predict_proba(namespace["session"].test_features(namespace["method"])),
        namespace["session"].test_labels,
    )
    assert printed.strip() == str(metrics)
    assert 0.2 < metrics["accuracy"] <= 1.0 and np.isfinite(metrics["ece"])


def test_session_hands_out_train_pool_data_only(cache_dir):
    session = calbench.Session("tiny", "synthetic", calbench.RunContext(device="cpu", cache_dir=cache_dir))
    fewshot = calbench.FewShot(shots=4, views=2)
    fit = session.fit_data(1, fewshot)
    train_idx, val_idx = session.split(1, fewshot)
    assert fit.train_features.shape == (2, 24, 128) and fit.val_features.shape == (24, 128)
    assert not set(train_idx) & set(val_idx)
    assert session.fit_data(1, fewshot) is fit  # fetched once per split
    assert session.test_features().shape == (len(session.test_labels), 128)
    smoothed = calbench.make_method("promptsmooth", n_samples=3)
    with_copies = session.fit_data(1, fewshot, smoothed, score_val=True)
    assert set(with_copies.extra) == {*smoothed.capabilities.fit_features, "val-as-test"}
    assert session.test_features(smoothed).shape == (3, len(session.test_labels), 128)
    with pytest.raises(CalbenchError, match="--shots must be at least 1"):
        calbench.FewShot(shots=0)
