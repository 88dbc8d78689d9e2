"""One registry mechanism for every extension point (rewards, advantage estimators, index kinds).

A registration under a taken name raises; a miss is a ``UserError`` that lists the choices.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from rexrag.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # shown in errors: "unknown <kind> 'x'"
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of ``add``."""
        return lambda item: self.add(name, item)

    def remove(self, name: str) -> T:
        """Unregister ``name`` (tests, plugin reloads)."""
        return self._items.pop(name)

    def get(self, name: str, hint: str = "") -> T:
        if name not in self._items:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of {self.names()}{hint}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)
