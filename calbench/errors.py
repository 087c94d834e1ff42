"""User-facing errors and warnings.

Everything a user can get wrong (a name, a folder, a shot count) raises
:class:`CalbenchError` with a one-line message that says what is wrong and
what to do; the CLI prints that line and exits non-zero instead of a traceback.
File-system failures (a full or read-only disk, a file where a folder belongs) stay
:class:`OSError`; :func:`describe_os_error` turns one into the same kind of line.
Warnings a user must see (a skipped image, a damaged row dropped) go through :func:`warn`.
"""

from __future__ import annotations

import errno
import operator
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

#: seeds go to numpy (``default_rng``, ``RandomState``) and torch (``manual_seed``); numpy's
#: legacy ``np.random.seed`` takes 0 to 2**32 - 1, the range every seeded tool accepts
SEED_MAX = 2**32 - 1


class CalbenchError(Exception):
    """An error caused by the user's input, with a message meant for them."""


class CalbenchWarning(UserWarning):
    """A warning meant for the user (the CLI always shows it, as one ``warning:`` line)."""


def warn(message: str, stacklevel: int = 2) -> None:
    """Warn the user; the CLI shows these even under ``PYTHONWARNINGS=ignore``."""
    warnings.warn(message, CalbenchWarning, stacklevel=stacklevel + 1)


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> CalbenchError:
    """The error for a name that is not in a registry, listing the valid names."""
    return CalbenchError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(valid))}")


def check_seed(seed: object, option: str = "--seed") -> int:
    """``seed`` when it is a whole number in [0, :data:`SEED_MAX`]; else a one-line error naming ``option``."""
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)  # type: ignore[arg-type]
    except TypeError:
        value = None
    if value is None or not 0 <= value <= SEED_MAX:
        raise CalbenchError(f"{option} takes seeds from 0 to {SEED_MAX} (2**32 - 1); got {seed}")
    return value


def check_seeds(seeds: Iterable[object], option: str = "--seeds") -> list[int]:
    """Every seed of ``seeds`` checked by :func:`check_seed`."""
    return [check_seed(seed, option) for seed in seeds]


# errno -> (what failed, why, what to do); {where} is "pass --out" or "choose a folder", {file} "pass --out a file path"
_OS_REASONS = {
    errno.ENOSPC: ("write", "no space left on device", "free space or {where} on another disk"),
    errno.EDQUOT: ("write", "disk quota exceeded", "free space or {where} on another disk"),
    errno.EFBIG: ("write", "file too large for this file system", "{where} on another disk"),
    errno.EROFS: ("write", "read-only file system", "{where} on a writable disk"),
    errno.EACCES: ("access", "permission denied", "fix its permissions or {where} you can write to"),
    errno.EPERM: ("access", "operation not permitted", "fix its permissions or {where} you can write to"),
    errno.ENOTDIR: ("use", "{blocker} is a file, not a folder", "move that file away or {where} elsewhere"),
    errno.EEXIST: ("create", "{blocker} is a file, not a folder", "move that file away or {where} elsewhere"),
    errno.EISDIR: ("use", "it is a folder, not a file", "{file} instead"),
    errno.ENOENT: ("find", "no such file or folder", "check the path"),
    errno.ENAMETOOLONG: ("use", "file name too long", "{where} with a shorter path"),
    errno.EMFILE: ("open", "too many open files", "raise the limit with `ulimit -n`"),
    errno.ENFILE: ("open", "too many open files", "raise the limit with `ulimit -n`"),
    errno.EIO: ("read or write", "input/output error", "check the disk"),
}
#: calbench.atomic's temp files: ".<target name>-<8 random characters>.tmp" beside the target
_ATOMIC_TEMP = re.compile(r"^\.(?P<target>.+)-[a-z0-9_]{8}\.tmp$")


def os_error_path(exc: OSError) -> Optional[Path]:
    """The path an OSError is about: the target of a failed rename or of an atomic write's temp file."""
    name = exc.filename2 if exc.filename2 is not None else exc.filename
    if name is None or isinstance(name, int):
        return None
    path = Path(name.decode(errors="replace") if isinstance(name, bytes) else name)
    temp = _ATOMIC_TEMP.match(path.name)
    return path.with_name(temp["target"]) if temp else path


def _blocker(path: Path) -> Optional[Path]:
    """The nearest of ``path`` and its parents that exists as something other than a folder."""
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def _broken_link(path: Path) -> Optional[str]:
    """What is wrong when ``path`` is a symbolic link that leads nowhere ("" -> None when it is not one)."""
    if not path.is_symlink():
        return None
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop so
        return "it is a symbolic link loop"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "it is a symbolic link loop"
        return f"it is a symbolic link to {os.readlink(path)}, which does not exist"
    return None


def describe_os_error(exc: OSError, option: Optional[str] = None) -> str:
    """One line for a file-system failure: which path, why, and what to do (``option``: the
    command-line option that named the path, e.g. ``--out``)."""
    path = os_error_path(exc)
    if isinstance(exc, (ConnectionError, TimeoutError)) and path is None:
        return f"network error ({exc}); check the connection and try again"
    if path is None and exc.errno not in _OS_REASONS:  # a library's OSError (e.g. an unreadable image): its own words
        return f"{exc or type(exc).__name__}; check the file it names"
    where, file = (
        (f"pass {option}", f"pass {option} a file path") if option else ("choose a folder", "give a file path")
    )
    fallback = ("use", (exc.strerror or str(exc)).lower(), "check the path")
    action, reason, hint = _OS_REASONS.get(exc.errno or 0, fallback)
    link = _broken_link(path) if path is not None else None
    if link is not None:  # mkdir on a dangling link says "file exists", on a loop "too many levels of links"
        return f"cannot use {path}: {link}; remove the link, or {where} elsewhere"
    if "{blocker}" in reason:
        blocker = _blocker(path) if path is not None else None
        if blocker is None:
            action, reason, hint = fallback
        else:
            reason = "it is a file, not a folder" if blocker == path else reason.format(blocker=blocker)
    return f"cannot {action} {path if path is not None else 'a file'}: {reason}; {hint.format(where=where, file=file)}"


@contextmanager
def naming(path: Union[str, Path]) -> Iterator[None]:
    """Name ``path`` in an OSError raised inside that names no path (a failed write to an open
    file carries none), so the error can say which file a full disk stopped."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def available_memory() -> Optional[int]:
    """Bytes of memory this machine can still give a process (Linux's MemAvailable, else its physical
    memory), or None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Refuse up front what would need more memory than the machine has: past that the kernel kills the
    process with no word (exit 137), or numpy fails each run with a MemoryError, after the work before it."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise CalbenchError(
            f"{what} needs {nbytes / 2**30:.1f} GiB of memory and this machine has {free / 2**30:.1f} GiB free; {fix}"
        )
