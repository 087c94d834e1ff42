"""``calbench`` CLI. Each command parses options, calls one library function and renders."""
from __future__ import annotations

import functools
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from calbench.errors import CalbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Calibration-aware prompt learning for medical VLMs.")
console = Console()
if not console.is_terminal:  # logs and CI: no 80-column wrapping of the results table
    console = Console(width=160)
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

ModelOpt = typer.Option("tiny", "--model", "-m", help="Model name (see `calbench models`).")
DataOpt = typer.Option("synthetic", "--data", "-d", help="Dataset name (see `calbench datasets`) or a folder in calbench's layout.")
ShotsOpt = typer.Option(8, "--shots", help="Training images per class.")
ValShotsOpt = typer.Option(None, "--val-shots", help="Validation images per class, from the train pool (default: --shots).")
ViewsOpt = typer.Option(10, "--views", help="Cached augmented views per training image (epoch e uses view e mod V).")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
CacheOpt = typer.Option(None, "--cache-dir", help="Feature/data cache (default: $CALBENCH_CACHE or the user cache dir).")
WeightsOpt = typer.Option(None, "--weights", help="Model weights file or folder (default: the model's own source).")
DataRootOpt = typer.Option(None, "--data-root", envvar="CALBENCH_DATA", help="Folder holding registered datasets.")


def user_errors(fn: F) -> F:
    """Turn user errors into one red line and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def one_line_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            err_console.print(f"[yellow]warning:[/] {message}", highlight=False)

        previous = warnings.showwarning
        warnings.showwarning = one_line_warning
        try:
            return fn(*args, **kwargs)
        except CalbenchError as exc:
            err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: finished cache files and results are kept; run the same command to resume")
            raise typer.Exit(130) from None
        finally:
            warnings.showwarning = previous

    return wrapper  # type: ignore[return-value]


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CalbenchError(f"{option} takes comma-separated integers like 1,2,3; got {text!r}") from None


def _names(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


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
) -> None:
    """Train and evaluate methods on one model and dataset; print a table, write results.csv."""
    from calbench.experiment import DEFAULT_METHODS, run_compare

    result = run_compare(
        model=model,
        data=data,
        methods=_names(methods) or DEFAULT_METHODS,
        seeds=_ints(seeds, "--seeds"),
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
) -> None:
    """Train one method on a few-shot split and save its learned prompt (validation metrics only)."""
    from calbench.experiment import train_one

    started = time.perf_counter()
    path, metrics = train_one(method, model, data, seed, shots, val_shots, views, device, out, cache_dir, weights, data_root, progress=console.is_terminal)
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

    stats, where = build_cache(model, data, _ints(seeds, "--seeds"), shots, val_shots, views, device, cache_dir, weights, data_root, progress=console.is_terminal)
    console.print(f"{stats.encoded} image views encoded, {stats.loaded} already cached, in {where}")


@app.command()
@user_errors
def models() -> None:
    """List the registered models."""
    from calbench.models import MODELS

    table = Table(title="models")
    for column in ("name", "modality", "source", "description"):
        table.add_column(column)
    for name in MODELS:
        spec = MODELS.get(name)
        table.add_row(name, spec.modality, spec.source, spec.description)
    console.print(table)


@app.command()
@user_errors
def datasets() -> None:
    """List the registered datasets (any folder in calbench's layout also works with --data PATH)."""
    from calbench.data import DATASETS

    table = Table(title="datasets")
    for column in ("name", "modality", "prompt template", "description"):
        table.add_column(column)
    for name in DATASETS:
        spec = DATASETS.get(name)
        table.add_row(name, spec.modality, spec.template, spec.description)
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
