"""`calbench train` (save one learned prompt), `calbench evaluate` (score a saved prompt) and `calbench cache`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from calbench.cli.common import (
    DataOpt,
    ModelOpt,
    ParamsOpt,
    app,
    console,
    err_console,
    parse_ints,
    read_params,
    user_errors,
)
from calbench.cli.deferral_view import evaluation_table
from calbench.cli.options import FEWSHOT, RUN, grouped


@app.command()
@user_errors
@grouped(context=RUN, fewshot=FEWSHOT)
def train(
    method: str = typer.Option("calibprompt", "--method", help="A method that learns a prompt, optionally with +ts."),
    model: str = ModelOpt,
    data: str = DataOpt,
    seed: int = typer.Option(1, "--seed"),
    out: Path = typer.Option(Path("prompts"), "--out", help="Folder for the learned context."),
    params: Optional[Path] = ParamsOpt,
    online_encoding: bool = typer.Option(
        False,
        "--online-encoding",
        help="Encode each batch's freshly augmented images in the training loop, as the published code does, "
        "instead of reading cached views: the same augmentations, and far slower.",
    ),
    *,
    context: Any,
    fewshot: Any,
) -> None:
    """Train one method on a few-shot split and save its learned prompt (validation metrics only)."""
    from calbench.methods import overrides_for
    from calbench.single_runs import train_one

    started = time.perf_counter()
    path, metrics = train_one(
        method,
        model,
        data,
        seed,
        fewshot,
        context,
        out,
        overrides_for(method, read_params(params)),
        online_encoding,
    )
    console.print(
        f"{method} on {model} · {data}, seed {seed}: validation accuracy {100 * metrics['accuracy']:.2f}%, "
        f"ECE {100 * metrics['ece']:.2f}% — saved {path} in {time.perf_counter() - started:.1f} s; "
        f"score it with `calbench evaluate --prompt {path} --data {data}`"
    )


@app.command()
@user_errors
@grouped(context=RUN)
def evaluate(
    prompt: Path = typer.Option(..., "--prompt", help="A prompt file saved by `calbench train`."),
    data: str = DataOpt,
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="The model it was trained on (default: read from the file)."
    ),
    *,
    context: Any,
) -> None:
    """Score a saved prompt on a test split: its own dataset, or another with the same classes (a shift test)."""
    from calbench.single_runs import evaluate_prompt

    result = evaluate_prompt(prompt, data, model, context)
    if result.note:
        err_console.print(f"[yellow]note:[/] {result.note}", highlight=False)
    name = result.session.dataset.name
    shift = "" if name == result.trained_on else f" (trained on {result.trained_on}: a shift test)"
    table = Table(
        title=f"{result.method} · {result.session.model} · {name}{shift} · test split, {len(result.session.test_labels)} images"
    )
    for column in ("Acc %", "ECE %", "MCE %", "AdaECE %", "NLL", "Brier"):
        table.add_column(column, justify="right")
    m = result.metrics
    table.add_row(
        *(f"{100 * m[k]:.2f}" for k in ("accuracy", "ece", "mce", "adaptive_ece")),
        f"{m['nll']:.3f}",
        f"{m['brier']:.3f}",
    )
    console.print(table)
    fitted = "thresholds and sets fitted on its training validation split" if "lac_size" in m else "test-only measures"
    console.print(evaluation_table(m, f"when to defer on {name}: {fitted}"))


@app.command()
@user_errors
@grouped(context=RUN, fewshot=FEWSHOT)
def cache(
    model: str = ModelOpt,
    data: str = DataOpt,
    seeds: str = typer.Option("1,2,3", "--seeds", help="Few-shot splits whose training views to encode."),
    *,
    context: Any,
    fewshot: Any,
) -> None:
    """Encode the test split and the few-shot splits ahead of time (e.g. on a GPU node)."""
    from calbench.single_runs import build_cache

    stats, where = build_cache(model, data, parse_ints(seeds, "--seeds"), fewshot, context)
    console.print(f"{stats.encoded} image views encoded, {stats.loaded} already cached, in {where}")
