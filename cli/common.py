"""What every command module shares: the Typer app, consoles, common options, error handling."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from calbench.cli.boundary import memory_line, option_names, os_error_line
from calbench.errors import CalbenchError, CalbenchWarning
from calbench.published import default

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Calibration-aware prompt learning for medical VLMs."
)
console = Console()
if not console.is_terminal:  # logs and CI: no 80-column wrapping of the results table
    console = Console(width=160)
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

ModelOpt = typer.Option("tiny", "--model", "-m", help="Model name (see `calbench models`).")
DataOpt = typer.Option(
    "synthetic", "--data", "-d", help="Dataset name (see `calbench datasets`) or a folder in calbench's layout."
)
ShotsOpt = typer.Option(default("train", "shots"), "--shots", help="Training images per class.")
ValShotsOpt = typer.Option(
    None, "--val-shots", help="Validation images per class, from the train pool (default: --shots)."
)
ViewsOpt = typer.Option(
    default("fewshot", "views"),
    "--views",
    help="Cached augmented views per training image (default: one per training epoch, as CoOp draws a fresh "
    "crop every epoch). N views encode each few-shot image N times instead of once per epoch, but epoch e "
    "reuses view e mod N, so training sees only N distinct crops of each image.",
)
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
CacheOpt = typer.Option(
    None, "--cache-dir", help="Feature/data cache (default: $CALBENCH_CACHE or the user cache dir)."
)
WeightsOpt = typer.Option(None, "--weights", help="Model weights file or folder (default: the model's own source).")
TrustWeightsOpt = typer.Option(
    False,
    "--trust-weights",
    help="Also load TorchScript weights (e.g. OpenAI-format CLIP .pt files): this runs code embedded in the file, "
    "so use it only for files from a source you trust. Without it weights are read as tensors only.",
)
ParamsOpt = typer.Option(
    None, "--params", help="JSON of method parameters: best_params.json from `tune`, or {method: {param: value}}."
)
StrictOpt = typer.Option(
    False, "--strict", help="Treat an unreadable image as an error instead of skipping it with a warning."
)
DataRootOpt = typer.Option(None, "--data-root", envvar="CALBENCH_DATA", help="Folder holding registered datasets.")


def _one_line_warning(
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def user_errors(fn: F) -> F:
    """The CLI's error boundary: user errors, file-system errors and running out of memory become
    one red line and exit code 2, never a traceback; calbench's warnings are always shown, one
    line each, each text once per command (a grid's runs on one split warn alike). Anything else is a bug and stays a traceback (``main`` adds how to report it)."""

    names = option_names(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("always", CalbenchWarning)  # takes precedence over PYTHONWARNINGS=ignore
            shown: set[str] = set()

            def once(message: Any, *rest: Any, **options: Any) -> None:
                if str(message) not in shown:
                    shown.add(str(message))
                    _one_line_warning(message, *rest, **options)

            warnings.showwarning = once
            try:
                return fn(*args, **kwargs)
            except CalbenchError as exc:
                raise _fail(str(exc)) from None
            except OSError as exc:  # a full or read-only disk, a file where a folder belongs, ...
                raise _fail(os_error_line(exc, kwargs, names)) from None
            except (MemoryError, RuntimeError) as exc:
                line = memory_line(exc)
                if line is None:
                    raise
                raise _fail(line) from None
            except EOFError as exc:  # click would print a bare "Aborted!": keep it a traceback with the reason
                raise RuntimeError(f"a file ended early: {exc}") from exc
            except KeyboardInterrupt:
                err_console.print(
                    "interrupted: finished cache files and results are kept; run the same command to resume"
                )
                raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def parse_ints(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CalbenchError(f"{option} takes comma-separated integers like 1,2,3; got {text!r}") from None


def parse_names(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def run_context(
    device: str,
    cache_dir: Optional[Path],
    weights: Optional[Path] = None,
    trust_weights: bool = False,
    data_root: Optional[Path] = None,
    strict: bool = False,
) -> Any:
    """The library's :class:`~calbench.session.RunContext` from the common options (progress bars on a terminal)."""
    from calbench.session import RunContext

    return RunContext(
        device=device,
        cache_dir=cache_dir,
        weights=weights,
        data_root=data_root,
        strict=strict,
        trust_weights=trust_weights,
        progress=console.is_terminal,
    )


def read_params(params: Optional[Path]) -> dict[str, dict[str, object]]:
    """``--params FILE`` as {base method: parameters}; empty without the option."""
    from calbench.methods import read_params_file

    return read_params_file(params) if params else {}


def results_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Mean ± std over seeds per method: percentages for rates, raw values for NLL and Brier."""
    from calbench.metrics import format_mean_std
    from calbench.results import SCORED

    columns = [
        ("accuracy", "Acc %", 100),
        ("ece", "ECE %", 100),
        ("mce", "MCE %", 100),
        ("adaptive_ece", "AdaECE %", 100),
        ("nll", "NLL", 1),
        ("brier", "Brier", 1),
    ]
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
        ok = [row for row in mine if row["status"] in SCORED]  # degenerate runs have metrics
        seeds = f"{len(ok)}" if len(ok) == len(mine) else f"{len(ok)}/{len(mine)} ok"
        degenerate = sum(row["status"] == "degenerate" for row in mine)
        seeds += f", {degenerate} degenerate" if degenerate else ""
        cells = [format_mean_std([float(row[key]) for row in ok], scale, sep="±") for key, _, scale in columns]
        if single:
            low, high = (float(ok[0][k]) if ok else float("nan") for k in ("ece_ci_low", "ece_ci_high"))
            cells.append("–" if math.isnan(low) else f"[{100 * low:.2f}, {100 * high:.2f}]")
        table.add_row(method, seeds, *cells)
    return table
