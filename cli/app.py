"""``calbench`` CLI. Each command parses options, calls one library function and renders."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich.table import Table

from calbench.cli.common import (
    CacheOpt,
    DataOpt,
    DataRootOpt,
    DeviceOpt,
    ModelOpt,
    ParamsOpt,
    ShotsOpt,
    StrictOpt,
    ValShotsOpt,
    ViewsOpt,
    WeightsOpt,
    parse_ints,
    parse_names,
    app,
    console,
    err_console,
    user_errors,
)


def _mean_std(values: list[float], scale: float) -> str:
    array = np.asarray([v for v in values if not np.isnan(v)]) * scale
    if len(array) == 0:
        return "–"
    if len(array) == 1:
        return f"{array[0]:.2f}"
    return f"{array.mean():.2f}±{array.std(ddof=1):.2f}"


def render_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Mean ± std over seeds per method: percentages for rates, raw values for NLL and Brier."""
    columns = [("accuracy", "Acc %", 100), ("ece", "ECE %", 100), ("mce", "MCE %", 100), ("adaptive_ece", "AdaECE %", 100), ("nll", "NLL", 1), ("brier", "Brier", 1)]
    table = Table(title=title)
    table.add_column("method", no_wrap=True)
    table.add_column("seeds", justify="right")
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    single = len({row["seed"] for row in rows}) == 1
    if single:
        table.add_column("ECE 95% CI", justify="right")
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        ok = [row for row in mine if row["status"] == "ok"]
        seeds = f"{len(ok)}" if len(ok) == len(mine) else f"{len(ok)}/{len(mine)} ok"
        cells = [_mean_std([float(row[key]) for row in ok], scale) for key, _, scale in columns]
        if single:
            cells.append(f"[{100 * ok[0]['ece_ci_low']:.2f}, {100 * ok[0]['ece_ci_high']:.2f}]" if ok and not np.isnan(ok[0]["ece_ci_low"]) else "–")
        table.add_row(method, seeds, *cells)
    return table


@app.command()
@user_errors
def compare(
    model: str = ModelOpt,
    data: str = DataOpt,
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated method ids (default: the standard set)."),
    seeds: str = typer.Option("1,2,3", "--seeds", help="Comma-separated few-shot split / training seeds."),
    shots: int = ShotsOpt,
    val_shots: Optional[int] = ValShotsOpt,
    views: int = ViewsOpt,
    device: str = DeviceOpt,
    out: Path = typer.Option(Path("results"), "--out", help="Folder for results.csv, predictions, diagrams and the report."),
    cache_dir: Optional[Path] = CacheOpt,
    weights: Optional[Path] = WeightsOpt,
    data_root: Optional[Path] = DataRootOpt,
    params: Optional[Path] = ParamsOpt,
    all_pairs: bool = typer.Option(False, "--all", help="Every available model x dataset pair of the same modality."),
    every_method: bool = typer.Option(False, "--all-methods", help="Every registered method (the default with --all unless --methods is given)."),
    force: bool = typer.Option(False, "--force", help="Recompute runs already in results.csv."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for each run's 95% ECE interval (0: none)."),
    strict: bool = StrictOpt,
) -> None:
    """Train and evaluate methods; print tables, append to results.csv, write the report.

    Runs already in OUT/results.csv with the same settings are reused, so an
    interrupted grid resumes where it stopped.
    """
    from calbench.experiment import DEFAULT_METHODS, all_methods, load_params_file, run_compare
    from calbench.report import write_report

    chosen = parse_names(methods) if methods is not None else (all_methods() if (all_pairs or every_method) else DEFAULT_METHODS)
    result = run_compare(
        model=model,
        data=data,
        methods=chosen,
        seeds=parse_ints(seeds, "--seeds"),
        shots=shots,
        val_shots=val_shots,
        views=views,
        device=device,
        out=out,
        cache_dir=cache_dir,
        weights=weights,
        data_root=data_root,
        progress=console.is_terminal,
        log=lambda message: console.log(message) if console.is_terminal else None,
        method_params=load_params_file(params) if params else None,
        bootstrap=bootstrap,
        all_pairs=all_pairs,
        force=force,
        on_skip=lambda m, d, missing: err_console.print(f"[yellow]skipped[/] {m} · {d}: {missing}", highlight=False, soft_wrap=True),
        strict=strict,
    )
    stats = result.stats
    if result.computed == 0:
        console.print(f"nothing to compute: every run is already in {result.out / 'results.csv'} (--force recomputes)")
    elif stats.encoded == 0:
        console.print(f"features: all {stats.loaded} read from the cache, no image encoded")
    else:
        console.print(f"features: {stats.encoded} image views encoded, {stats.loaded} read from the cache")
    for model_name, dataset in dict.fromkeys((r["model"], r["dataset"]) for r in result.rows):
        rows = [r for r in result.rows if (r["model"], r["dataset"]) == (model_name, dataset)]
        n_seeds = len({r["seed"] for r in rows})
        console.print(render_table(rows, f"{model_name} · {dataset} · {n_seeds} seed(s) · test split"))
    for row in result.failures:
        err_console.print(f"[red]failed:[/] {row['model']} · {row['dataset']} · {row['method']} (seed {row['seed']}): {row['error']}", highlight=False)
    reused = len(result.rows) - result.computed
    md, _ = write_report(result.out) if result.rows else (None, None)
    summary = f"{result.computed} run(s) computed, {reused} reused from {result.out / 'results.csv'}"
    if result.skipped_pairs:
        summary += f"; {len(result.skipped_pairs)} pair(s) skipped for missing weights or data (listed above)"
    console.print(f"{summary}; {len(result.plots)} reliability diagrams{f', report {md}' if md else ''}; {result.seconds:.1f} s")


@app.command()
@user_errors
def report(results_dir: Path = typer.Argument(Path("results"), help="A folder written by `calbench compare`.")) -> None:
    """Render report.md and a self-contained report.html from a results folder."""
    from calbench.report import write_report

    md, page = write_report(results_dir)
    console.print(f"wrote {md} and {page}")


@app.command()
@user_errors
def train(
    method: str = typer.Option("calibprompt", "--method", help="A trainable method id, optionally with +ts."),
    model: str = ModelOpt,
    data: str = DataOpt,
    seed: int = typer.Option(1, "--seed"),
    shots: int = ShotsOpt,
    val_shots: Optional[int] = ValShotsOpt,
    views: int = ViewsOpt,
    device: str = DeviceOpt,
    out: Path = typer.Option(Path("prompts"), "--out", help="Folder for the learned context."),
    cache_dir: Optional[Path] = CacheOpt,
    weights: Optional[Path] = WeightsOpt,
    data_root: Optional[Path] = DataRootOpt,
    params: Optional[Path] = ParamsOpt,
    strict: bool = StrictOpt,
) -> None:
    """Train one method on a few-shot split and save its learned prompt (validation metrics only)."""
    from calbench.experiment import load_params_file, train_one
    from calbench.methods import parse_method

    started = time.perf_counter()
    method_params = load_params_file(params).get(parse_method(method)[0], {}) if params else {}
    path, metrics = train_one(
        method, model, data, seed, shots, val_shots, views, device, out, cache_dir, weights, data_root, progress=console.is_terminal, params=method_params, strict=strict
    )
    console.print(
        f"{method} on {model} · {data}, seed {seed}: validation accuracy {100 * metrics['accuracy']:.2f}%, "
        f"ECE {100 * metrics['ece']:.2f}% — saved {path} in {time.perf_counter() - started:.1f} s"
    )


@app.command()
@user_errors
def cache(
    model: str = ModelOpt,
    data: str = DataOpt,
    seeds: str = typer.Option("1,2,3", "--seeds", help="Few-shot splits whose training views to encode."),
    shots: int = ShotsOpt,
    val_shots: Optional[int] = ValShotsOpt,
    views: int = ViewsOpt,
    device: str = DeviceOpt,
    cache_dir: Optional[Path] = CacheOpt,
    weights: Optional[Path] = WeightsOpt,
    data_root: Optional[Path] = DataRootOpt,
    strict: bool = StrictOpt,
) -> None:
    """Encode the test split and the few-shot splits ahead of time (e.g. on a GPU node)."""
    from calbench.experiment import build_cache

    stats, where = build_cache(model, data, parse_ints(seeds, "--seeds"), shots, val_shots, views, device, cache_dir, weights, data_root, progress=console.is_terminal, strict=strict)
    console.print(f"{stats.encoded} image views encoded, {stats.loaded} already cached, in {where}")


# command modules register themselves on `app` when imported
from calbench.cli import certify_cmd, data_cmd, models_cmd, tune_cmd  # noqa: E402,F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
