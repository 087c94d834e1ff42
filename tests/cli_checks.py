"""What the CLI tests share: a command run in-process, and the checks of its one-line errors."""

from __future__ import annotations

from typer.testing import CliRunner

from calbench.cli.app import app

runner = CliRunner()
#: the cheapest `calbench compare`: zero-shot, one seed, no bootstrap
FAST_ARGS = ["--methods", "zero-shot", "--seeds", "1", "--bootstrap", "0"]


def cli(*args: object):
    """Run ``calbench`` with ``args`` (paths and numbers as text), letting a bug's exception through."""
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_error(result, message: str, code: int = 2) -> None:
    """Exactly one ``error:`` line with ``message``, the exit code, and no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [f"error: {message}"]


def flat(text: str) -> str:
    """Output without whitespace, so a line wrapped by the console still compares equal."""
    return "".join(text.split())


def one_line(output: str) -> str:
    """Output with every run of whitespace made one space, so a wrapped line reads as one."""
    return " ".join(output.split())
