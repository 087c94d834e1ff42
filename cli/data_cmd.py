"""`calbench datasets`: what datasets exist."""
from __future__ import annotations

import typer
from rich.table import Table

from calbench.cli.common import app, console, user_errors

datasets_app = typer.Typer(invoke_without_command=True, help="List the registered datasets.")
app.add_typer(datasets_app, name="datasets")


@datasets_app.callback()
@user_errors
def datasets(ctx: typer.Context) -> None:
    """List the registered datasets (any folder in calbench's layout also works with --data PATH)."""
    if ctx.invoked_subcommand is not None:
        return
    from calbench.data import DATASETS

    table = Table(title="datasets")
    for column in ("name", "modality", "prompt template", "description"):
        table.add_column(column)
    for name in DATASETS:
        spec = DATASETS.get(name)
        table.add_row(name, spec.modality, spec.template, spec.description)
    console.print(table)
