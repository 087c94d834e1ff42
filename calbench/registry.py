"""A tiny name -> object registry shared by models, datasets, losses and methods."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from calbench.errors import unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps stable string ids to entries; unknown ids fail with the list of valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            self.add(name, entry)
            return entry

        return add

    def add(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise unknown_name(self.kind, name, self._entries) from None

    @contextmanager
    def temporarily(self, name: str, entry: T) -> Iterator[str]:
        """Register ``entry`` under ``name`` for a ``with`` block, then remove it (even on error).

        For test doubles and experiments: a stray entry would otherwise leak into every later
        lookup (``--all``, ``list_methods``) of the same process. Yields ``name``.
        """
        self.add(name, entry)
        try:
            yield name
        finally:
            del self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
