"""`calbench methods`: every registered method and post-hoc calibrator."""

from __future__ import annotations

from rich.table import Table

from calbench.cli.common import app, console, user_errors


@app.command()
@user_errors
def methods() -> None:
    """List the registered methods (what each learns and predicts from) and the post-hoc calibrators."""
    from calbench.base import METHODS
    from calbench.methods import list_calibrators, list_methods, make_method

    table = Table(title="methods")
    for column in ("id", "kind", "description"):
        table.add_column(column, overflow="fold")
    for name in list_methods():
        caps = make_method(name).capabilities
        kind = "learns a prompt" if caps.learns_prompt else "no training"
        if caps.smoothed:
            kind += f"; smoothed over {caps.test_copies.views} noisy copies"
        if caps.adapts_at_test:
            kind += "; tunes at test time"
        table.add_row(name, kind, METHODS.get(name).description)
    console.print(table)
    console.print(
        f"post-hoc calibrators (fitted on validation, written <method>+<id>): {', '.join(list_calibrators())}"
    )
