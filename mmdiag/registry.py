"""A small name -> class registry used for diagnostics and fixes.

Plug-ins register themselves with a decorator; lookups of an unknown name raise a
:class:`~mmdiag.errors.ConfigError` that lists the known names and the closest match.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from mmdiag.errors import ConfigError

T = TypeVar("T")


def closest(name: str, candidates: list[str]) -> str | None:
    """The candidate most similar to ``name``, or ``None`` when nothing is close."""
    found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return found[0] if found else None


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """A one-paragraph message for an unknown name: what was asked, what exists, what is close."""
    msg = f"Unknown {kind} {name!r}. Known {kind}s: {', '.join(sorted(known)) or '(none)'}."
    near = closest(name, known)
    if near is not None:
        msg += f" Did you mean {near!r}?"
    return msg


class Registry(Generic[T]):
    """Maps names to plug-in classes, keeping registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Class decorator: register under ``name`` (default: the class's ``name`` attribute)."""

        def decorate(obj: T) -> T:
            key = name or getattr(obj, "name")
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        """The plug-in called ``name``; a ConfigError naming the closest match otherwise."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(unknown_name_message(self.kind, name, list(self._items))) from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
