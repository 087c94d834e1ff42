"""The demo shows the paper's effect (Basu et al., BMVC 2025): on the pre-trained ``tiny`` model and the
``synthetic`` dataset, over seeds 1, 2, 3 and with every method at its defaults, CoOp-CE beats zero-shot
but is overconfident; CalibPrompt keeps CoOp-CE's accuracy with a clearly lower ECE; temperature
scaling lowers CoOp-CE's ECE. This is the one test that the whole pipeline can make calibration better,
so it is also run with CalibPrompt reduced to plain cross-entropy, where it must fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calbench.compare import CompareRequest, Grid, run_compare
from calbench.results import ResultsStore
from calbench.session import RunContext

METHODS = ["zero-shot", "coop-ce", "coop-ce+ts", "calibprompt"]
SEEDS = [1, 2, 3]
CHANCE = 1 / 6
#: CalibPrompt without its label smoothing, SMAC and AS: CoOp's cross-entropy
PLAIN_CE = {"calibprompt": {"alpha": 0.0, "w_smac": 0.0, "w_as": 0.0}}


def demo_numbers(out: Path, context: RunContext, params: dict) -> dict[str, dict[str, np.ndarray]]:
    """Per method: accuracy, ECE and mean top-label confidence of each seed, from `compare`'s rows and predictions."""
    result = run_compare(
        CompareRequest(
            grid=Grid(METHODS, SEEDS, bootstrap=0, method_params=params), context=context, out=out, data="synthetic"
        )
    )
    store = ResultsStore(out)
    numbers: dict[str, dict[str, list[float]]] = {}
    for row in result.rows:
        assert row["status"] == "ok", row
        entry = numbers.setdefault(row["method"], {"accuracy": [], "ece": [], "confidence": []})
        entry["accuracy"].append(row["accuracy"])
        entry["ece"].append(row["ece"])
        entry["confidence"].append(float(store.predictions(row).max(axis=1).mean()))
    return {m: {k: np.asarray(v) for k, v in entry.items()} for m, entry in numbers.items()}


def effect_failures(n: dict[str, dict[str, np.ndarray]]) -> list[str]:
    """What the demo must show, with margins that hold on seeds 1-3 (empty: it shows all of it).

    The comparisons are of means over the three seeds, as the demo reports them: on single seeds,
    temperature scaling fitted on 8 validation images per class, and ECE on 900 test tiles, are
    noisy. Run on seeds 4-27 in threes (docs/demo.md; before each random draw had a stream of its own),
    every check holds; the closest calls are CoOp-CE's mean ECE 3.3 points above temperature
    scaling's (seeds 13-15), CalibPrompt's 1.8 points below CoOp-CE's (seeds 19-21) and CoOp-CE's
    confidence 5.0 points above its accuracy (seed 8). On seeds 1-3 today: CoOp-CE's ECE 9.0%,
    coop-ce+ts 4.1%, CalibPrompt 3.0%; CoOp-CE 8.3 to 9.6 points overconfident.
    """
    zs, ce, ts, cp = (n[m] for m in METHODS)
    checks = {
        "zero-shot is clearly above chance": zs["accuracy"].mean() > CHANCE + 0.25,
        "coop-ce is more accurate than zero-shot on every seed": (ce["accuracy"] > zs["accuracy"] + 0.03).all(),
        "coop-ce is overconfident on every seed": (ce["confidence"] - ce["accuracy"] > 0.03).all(),
        "coop-ce's ECE is well above coop-ce+ts's": ce["ece"].mean() > ts["ece"].mean() + 0.02,
        "calibprompt is about as accurate as coop-ce": abs(cp["accuracy"].mean() - ce["accuracy"].mean()) < 0.04,
        "calibprompt's ECE is below coop-ce's on most seeds": (cp["ece"] < ce["ece"] - 0.005).sum() >= 2,
        "calibprompt's mean ECE is clearly below coop-ce's": cp["ece"].mean() < ce["ece"].mean() - 0.015,
    }
    return [name for name, holds in checks.items() if not holds]


@pytest.mark.e2e
def test_the_demo_shows_the_papers_effect_and_would_show_its_absence(tmp_path, cache_dir):
    context = RunContext(device="cpu", cache_dir=cache_dir)
    numbers = demo_numbers(tmp_path, context, {})
    assert effect_failures(numbers) == []
    # the same grid with CalibPrompt as plain cross-entropy: only calibprompt is run again, and it is CoOp-CE
    plain = demo_numbers(tmp_path, context, PLAIN_CE)
    # equal up to float rounding: its loss is a soft-target cross-entropy, CoOp-CE's F.cross_entropy, and 50
    # epochs carry the last-bit differences into a few test confidences (measured: 5e-5 of ECE on seed 2)
    np.testing.assert_allclose(plain["calibprompt"]["ece"], plain["coop-ce"]["ece"], atol=1e-3)
    assert {
        "calibprompt's ECE is below coop-ce's on most seeds",
        "calibprompt's mean ECE is clearly below coop-ce's",
    } <= set(effect_failures(plain))
