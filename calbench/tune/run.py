"""The whole `calbench tune`: search, best_params.json, one final test, and the report."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from calbench.atomic import write_text_atomic
from calbench.compare import CompareRequest, Grid, run_compare
from calbench.errors import CalbenchError, check_seeds, warn
from calbench.results import ResultsStore, Row
from calbench.session import RunContext
from calbench.tune.config import TuneConfig
from calbench.tune.report import write_tune_report
from calbench.tune.report_verdict import worse_on_test
from calbench.tune.space import method_params, reference_params
from calbench.tune.storage import default_storage
from calbench.tune.study import SearchResult, best_params_document, search


def final_test(
    result: SearchResult, best: Mapping[str, Any], seeds: Sequence[int], out: Path, context: RunContext = RunContext()
) -> list[Row]:
    """Score the tuned setting once on the test split, next to CoOp-CE and the hand-set setting.

    Rows are labelled ``<method>:tuned`` and ``<method>:paper`` (or ``:default``) and merged
    into ``out``/results.csv; each setting's own runs live under ``out``/final/<pair>/. When the
    search kept the hand-set setting, it is trained once and its rows carry both labels.
    """
    c = result.config
    rows: list[Row] = []
    epochs = method_params({}, c.epochs)
    single = context if len(c.pairs) == 1 else replace(context, weights=None)
    for model, data in c.pairs:
        folder = Path(out) / "final" / f"{model}-{data}"
        label, ref = reference_params(c.method, (model, data), c.space)
        settings = {
            "tuned": Grid(
                ["coop-ce", c.method],
                seeds,
                c.fewshot,
                method_params={"coop-ce": epochs, c.method: dict(best["params"])},
            ),
            label: Grid([c.method], seeds, c.fewshot, method_params={c.method: method_params(ref, c.epochs)}),
        }
        kept = dict(best["params"]) == method_params(ref, c.epochs)
        for name, grid in settings.items():
            if kept and name == label:
                rows += [
                    {**row, "method": f"{c.method}:{label}"} for row in rows if row["method"] == f"{c.method}:tuned"
                ]
                continue
            run = run_compare(CompareRequest(grid, model, data, context=single, out=folder / name))
            if run.failures:
                first = run.failures[0]
                raise CalbenchError(
                    f"final test run failed: {first['method']} (seed {first['seed']}): {first['error']}"
                )
            rows += [{**row, "method": f"{c.method}:{name}"} if row["method"] == c.method else row for row in run.rows]
    ResultsStore(Path(out)).put_rows(rows)
    return rows


@dataclass
class TuneRun:
    search: SearchResult
    out: Path
    best_params: Optional[Path] = None
    test_rows: list[Row] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)


def default_study_name(method: str, pairs: Sequence[tuple[str, str]], modality: Optional[str]) -> str:
    return f"{method}/modality/{modality}" if modality else f"{method}/{pairs[0][0]}/{pairs[0][1]}"


def study_home(config: TuneConfig, study_name: Optional[str], out: Optional[Path]) -> tuple[str, Path]:
    """The study's name and output folder: as given, else <method>/<model>/<dataset> and results/tune/<name>."""
    name = study_name or default_study_name(config.method, config.pairs, config.modality)
    return name, Path(out) if out is not None else Path("results") / "tune" / name.replace("/", "-")


def modality_pairs(modality: str, data_root: Optional[Path]) -> list[tuple[str, str]]:
    """Every (model, dataset) of one modality whose weights and data are present."""
    from calbench.data import DATASETS
    from calbench.data import availability as data_available
    from calbench.models import MODELS
    from calbench.models import availability as model_available

    models = [m for m in MODELS if MODELS.get(m).modality == modality and not MODELS.get(m).variant_of]
    datasets = [d for d in DATASETS if DATASETS.get(d).modality == modality]
    if not models or not datasets:
        known = sorted({MODELS.get(m).modality for m in MODELS} & {DATASETS.get(d).modality for d in DATASETS})
        raise CalbenchError(
            f"no models and datasets of modality {modality!r}; modalities with both: {', '.join(known)}"
        )
    pairs = [(m, d) for m in models if model_available(m)[0] for d in datasets if data_available(d, data_root)[0]]
    if not pairs:
        raise CalbenchError(
            f"no {modality} model and dataset are available offline; see `calbench models` and `calbench datasets`"
        )
    return pairs


@dataclass(frozen=True)
class TuneRequest:
    """One `calbench tune`: what to search (``config``), how many trials, where the study and results live,
    the final test's seeds and the run context; passed whole to every path that runs it (this process,
    worker jobs, the final job)."""

    config: TuneConfig = field(default_factory=TuneConfig)
    trials: int = 50
    study: Optional[str] = None  # default: <method>/<model>/<dataset> (default_study_name)
    storage: Optional[str] = None  # default: OUT/study.db
    out: Optional[Path] = None  # default: results/tune/<study>
    final_seeds: Sequence[int] = (1, 2, 3)
    search_only: bool = False
    context: RunContext = RunContext()
    heartbeat: int = 10  # seconds between trial heartbeats
    sampler_seed: Optional[int] = None

    def home(self) -> TuneRequest:
        """The request with its study name and output folder filled in (created), and the seeds checked."""
        check_seeds(self.final_seeds, "--final-seeds")  # before the search, not after it
        name, out = study_home(self.config, self.study, self.out)
        out.mkdir(parents=True, exist_ok=True)
        return replace(self, study=name, out=out)


def run_tune(request: TuneRequest) -> TuneRun:
    """Search on validation only; then (unless ``search_only``) write best_params.json, test the
    best and the hand-set settings once, and write report.md / report.html."""
    r = request.home()
    config, out, context = r.config, Path(str(r.out)), r.context
    storage = r.storage or default_storage(out)
    result = search(config, r.trials, str(r.study), storage, context, r.heartbeat, r.sampler_seed)
    run = TuneRun(result, out)
    if r.search_only:
        return run
    document = best_params_document(result)
    run.best_params = out / "best_params.json"
    write_text_atomic(run.best_params, json.dumps(document, indent=2) + "\n")
    run.test_rows = final_test(result, document, r.final_seeds, out, context)
    hand = f"{config.method}:{reference_params(config.method, config.pairs[0], config.space)[0]}"
    warning = worse_on_test(run.test_rows, config.method, hand)
    if warning:
        warn(warning)
    run.reports = list(write_tune_report(result, document, run.test_rows, out))
    return run
