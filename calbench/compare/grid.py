"""What `compare` runs: the grid of methods and seeds per (model, dataset) pair, and the request that
names the pairs, where the runs happen and where their results go."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from calbench.compare.deferral_shift import DeferralShiftOptions
from calbench.errors import CalbenchError, check_seeds
from calbench.methods import DEFAULT_METHODS, ResolvedMethod, check_method_params, parse_method, resolve_grid
from calbench.metrics import MAX_RESAMPLES
from calbench.session import FewShot, RunContext


@dataclass(frozen=True)
class Grid:
    """What to run on each (model, dataset) pair and how to score it."""

    methods: Sequence[str] = tuple(DEFAULT_METHODS)
    seeds: Sequence[int] = (1, 2, 3)
    fewshot: FewShot = FewShot()
    n_bins: int = 10  # equal-width confidence bins of ECE and the diagrams (Guo et al., 2017)
    bootstrap: int = 1000  # resamples of each run's 95% ECE interval (0: none)
    method_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    force: bool = False  # recompute rows already in results.csv
    extras: DeferralShiftOptions = (
        DeferralShiftOptions()
    )  # deferral settings, --shift and smoothed diagrams (calbench.compare.deferral_shift)
    max_prompts: Optional[int] = None  # prompts per shared text-tower pass (None: calbench.batched's); 0: runs alone

    def check(self) -> None:
        """Reject a grid that cannot work, before any work, naming the option to fix."""
        if not self.methods:
            raise CalbenchError("--methods is empty; name at least one method, e.g. --methods coop-ce,calibprompt")
        for name in self.methods:
            parse_method(name)
        if not self.seeds:
            raise CalbenchError("--seeds is empty; give at least one seed, e.g. --seeds 1,2,3")
        check_seeds(self.seeds, "--seeds")
        for option, values in (("--methods", list(self.methods)), ("--seeds", list(self.seeds))):
            twice = sorted({str(v) for v in values if values.count(v) > 1})
            if twice:  # a repeat would count one run as two seeds and pool its predictions twice
                raise CalbenchError(f"{option} names {', '.join(twice)} more than once; name each once")
        if not 0 <= self.bootstrap <= MAX_RESAMPLES:
            raise CalbenchError(f"--bootstrap takes 0 (no interval) to {MAX_RESAMPLES} resamples, got {self.bootstrap}")
        check_method_params(self.method_params)
        self.extras.check()

    def resolve(self, model: str, dataset: str) -> dict[str, ResolvedMethod]:
        """Each method's settings on (model, dataset): published defaults under its base's ``--params``."""
        return resolve_grid(self.methods, model, dataset, self.method_params)


@dataclass(frozen=True)
class CompareRequest:
    """One `calbench compare`: the grid, the pairs it runs on, the run context and the results folder.

    The pairs are (``model``, ``data``), or every available pair of one modality with ``all_pairs``
    (``context.weights`` is then ignored: it belongs to one model), or ``pairs`` as given (any
    (model, dataset name or folder) pairs)."""

    grid: Grid = Grid()
    model: str = "tiny"
    data: str = "synthetic"
    all_pairs: bool = False
    context: RunContext = RunContext()
    out: Path = Path("results")
    pairs: Optional[Sequence[tuple[str, str]]] = None

    def plan(self) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
        """The (model, dataset) pairs to run and the skipped ones with what they miss."""
        if self.pairs is not None:
            return [tuple(p) for p in self.pairs], []  # type: ignore[misc]
        return plan_grid(self.all_pairs, self.model, self.data, self.context.data_root)

    @property
    def one_model(self) -> bool:
        """Whether every pair runs one model, so ``--weights`` applies to it."""
        if self.pairs is not None:
            return len({m for m, _ in self.pairs}) <= 1
        return not self.all_pairs


def plan_grid(
    all_pairs: bool, model: str, data: str, data_root: Optional[Path]
) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """The (model, dataset) pairs to run and the skipped ones with what they miss.

    ``--all`` pairs every registered model with every registered dataset of its modality.
    """
    if not all_pairs:
        return [(model, data)], []
    from calbench.data import DATASETS
    from calbench.data import availability as data_availability
    from calbench.models import MODELS
    from calbench.models import availability as model_availability

    run, skipped = [], []
    for m in (m for m in MODELS if not MODELS.get(m).variant_of):  # variants run only when named
        for d in DATASETS:
            if not DATASETS.get(d).in_grid or MODELS.get(m).modality != DATASETS.get(d).modality:
                continue
            missing = [hint for ok, hint in (model_availability(m), data_availability(d, data_root)) if not ok]
            (skipped.append((m, d, "; ".join(missing))) if missing else run.append((m, d)))
    return run, skipped
