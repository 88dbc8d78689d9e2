"""One registry mechanism for every extension point (rewards, advantage estimators, index kinds).

A registration under a taken name raises; a miss is a ``UserError`` that lists the choices. An entry
may be registered by dotted path (:meth:`Registry.add_lazy`): its name is a choice at once, and its
module is imported on the first ``get``, so that listing the choices (the config does) loads nothing.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Generic, TypeVar

from rexrag.errors import UserError

T = TypeVar("T")


class _Lazy:
    """A registry entry not imported yet: ``"pkg.module:attr"``."""

    def __init__(self, path: str):
        self.path = path

    def load(self):
        module, _, attr = self.path.partition(":")
        return getattr(importlib.import_module(module), attr)


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # shown in errors: "unknown <kind> 'x'"
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def add_lazy(self, name: str, path: str) -> None:
        """Register ``name`` as the object at ``path`` (``"pkg.module:attr"``), imported on its first ``get``."""
        self.add(name, _Lazy(path))  # type: ignore[arg-type]

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of ``add``."""
        return lambda item: self.add(name, item)

    def remove(self, name: str) -> T:
        """Unregister ``name`` (tests, plugin reloads)."""
        return self._items.pop(name)

    def get(self, name: str, hint: str = "") -> T:
        if name not in self._items:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of {self.names()}{hint}")
        item = self._items[name]
        if isinstance(item, _Lazy):
            item = self._items[name] = item.load()
        return item

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)


def lazy_exports(package: str, exports: dict[str, str]):
    """PEP 562 ``(__getattr__, __dir__)`` for ``package``: each name of ``exports`` (name -> module) is imported
    from its module on first access and cached in the package, so importing the package imports none of them."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str):  # noqa: N807 (the module-level hook's name)
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
