"""`calbench compare` (fit, score, log and report a grid of methods) and `calbench report`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from calbench.cli.common import (
    DataOpt,
    ModelOpt,
    ParamsOpt,
    app,
    console,
    err_console,
    parse_ints,
    parse_names,
    read_params,
    results_table,
    user_errors,
)
from calbench.cli.deferral_view import (
    AlphaOpt,
    ShiftOpt,
    SmoothDiagramsOpt,
    TargetErrorOpt,
    deferral_table,
    extras,
    shift_table,
)
from calbench.cli.launcher import (
    print_failed_jobs,
)
from calbench.cli.options import FEWSHOT, LAUNCHER, RUN, grouped
from calbench.errors import CalbenchError

MethodsOpt = typer.Option(None, "--methods", help="Comma-separated method ids (default: the standard set).")
SeedsOpt = typer.Option("1,2,3", "--seeds", help="Comma-separated few-shot split / training seeds.")
OutOpt = typer.Option(Path("results"), "--out", help="Folder for results.csv, predictions, diagrams and the report.")
AllPairsOpt = typer.Option(False, "--all", help="Every available model x dataset pair of the same modality.")
EveryMethodOpt = typer.Option(
    False, "--all-methods", help="Every registered method (the default with --all unless --methods is given)."
)
ForceOpt = typer.Option(False, "--force", help="Recompute runs already in results.csv.")
BootstrapOpt = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for each run's 95% ECE interval (0: none).")


@app.command()
@user_errors
@grouped(context=RUN, fewshot=FEWSHOT, jobs=LAUNCHER)
def compare(
    model: str = ModelOpt,
    data: str = DataOpt,
    methods: Optional[str] = MethodsOpt,
    seeds: str = SeedsOpt,
    out: Path = OutOpt,
    params: Optional[Path] = ParamsOpt,
    all_pairs: bool = AllPairsOpt,
    every_method: bool = EveryMethodOpt,
    force: bool = ForceOpt,
    bootstrap: int = BootstrapOpt,
    shift: bool = ShiftOpt,
    conformal_alpha: float = AlphaOpt,
    target_error: float = TargetErrorOpt,
    smooth_diagrams: bool = SmoothDiagramsOpt,
    *,
    context: Any,
    fewshot: Any,
    jobs: Any,
) -> None:
    """Train and evaluate methods; print tables, append to results.csv, write the report.

    Runs already in OUT/results.csv with the same settings are reused, so an
    interrupted grid resumes where it stopped.
    """
    from calbench.compare import CompareRequest, Grid, describe_failure, run_compare

    grid = Grid(
        _chosen(methods, all_pairs or every_method),
        parse_ints(seeds, "--seeds"),
        fewshot,
        bootstrap=bootstrap,
        method_params=read_params(params),
        force=force,
        extras=extras(conformal_alpha, target_error, shift, smooth_diagrams),
    )
    log = (lambda message: console.log(message)) if console.is_terminal else (lambda message: None)
    result = run_compare(CompareRequest(grid, model, data, all_pairs, context, out), jobs, log, _skipped)
    print_failed_jobs([describe_failure(row) for row in result.failed_jobs])
    if result.failed_jobs and not result.rows:
        raise CalbenchError(f"all {len(result.failed_jobs)} job(s) failed; their logs are listed above")
    _render(result)


def _chosen(methods: Optional[str], every: bool) -> list[str]:
    """--methods, else every registered method (--all, --all-methods), else the standard set."""
    from calbench.methods import DEFAULT_METHODS, all_methods

    return parse_names(methods) if methods is not None else (all_methods() if every else list(DEFAULT_METHODS))


def _skipped(model: str, data: str, missing: str) -> None:
    err_console.print(f"[yellow]skipped[/] {model} · {data}: {missing}", highlight=False, soft_wrap=True)


def _render_deferral(out: Path, rows: list[dict[str, Any]], pair: str) -> None:
    """The deferral measures of a pair's runs and, where `--shift` scored them, their shift table."""
    from calbench.data.corruptions import CONDITIONS
    from calbench.results import ResultsStore, read_shift

    console.print(deferral_table(rows, f"{pair} · when to defer: fitted on validation, measured on test (mean)"))
    keys = {ResultsStore.key(r) for r in rows}
    shifted = [r for r in read_shift(out, CONDITIONS) if ResultsStore.key(r) in keys]
    if shifted:
        console.print(shift_table(rows, shifted, f"{pair} · Acc % / ECE % on corrupted test copies (mean)"))


def _render(result: Any) -> None:
    """Where features came from, one table per pair, failures, and what was written."""
    from calbench.report import write_results_report

    stats = result.stats
    if result.computed == 0:
        console.print(f"nothing to compute: every run is already in {result.out / 'results.csv'} (--force recomputes)")
    elif stats.encoded == 0:
        console.print(f"features: all {stats.loaded} read from the cache, no image encoded")
    else:
        console.print(f"features: {stats.encoded} image views encoded, {stats.loaded} read from the cache")
    for model_name, dataset in dict.fromkeys((r["model"], r["dataset"]) for r in result.rows):
        rows = [r for r in result.rows if (r["model"], r["dataset"]) == (model_name, dataset)]
        console.print(
            results_table(rows, f"{model_name} · {dataset} · {len({r['seed'] for r in rows})} seed(s) · test split")
        )
        _render_deferral(result.out, rows, f"{model_name} · {dataset}")
    for row in result.failures:
        err_console.print(
            f"[red]failed:[/] {row['model']} · {row['dataset']} · {row['method']} (seed {row['seed']}): {row['error']}",
            highlight=False,
        )
    md, _ = write_results_report(result.out) if result.rows else (None, None)
    summary = f"{result.computed} run(s) computed, {len(result.rows) - result.computed} reused from {result.out / 'results.csv'}"
    if result.skipped_pairs:
        summary += f"; {len(result.skipped_pairs)} pair(s) skipped for missing weights or data (listed above)"
    console.print(
        f"{summary}; {len(result.plots)} plots (reliability, risk–coverage{', shift' if any('/shift' in k for k in result.plots) else ''})"
        f"{f', report {md}' if md else ''}; {result.seconds:.1f} s"
    )


@app.command()
@user_errors
def report(
    results_dir: Path = typer.Argument(Path("results"), help="A folder written by `calbench compare`."),
    formats: Optional[list[str]] = typer.Option(
        None,
        "--format",
        help="Also write the paper-style table as LaTeX (latex: report.tex, for \\input{}) or every metric as a "
        "tidy long table (csv: report.csv, one row per model, dataset, method and metric); repeatable.",
    ),
) -> None:
    """Render report.md and a self-contained report.html from a results folder (and report.tex / report.csv)."""
    from calbench.report import write_results_report
    from calbench.report.tables import table_formats, write_table

    wanted = table_formats(formats or [])  # before any work: a wrong name stops with the right ones
    written = [*write_results_report(results_dir), *(write_table(results_dir, fmt) for fmt in wanted)]
    console.print(f"wrote {', '.join(map(str, written[:-1]))} and {written[-1]}")
