import numpy as np
import pytest

from calbench import streams
from calbench.metrics import bootstrap_ece, ece


def _probs(seed: int, n: int = 200, c: int = 4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, rng.integers(0, c, n)


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_bootstrap_equals_the_resampling_loop(seed):
    probs, labels = _probs(seed)
    low, high = bootstrap_ece(probs, labels, n_boot=300, seed=7)
    draws = streams.rng("bootstrap", 7).integers(0, len(labels), size=(300, len(labels)))  # its own stream
    values = [ece(probs[d], labels[d]) for d in draws]
    assert (low, high) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])), abs=1e-12)
    assert low < ece(probs, labels) < high


def test_interval_is_seeded():
    probs, labels = _probs(2)
    assert bootstrap_ece(probs, labels, 200, seed=3) == bootstrap_ece(probs, labels, 200, seed=3)
    assert bootstrap_ece(probs, labels, 200, seed=3) != bootstrap_ece(probs, labels, 200, seed=4)


def test_resamples_drawn_in_blocks_are_the_resamples_drawn_at_once(monkeypatch):
    """Memory stays bounded at any resample count: blocks of the generator's stream are its draws at once."""
    import calbench.metrics

    probs, labels = _probs(3)
    at_once = bootstrap_ece(probs, labels, 250, seed=5)
    monkeypatch.setattr(calbench.metrics, "_BOOTSTRAP_CHUNK", 3 * len(labels) + 1)  # blocks of 3 resamples
    assert bootstrap_ece(probs, labels, 250, seed=5) == at_once


@pytest.mark.parametrize("resamples", [100_000_000, 100_001, -1])
def test_a_resample_count_outside_its_range_is_one_line(resamples):
    from calbench.compare import Grid
    from calbench.errors import CalbenchError

    with pytest.raises(
        CalbenchError, match=rf"--bootstrap takes 0 \(no interval\) to 100000 resamples, got {resamples}"
    ):
        Grid(bootstrap=resamples).check()
    with pytest.raises(ValueError, match="n_boot must be in"):
        bootstrap_ece(*_probs(0), n_boot=max(resamples, 0))
