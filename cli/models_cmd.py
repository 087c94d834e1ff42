"""`calbench models`: what models exist, whether their weights are here, and fetching them."""

from __future__ import annotations

import typer
from rich.table import Table

from calbench.cli.common import app, console, user_errors

models_app = typer.Typer(invoke_without_command=True, help="List the registered models; `fetch` downloads one.")
app.add_typer(models_app, name="models")


@models_app.callback()
@user_errors
def models(ctx: typer.Context) -> None:
    """List the registered models with their source and whether their weights are available offline."""
    if ctx.invoked_subcommand is not None:
        return
    from calbench.models import MODELS, availability

    table = Table(title="models")
    for column in ("name", "modality", "source", "input", "local weights"):
        table.add_column(column, overflow="fold")
    missing = False
    for name in MODELS:
        spec = MODELS.get(name)
        ok, where = availability(name)
        missing |= not ok
        table.add_row(
            name,
            spec.modality,
            spec.source,
            f"{spec.resolution} px",
            f"[green]yes[/] {where}" if ok else "[yellow]no[/]",
        )
    console.print(table)
    if missing:
        console.print(
            "get missing weights with `calbench models fetch NAME` (needs internet), or copy them into $CALBENCH_WEIGHTS/NAME/, or pass --weights"
        )


@models_app.command("fetch")
@user_errors
def fetch(name: str = typer.Argument(..., help="Model name (see `calbench models`).")) -> None:
    """Download a model's weights (and tokenizer) ahead of time, e.g. on a login node with internet."""
    from calbench.errors import CalbenchError
    from calbench.models import MODELS
    from calbench.models import fetch as fetch_weights
    from calbench.models.weights import offline

    spec = MODELS.get(name)
    if offline() and spec.sources:
        raise CalbenchError(f"HF_HUB_OFFLINE is set; unset it to download {name} from {spec.source}")
    try:
        where = fetch_weights(name)
    except CalbenchError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CalbenchError(
            f"downloading {name} from {spec.source} failed ({reason}); check the network, or copy the files into $CALBENCH_WEIGHTS/{name}/"
        ) from None
    console.print(f"{name}: weights in {where}")
