"""`calbench models`: what models exist."""
from __future__ import annotations

import typer
from rich.table import Table

from calbench.cli.common import app, console, user_errors

models_app = typer.Typer(invoke_without_command=True, help="List the registered models.")
app.add_typer(models_app, name="models")


@models_app.callback()
@user_errors
def models(ctx: typer.Context) -> None:
    """List the registered models."""
    if ctx.invoked_subcommand is not None:
        return
    from calbench.models import MODELS

    table = Table(title="models")
    for column in ("name", "modality", "source", "description"):
        table.add_column(column)
    for name in MODELS:
        spec = MODELS.get(name)
        table.add_row(name, spec.modality, spec.source, spec.description)
    console.print(table)
