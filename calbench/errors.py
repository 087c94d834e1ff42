"""User-facing errors.

Everything a user can get wrong (a name, a folder, a shot count) raises
:class:`CalbenchError` with a one-line message that says what is wrong and
what to do; the CLI prints that line and exits non-zero instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class CalbenchError(Exception):
    """An error caused by the user's input, with a message meant for them."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> CalbenchError:
    """The error for a name that is not in a registry, listing the valid names."""
    return CalbenchError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(valid))}")
