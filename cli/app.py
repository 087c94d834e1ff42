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
    array = np.asarray(values) * scale
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
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        table.add_row(method, str(len(mine)), *[_mean_std([row[key] for row in mine], scale) for key, _, scale in columns])
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
    out: Path = typer.Option(Path("results"), "--out", help="Folder for results.csv and reliability diagrams."),
    cache_dir: Optional[Path] = CacheOpt,
    weights: Optional[Path] = WeightsOpt,
    data_root: Optional[Path] = DataRootOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Train and evaluate methods on one model and dataset; print a table, write results.csv."""
    from calbench.experiment import DEFAULT_METHODS, load_params_file, run_compare

    result = run_compare(
        model=model,
        data=data,
        methods=parse_names(methods) or DEFAULT_METHODS,
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
    )
    stats = result.stats
    if stats.encoded == 0:
        console.print(f"features: all {stats.loaded} read from the cache, no image encoded")
    else:
        console.print(f"features: {stats.encoded} image views encoded, {stats.loaded} read from the cache")
    dataset = result.rows[0]["dataset"] if result.rows else data
    console.print(render_table(result.rows, f"{model} · {dataset} · {len({r['seed'] for r in result.rows})} seed(s) · test split"))
    for name, seed, reason in result.failures:
        err_console.print(f"[red]failed:[/] {name} (seed {seed}): {reason}", highlight=False)
    console.print(f"wrote {result.out / 'results.csv'} and {len(result.plots)} reliability diagrams in {result.seconds:.1f} s")


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
) -> None:
    """Train one method on a few-shot split and save its learned prompt (validation metrics only)."""
    from calbench.experiment import load_params_file, train_one

    started = time.perf_counter()
    method_params = load_params_file(params).get(method.split("+")[0], {}) if params else {}
    path, metrics = train_one(
        method, model, data, seed, shots, val_shots, views, device, out, cache_dir, weights, data_root, progress=console.is_terminal, params=method_params
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
) -> None:
    """Encode the test split and the few-shot splits ahead of time (e.g. on a GPU node)."""
    from calbench.experiment import build_cache

    stats, where = build_cache(model, data, parse_ints(seeds, "--seeds"), shots, val_shots, views, device, cache_dir, weights, data_root, progress=console.is_terminal)
    console.print(f"{stats.encoded} image views encoded, {stats.loaded} already cached, in {where}")


# command modules register themselves on `app` when imported
from calbench.cli import certify_cmd, data_cmd, models_cmd, tune_cmd  # noqa: E402,F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
