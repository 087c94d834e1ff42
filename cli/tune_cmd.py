"""`calbench tune`: Optuna search of a method's hyper-parameters on the validation split."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from calbench.cli.common import (
    app,
    console,
    parse_ints,
    results_table,
    user_errors,
)
from calbench.cli.launcher import (
    print_failed_jobs,
)
from calbench.cli.options import FEWSHOT, LAUNCHER, RUN, grouped
from calbench.published import default

ModelOpt = typer.Option(None, "--model", "-m", help="Model name (default: tiny); or use --modality.")
DataOpt = typer.Option(None, "--data", "-d", help="Dataset name or folder (default: synthetic); or use --modality.")
ModalityOpt = typer.Option(
    None, "--modality", help="Search one setting shared by every available (model, dataset) of this modality."
)
MethodOpt = typer.Option("calibprompt", "--method", help="The method whose hyper-parameters to search.")
TrialsOpt = typer.Option(
    50, "--trials", help="The study's total number of trials; a re-run adds only the missing ones."
)
ObjectiveOpt = typer.Option(
    "ece",
    "--objective",
    help="ece (validation ECE under the accuracy constraint), nll, aurc (area under the risk-coverage curve), "
    "conformal-size (mean conformal set size at 90% coverage), or pareto (ECE and accuracy).",
)
AccToleranceOpt = typer.Option(
    1.0, "--acc-tolerance", help="Accuracy points a trial may lose against CoOp-CE on the same validation split."
)
SplitSeedsOpt = typer.Option(
    None,
    "--split-seeds",
    help="Few-shot splits each trial is averaged over, e.g. 1,2,3 (default: at least "
    f"{default('tune', 'min_split_seeds')}, more until {default('tune', 'val_per_class')} validation predictions "
    f"per class, at most {default('tune', 'max_split_seeds')}).",
)
FoldsOpt = typer.Option(
    None,
    "--folds",
    help="Folds of each split a trial trains and validates on (default: every drawn image validated once, "
    "2 when --val-shots equals --shots; 1: the plain split).",
)
ValShiftOpt = typer.Option(
    None,
    "--val-shift",
    help="Also score each trial on corrupted validation copies: CORRUPTIONS[:SEVERITIES], e.g. stain:3 or "
    "stain,gaussian_blur:1,3 (stain, gaussian_blur, gaussian_noise, jpeg, brightness, contrast, all; none: off).",
)
ShiftObjectiveOpt = typer.Option(
    None, "--shift-objective", help="mean (default) or worst over the clean and shifted validation copies."
)
ConfidenceOpt = typer.Option(
    None,
    "--confidence",
    help="Bootstrap confidence a trial needs to replace the hand-set setting (and to be ruled below CoOp-CE); "
    f"default {default('tune', 'confidence')}.",
)
PrunerOpt = typer.Option("median", "--pruner", help="median, hyperband or none (single-objective studies only).")
SpaceOpt = typer.Option(None, "--space", help="YAML/JSON that narrows or extends the method's search space.")
EpochsOpt = typer.Option(
    None, "--epochs", help="Training epochs per trial and in the final test (default: the method's 50)."
)
StorageOpt = typer.Option(
    None,
    "--storage",
    help="Optuna storage URL (sqlite:///..., postgresql+psycopg://... with calbench[postgres], mysql://...) or a journal "
    "file as journal:PATH (default: OUT/study.db; with --launcher slurm: journal:OUT/study.log).",
)
StudyOpt = typer.Option(None, "--study", help="Study name (default: <method>/<model>/<dataset>).")
OutOpt = typer.Option(
    None,
    "--out",
    help="Folder for the study, best_params.json, results.csv and the reports (default: results/tune/<study>).",
)
FinalSeedsOpt = typer.Option("1,2,3", "--final-seeds", help="Seeds of the one test-split evaluation after the search.")
SearchOnlyOpt = typer.Option(
    False, "--search-only", help="Only run trials (cluster workers); a later run without it writes the results."
)
HeartbeatOpt = typer.Option(
    10,
    "--heartbeat",
    help="Seconds between trial heartbeats (database storages); a trial silent for 3x this is failed and retried.",
)
SamplerSeedOpt = typer.Option(
    None,
    "--sampler-seed",
    help="Seed of the TPE sampler: one worker then samples the same trials again, on any storage.",
)
WorkersOpt = typer.Option(
    1,
    "--workers",
    help="Search workers submitted as jobs sharing the study (with --launcher local-processes or slurm).",
)
ThreadsOpt = typer.Option(
    None, "--threads", help="CPU threads per process (give each of several workers on one machine its share)."
)
BatchTrialsOpt = typer.Option(
    1,
    "--batch-trials",
    help="Trials each worker asks for at once and trains together, one text-tower pass per step for all "
    "their prompts (keeps a GPU busy; each trial's result is as if run alone).",
)


@app.command()
@user_errors
@grouped(context=RUN, fewshot=FEWSHOT, jobs=LAUNCHER)
def tune(
    model: Optional[str] = ModelOpt,
    data: Optional[str] = DataOpt,
    modality: Optional[str] = ModalityOpt,
    method: str = MethodOpt,
    trials: int = TrialsOpt,
    objective: str = ObjectiveOpt,
    acc_tolerance: float = AccToleranceOpt,
    split_seeds: Optional[str] = SplitSeedsOpt,
    folds: Optional[int] = FoldsOpt,
    val_shift: Optional[str] = ValShiftOpt,
    shift_objective: Optional[str] = ShiftObjectiveOpt,
    confidence: Optional[float] = ConfidenceOpt,
    pruner: str = PrunerOpt,
    space: Optional[Path] = SpaceOpt,
    epochs: Optional[int] = EpochsOpt,
    storage: Optional[str] = StorageOpt,
    study: Optional[str] = StudyOpt,
    out: Optional[Path] = OutOpt,
    final_seeds: str = FinalSeedsOpt,
    search_only: bool = SearchOnlyOpt,
    heartbeat: int = HeartbeatOpt,
    sampler_seed: Optional[int] = SamplerSeedOpt,
    threads: Optional[int] = ThreadsOpt,
    batch_trials: int = BatchTrialsOpt,
    workers: int = WorkersOpt,
    *,
    context: Any,
    fewshot: Any,
    jobs: Any,
) -> None:
    """Search hyper-parameters on the validation split, then test the best setting once and write reports."""
    from calbench.errors import CalbenchError
    from calbench.tune import TuneConfig, TuneRequest, modality_pairs, read_space_file, run_tune

    if modality is not None and (model is not None or data is not None):
        raise CalbenchError("give either --modality or --model/--data, not both")
    _check_jobs(jobs, workers, threads)
    pairs = modality_pairs(modality, context.data_root) if modality else [(model or "tiny", data or "synthetic")]
    config = TuneConfig(
        method=method,
        pairs=pairs,
        modality=modality,
        objective=objective,
        acc_tolerance=acc_tolerance,
        **_sampling(fewshot, split_seeds, epochs),
        pruner=pruner,
        space=read_space_file(method, space) if space else {},
        batch_trials=batch_trials,
        **_judging(folds, val_shift, shift_objective, confidence),
    )
    final = parse_ints(final_seeds, "--final-seeds")
    request = TuneRequest(config, trials, study, storage, out, final, search_only, context, heartbeat, sampler_seed)
    run = _launched(request, jobs, workers, threads) if jobs.distributed else run_tune(request)
    _render(run)


def _check_jobs(jobs: Any, workers: int, threads: Optional[int]) -> None:
    """--workers needs worker jobs; --threads applies here when the search runs in this process."""
    from calbench.errors import CalbenchError

    if workers != 1 and not jobs.distributed:
        raise CalbenchError("--workers runs worker jobs: add --launcher local-processes or --launcher slurm")
    if threads is not None and not jobs.distributed:
        import torch

        torch.set_num_threads(max(1, threads))


def _sampling(fewshot: Any, split_seeds: Optional[str], epochs: Optional[int]) -> dict[str, Any]:
    """How each trial draws and trains on few-shot data: the few-shot options, split seeds and epochs."""
    seeds = parse_ints(split_seeds, "--split-seeds") if split_seeds else []
    return {
        "shots": fewshot.shots,
        "val_shots": fewshot.val_shots,
        "views": fewshot.views,
        "split_seeds": seeds,
        "epochs": epochs,
    }


def _judging(
    folds: Optional[int], val_shift: Optional[str], shift_objective: Optional[str], confidence: Optional[float]
) -> dict[str, Any]:
    """How trials are judged: the options given; the rest stay at TuneConfig's defaults (from the one table)."""
    from calbench.tune.config import parse_val_shift

    shift = parse_val_shift(val_shift) if val_shift is not None else None
    given = {"folds": folds, "val_shift": shift, "shift_objective": shift_objective, "confidence": confidence}
    return {k: v for k, v in given.items() if v is not None}


def _launched(request: Any, jobs: Any, workers: int, threads: Optional[int]) -> Any:
    """``workers`` search jobs on one study, then the final job; failed jobs are listed with their logs."""
    from calbench.tune.launch import launch_tune

    log = (lambda message: console.log(message)) if console.is_terminal else (lambda message: None)
    run = launch_tune(request, jobs, workers, threads, log)
    print_failed_jobs([f"job {o.job_id} (worker {o.index}) failed: {o.error}; log: {o.log}" for o in run.failed_jobs])
    return run


def _render(run: Any) -> None:
    """The search's pace, the best setting and the final test tables."""
    result = run.search
    minutes = result.seconds / 60
    pace = result.ran / minutes if minutes else 0
    console.print(
        f"study {result.study.study_name!r}: {len(result.trials)} trials in the study, {result.ran} run here in {result.seconds:.1f} s ({pace:.1f} per minute)"
    )
    if result.surplus:
        from calbench.tune.report import surplus_line

        console.print(surplus_line(result))
    if run.best_params is None:
        return
    best = result.best
    table = Table(title=f"best setting: trial {best.number}")
    table.add_column("parameter")
    table.add_column("value", justify="right")
    for name, value in best.params.items():
        table.add_row(name, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    if result.judged is not None:
        console.print(f"chosen by the rule: {result.judged.verdict.reason()}")
    for model_name, dataset in run.search.config.pairs:
        rows = [r for r in run.test_rows if r["model"] == model_name and r["dataset"] == dataset]
        if rows:
            console.print(results_table(rows, f"{model_name} · {dataset} · test split"))
    console.print(f"wrote {run.best_params}, {run.out / 'results.csv'}, " + " and ".join(str(p) for p in run.reports))
