"""`certify`: certified accuracy of a smoothed classifier on a seeded test subset (Cohen et al., ICML 2019).

The method is fitted on few-shot train/validation features only, as in ``compare``;
the test split is read here for the final numbers and nowhere else. Each test image's
n0 selection and n estimation samples are cached noisy views, two independent draws
(transform kinds ``select-noise<sigma>`` and ``estimate-noise<sigma>``), classified by the
method's base classifier. Methods that tune at test time (``adapt``) tune first on their
own adaptation copies (``adapt-noise<sigma>``, a third draw), so the base classifier is
fixed before its votes are drawn. The defaults (n0 100, n 10000, alpha 0.001, 500 images)
are the published PromptSmooth certification's (the ``certify`` section of the table).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from scipy.stats import norm
from torch import Tensor

from calbench import streams
from calbench.atomic import write_csv_atomic
from calbench.base import Method, base_of
from calbench.cache import CacheStats
from calbench.calibprompt import PromptMethod
from calbench.data.transforms import noise_kind
from calbench.errors import CalbenchError, check_seed
from calbench.methods import METHODS, ResolvedMethod, parse_method, resolve
from calbench.published import default
from calbench.randomized_smoothing import DEFAULT_RADII, certified_accuracy, certify_predictions
from calbench.results import open_folder, put_certification
from calbench.session import FewShot, RunContext, Session

ITEM_COLUMNS = ["index", "label", "predicted", "radius", "correct"]
#: cached views classified per chunk, bounding memory at (chunk, subset, D) features
VIEW_CHUNK = 100


@dataclass
class CertifyResult:
    accuracy: dict[float, float]
    abstain_rate: float
    labels: np.ndarray
    predicted: np.ndarray
    radii: np.ndarray
    shots: int
    path: Path
    items_path: Path
    stats: CacheStats
    seconds: float


def certify_subset(n_test: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` test images drawn without replacement, reproducible from ``seed``."""
    rng = streams.rng("certify-subset", seed)
    return np.sort(rng.choice(n_test, size=min(size, n_test), replace=False))


def _build(resolved: ResolvedMethod, sigma: float) -> Method:
    """The method, with --sigma as its smoothing noise when it is a smoothed classifier (whose own
    parameters include ``sigma``: PromptSmooth's)."""
    smoothed = "sigma" in METHODS.get(resolved.base).params
    return (resolved.with_overrides(sigma=sigma) if smoothed else resolved).build()


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return from n estimation samples: with all n votes for the top
    class the one-sided Clopper-Pearson bound is Beta(alpha; n, 1) = alpha^(1/n), so the radius is at
    most sigma * Phi^-1(alpha^(1/n)); 0 when even that bound is below 1/2 (it always abstains)."""
    bound = alpha ** (1.0 / n)
    return float(sigma * norm.ppf(bound)) if bound >= 0.5 else 0.0


def base_votes(
    session: Session, method: Method, chosen: np.ndarray, sigma: float, n0: int, n: int
) -> tuple[Tensor, Tensor]:
    """(n0, subset) selection and (n, subset) estimation labels of the base classifier on cached noisy
    views of the chosen test images: two independent draws, as CERTIFY needs.

    A method that tunes at test time tunes on its own adaptation copies first (another draw), so
    its base classifier is fixed before the votes are drawn.
    """
    adapt = method.capabilities.adapt_copies
    with torch.no_grad():
        if adapt is not None:
            classify: Callable[[Tensor], Tensor] = base_of(method).adapt(
                session.test_views(adapt.kind, range(int(adapt.views or 0)), chosen)
            )
        else:
            classify = lambda views: torch.stack([method.base_logits(view) for view in views])  # noqa: E731

        def labels(role: str, count: int) -> Tensor:
            kind = noise_kind(sigma, role)
            chunks = [range(first, min(first + VIEW_CHUNK, count)) for first in range(0, count, VIEW_CHUNK)]
            return torch.cat([classify(session.test_views(kind, c, chosen)).argmax(dim=-1).cpu() for c in chunks])

        return labels("select", n0), labels("estimate", n)


def _check(sigma: float, n: int, n0: int, alpha: float, subset: int, seed: int) -> None:
    for name, value in (("--n", n), ("--n0", n0), ("--subset", subset)):
        if value < 1:
            raise CalbenchError(f"{name} must be at least 1, got {value}")
    if not 0 < sigma < math.inf:
        raise CalbenchError(f"--sigma must be a positive finite number, got {sigma}")
    check_seed(seed, "--seed")
    if not 0 < alpha < 1:
        raise CalbenchError(f"--alpha must be in (0, 1), got {alpha}")


def run_certify(
    model: str = "tiny",
    data: str = "synthetic",
    method: str = "promptsmooth",
    sigma: float = default("certify", "sigma"),
    n: int = default("certify", "n"),
    n0: int = default("certify", "n0"),
    alpha: float = default("certify", "alpha"),
    subset: int = default("certify", "subset"),
    seed: int = 1,
    shots: Optional[int] = None,
    fewshot: FewShot = FewShot(),
    context: RunContext = RunContext(),
    out: Path = Path("results"),
    params: Optional[dict[str, Any]] = None,
    radii: tuple[float, ...] = DEFAULT_RADII,
) -> CertifyResult:
    """Fit ``method`` on one few-shot split, certify a test subset, merge the rows into ``out``/certification.csv.

    ``shots`` defaults to the method's own recommendation (``TrainConfig.shots``: 16 for
    PromptSmooth, else 8); ``fewshot`` gives the validation shots and views. Per-image
    results go to ``out``/certify/<run>.csv.
    """
    start = time.perf_counter()
    _check(sigma, n, n0, alpha, subset, seed)
    parse_method(method)
    open_folder(Path(out))  # a file or read-only folder in the way fails before any work
    smoothed = _build(resolve(method, model, data, params), sigma)
    base = base_of(smoothed)  # a prompt method's config names its paper's shots (PromptSmooth: 16)
    own = base.config.shots if isinstance(base, PromptMethod) else fewshot.shots
    fewshot = replace(fewshot, shots=shots if shots is not None else own)

    session = Session(model, data, context)
    smoothed.fit(session.fit_data(seed, fewshot, smoothed))
    labels = session.test_labels
    chosen = certify_subset(len(labels), subset, seed)
    selection, estimation = base_votes(session, smoothed, chosen, sigma, n0, n)
    predicted, radius = certify_predictions(selection, estimation, session.dataset.n_classes, sigma, alpha)
    accuracy = certified_accuracy(predicted, radius, labels[chosen], radii)
    abstain = float(np.mean(predicted == -1))

    run = {"model": model, "dataset": session.dataset.name, "method": method, "seed": seed, "shots": fewshot.shots}
    run.update({"sigma": float(sigma), "n0": n0, "n": n, "alpha": float(alpha), "subset": len(chosen)})
    rows = [{**run, "radius": r, "certified_accuracy": acc, "abstain_rate": abstain} for r, acc in accuracy.items()]
    path = put_certification(Path(out), rows)
    items_path = _write_items(Path(out), run, chosen, labels[chosen], predicted, radius)
    seconds = time.perf_counter() - start
    return CertifyResult(
        accuracy,
        abstain,
        labels[chosen],
        predicted,
        radius,
        fewshot.shots,
        path,
        items_path,
        session.cache.stats,
        seconds,
    )


def _write_items(
    out: Path, run: dict[str, Any], chosen: np.ndarray, labels: np.ndarray, predicted: np.ndarray, radius: np.ndarray
) -> Path:
    """Per-image results of one certification run: index, label, prediction, radius, correctness."""
    method = str(run["method"]).replace("+", "_")
    path = (
        out
        / "certify"
        / f"{method}-{run['model']}-{run['dataset']}-sigma{run['sigma']:g}-n{run['n']}-seed{run['seed']}.csv"
    )
    items = [
        {"index": int(i), "label": int(y), "predicted": int(p), "radius": float(r), "correct": int(p == y)}
        for i, y, p, r in zip(chosen, labels, predicted, radius)
    ]
    write_csv_atomic(items, path, ITEM_COLUMNS)
    return path
