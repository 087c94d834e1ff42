"""What the CLI's error boundary (``user_errors`` in :mod:`calbench.cli.common`) says about a failure.

Expected failure families (a user error, a file-system error, running out of memory) become
one line that names the culprit and what to do; anything else is a bug and stays a traceback,
followed by :func:`bug_hint`.
"""

from __future__ import annotations

import inspect
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from typer.models import ArgumentInfo, OptionInfo

from calbench.errors import describe_os_error, os_error_path


def option_names(fn: Callable[..., Any]) -> dict[str, str]:
    """Parameter name -> the option as typed (``cache_dir`` -> ``--cache-dir``; an argument: ``PATH``)."""
    names = {}
    for name, parameter in inspect.signature(fn).parameters.items():
        default = parameter.default
        if isinstance(default, OptionInfo):
            names[name] = next((d for d in default.param_decls if d.startswith("--")), f"--{name.replace('_', '-')}")
        elif isinstance(default, ArgumentInfo):
            names[name] = name.upper()
    return names


def _option_paths(values: Mapping[str, Any], names: Mapping[str, str]) -> list[tuple[str, Path]]:
    """(option as typed, path it names) for every path-valued parameter of the running command."""
    found = []
    for name, value in values.items():
        if name not in names:
            continue
        if value is None and name == "cache_dir":
            from calbench.cache import default_cache_dir  # what an absent --cache-dir means

            value = default_cache_dir()
        if isinstance(value, str) and name == "storage":  # a URL or journal file: its file's path
            value = value.split("sqlite:///", 1)[-1].removeprefix("journal:")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (str, Path)) and str(item):
                found.append((names[name], Path(item)))
    return found


def _resolved(path: Path) -> Path:
    """``path`` made absolute, its links followed where they lead somewhere (a link loop stays as it is)."""
    try:
        return path.expanduser().resolve()
    except (RuntimeError, OSError):  # a symbolic-link loop: Python < 3.13 raises RuntimeError
        return path.expanduser().absolute()


def option_of(path: Path, values: Mapping[str, Any], names: Mapping[str, str]) -> Optional[str]:
    """The option whose path is ``path`` or holds it (the most specific one), if any."""
    resolved = _resolved(path)
    matches = []
    for label, value in _option_paths(values, names):
        root = _resolved(value)
        if resolved == root or root in resolved.parents:
            matches.append((len(root.parts), label))
    return max(matches)[1] if matches else None


def os_error_line(exc: OSError, values: Mapping[str, Any], names: Mapping[str, str]) -> str:
    """One line for a file-system failure, naming the path and the option that chose it."""
    path = os_error_path(exc)
    return describe_os_error(exc, option_of(path, values, names) if path is not None else None)


def memory_line(exc: BaseException) -> Optional[str]:
    """One line for running out of memory (CPU or GPU), or None for anything else."""
    cpu = isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)  # torch's CPU allocator
    if isinstance(exc, MemoryError) or cpu:
        return "out of memory; close other programs, or run on a machine with more memory"
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
        return "the GPU ran out of memory; free it from other jobs, or pass --device cpu"
    return None


def bug_hint(argv: Sequence[str]) -> str:
    """What to do after a traceback: it is a bug in calbench, so report it with the command line."""
    command = shlex.join(["calbench", *argv[1:]])
    return f"this is a bug in calbench, not in your input: please report it with the command line ({command}) and the traceback above"
