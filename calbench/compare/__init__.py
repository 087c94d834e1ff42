"""`calbench compare`: a grid of methods and seeds on (model, dataset) pairs, fitted on few-shot
features and scored once each on the test split.

- :mod:`~calbench.compare.grid`: what runs (:class:`Grid`) and where (:class:`CompareRequest`, the pairs);
- :mod:`~calbench.compare.pair`: one pair's runs, each method resolved once and fitted once per seed;
- :mod:`~calbench.compare.run`: the one run path, one launcher job per pair writing its results shard;
- :mod:`~calbench.compare.plots`: the reliability diagrams of a grid.

Methods only ever receive :class:`~calbench.base.FitData` (few-shot train views and validation
images from the train pool); the test split is read through :meth:`Session.test_features`, to
score methods that are already fitted.
"""

from calbench.compare.grid import CompareRequest, Grid, plan_grid
from calbench.compare.pair import compare_pair, dataset_identity, degenerate_reason, failed, score
from calbench.compare.plots import reliability_plots
from calbench.compare.run import CompareResult, PairRun, describe_failure, run_compare, run_pair

__all__ = [
    "CompareRequest",
    "CompareResult",
    "Grid",
    "PairRun",
    "compare_pair",
    "dataset_identity",
    "degenerate_reason",
    "describe_failure",
    "failed",
    "plan_grid",
    "reliability_plots",
    "run_compare",
    "run_pair",
    "score",
]
