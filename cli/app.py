"""The ``calbench`` command line (Typer). Each command parses options, calls one library function and renders.

This module is the one place that imports every command module, so that each registers
its commands on the shared ``app`` of :mod:`calbench.cli.common`.
"""

from __future__ import annotations

from calbench.cli import certify_cmd, compare_cmd, data_cmd, methods_cmd, models_cmd, train_cmd, tune_cmd  # noqa: F401
from calbench.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
