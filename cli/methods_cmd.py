"""`calbench methods`: every registered method, its defaults and where each comes from."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from calbench.cli.common import app, console, user_errors


def _value(value: object) -> str:
    if isinstance(value, tuple):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


@app.command()
@user_errors
def methods(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Show the defaults resolved for this model."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="... and this dataset (a published pair's row)."),
) -> None:
    """List the methods with their defaults, the source of every default (published config file and
    line, or calbench's own choice), the published per-pair settings, and the post-hoc calibrators."""
    from calbench import published
    from calbench.base import METHODS
    from calbench.methods import list_calibrators, list_methods, make_method, resolve

    if (model is None) != (data is None):
        raise typer.BadParameter("give --model and --data together (or neither)")
    if model is not None and data is not None:  # a typo would show another pair's defaults as if they were its own
        from calbench.data import DATASETS
        from calbench.models import MODELS

        MODELS.get(model)
        if not Path(data).expanduser().is_dir():
            DATASETS.get(data)
    table = Table(title="methods" + (f" on {model} · {data}" if model else ""))
    for column in ("id", "kind", "defaults", "description"):
        table.add_column(column, overflow="fold")
    sources = Table(title="where each default comes from")
    for column in ("method", "setting", "value", "source"):
        sources.add_column(column, overflow="fold")
    trainer = {k: (s.value, s.source) for k, s in published.section("train").items()}
    for name in list_methods():
        caps = make_method(name).capabilities
        kind = "learns a prompt" if caps.learns_prompt else "no training"
        if caps.smoothed:
            kind += f"; smoothed over {caps.test_copies.views} noisy copies"
        if caps.adapts_at_test:
            kind += "; tunes at test time"
        # the method's own settings and what it changes of the trainer's (listed once, below)
        settings = resolve(name, model, data).settings
        shown = {k: (s.value, s.source) for k, s in settings.items() if trainer.get(k) != (s.value, s.source)}
        defaults = ", ".join(f"{k} {_value(value)}" for k, (value, _) in shown.items())
        table.add_row(name, kind, defaults or "–", METHODS.get(name).description)
        for key, (value, source) in shown.items():
            sources.add_row(name, key, _value(value), source)
    for section in published.SHARED_SECTIONS:
        for key, entry in published.section(section).items():
            sources.add_row(f"({section})", key, _value(entry.value), entry.source)
    console.print(table)
    console.print(sources)
    console.print(_pairs_table(published))
    console.print(
        f"post-hoc calibrators (fitted on validation, written <method>+<id>): {', '.join(list_calibrators())}"
    )
    console.print("`--params FILE` overrides any default; `compare`, `tune`, `train` and `certify` resolve them alike.")


def _pairs_table(published) -> Table:  # noqa: ANN001 - the calbench.published module
    pairs = Table(title="published per-pair settings (CalibPrompt and the methods that take its alpha / w_as)")
    for column in ("model · dataset", "alpha", "w_as", "w_smac", "ECE % CE", "ECE % CalibPrompt", "source"):
        pairs.add_column(column, overflow="fold")
    for row in published.pairs():
        s = row.settings
        pairs.add_row(
            f"{row.model} · {row.dataset}",
            _value(s["alpha"].value),
            _value(s["w_as"].value),
            _value(s["w_smac"].value),
            f"{row.published_ece['coop-ce']:.2f}",
            f"{row.published_ece['calibprompt']:.2f}",
            s["alpha"].source,
        )
    for model in sorted({row.model for row in published.pairs()}):
        s = published.fallback(model)
        if s:  # the published code's answer for a dataset it was not tuned on
            values = [_value(s[k].value) for k in ("alpha", "w_as", "w_smac")]
            pairs.add_row(f"{model} · any other dataset", *values, "–", "–", s["alpha"].source)
    return pairs
