"""Services that tests start for real (a PostgreSQL server, a Slurm cluster): a test module's fixture starts one,
skips with the reason where this machine cannot run it, and fails instead where CI installed it (its REQUIRED
variable is set), so a broken install never passes as a skip."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any


def started(
    start: Callable[[], AbstractContextManager[Any]], name: str, required: str, unavailable: type[Exception]
) -> Iterator[Any]:
    """For a fixture to ``yield from``: the running service, or a skip (a fail under ``required``) with the reason."""
    import pytest

    try:
        with start() as running:
            yield running
    except unavailable as exc:
        if os.environ.get(required):
            pytest.fail(f"{name} is required here ({required} is set) but unavailable: {exc}")
        warnings.warn(f"{name} tests skipped: {exc}", stacklevel=1)
        pytest.skip(f"{name} unavailable: {exc}")
