"""One small registry type for everything selectable by name: methods, text sources, architectures, kernel backends.

A lookup of an unknown name fails with the allowed names and a "did you mean" suggestion; config validation
reads `names()`, so no module keeps a mirror list of what is registered.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> T. `kind` names what is registered, for error messages (e.g. "method", "kernel backend")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make `obj` selectable as `name`; registering a name twice is an error."""

        def wrap(obj: T) -> T:
            self.add(name, obj)
            return obj

        return wrap

    def add(self, name: str, obj: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        """The entry named `name`; KeyError-free: an unknown name is a ValueError naming the allowed values."""
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        return self._entries[name]

    def unknown(self, name: object) -> str:
        """The error text for an unknown name: allowed values and the closest match, if any."""
        hint = difflib.get_close_matches(str(name), self._entries, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{self.kind} {name!r} is not registered{suggestion}; allowed values: {self.names()}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
