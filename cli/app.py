"""The ``calbench`` command line (Typer). Each command parses options, calls one library function and renders.

This module is the one place that imports every command module, so that each registers
its commands on the shared ``app`` of :mod:`calbench.cli.common`.
"""

from __future__ import annotations

import sys

from calbench.cli import certify_cmd, compare_cmd, data_cmd, methods_cmd, models_cmd, train_cmd, tune_cmd  # noqa: F401
from calbench.cli.boundary import bug_hint
from calbench.cli.common import app, err_console

__all__ = ["app", "main"]


def main() -> None:
    """Run the CLI; a bug (an exception no command turned into one line) is a traceback and how to report it."""
    try:
        app()
    except Exception:
        sys.excepthook(*sys.exc_info())  # typer's traceback
        err_console.print(bug_hint(sys.argv), style="red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
