"""A small name -> class registry used for diagnostics and fixes, with third-party plug-ins.

Built-in classes register themselves with a decorator. A registry created with an entry-point
``group`` also loads the classes that installed packages declare in that group
(:mod:`importlib.metadata` entry points), lazily, once, on the first lookup; a plug-in that fails
to import or to pass ``check`` is skipped with a :class:`~mmdiag.errors.MmdiagWarning`, and the
reason is kept in :attr:`Registry.skipped`. Lookups of an unknown name raise a
:class:`~mmdiag.errors.ConfigError` that lists the known names and the closest match.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from importlib import metadata
from typing import Any, Callable, Generic, Iterator, TypeVar

from mmdiag.errors import ConfigError, MmdiagWarning

T = TypeVar("T")


def closest(name: str, candidates: list[str]) -> str | None:
    """The candidate most similar to ``name``, or ``None`` when nothing is close."""
    found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return found[0] if found else None


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """A one-paragraph message for an unknown name: what was asked, what exists, what is close."""
    plural = kind + ("es" if kind.endswith("x") else "s")  # "fixes", not "fixs"
    msg = f"Unknown {kind} {name!r}. Known {plural}: {', '.join(sorted(known)) or '(none)'}."
    near = closest(name, known)
    if near is not None:
        msg += f" Did you mean {near!r}?"
    return msg


def check_plugin_class(obj: Any, base: type) -> None:
    """Raise TypeError unless ``obj`` is a concrete subclass of ``base`` whose class attributes fit.

    Every class attribute that ``base`` annotates as a ``ClassVar`` and gives a default must keep
    the type of that default (a ``needs`` that is a frozenset, a ``contribution`` that is a bool...);
    ``name`` and ``summary`` must be non-empty strings.
    """
    if not inspect.isclass(obj) or not issubclass(obj, base):
        raise TypeError(f"expected a subclass of {base.__module__}.{base.__qualname__}; found {obj!r}")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        raise TypeError(f"{obj.__qualname__} does not implement {missing}")
    for attr in ("name", "summary"):
        value = getattr(obj, attr, None)
        if not isinstance(value, str) or not value.strip():
            raise TypeError(f"{obj.__qualname__}.{attr} must be a non-empty string; found {value!r}")
    for klass in reversed(base.__mro__):
        for attr, annotation in getattr(klass, "__annotations__", {}).items():
            if "ClassVar" not in str(annotation) or attr not in vars(klass):
                continue
            default, value = vars(klass)[attr], getattr(obj, attr)
            if default is None or value is None:
                continue
            expected = {tuple: (tuple, list), frozenset: (frozenset, set)}.get(type(default), type(default))
            if not isinstance(value, expected):
                raise TypeError(f"{obj.__qualname__}.{attr} must be a {type(default).__name__} like "
                                f"{base.__qualname__}.{attr}; found {value!r}")


class Registry(Generic[T]):
    """Maps names to plug-in classes, keeping registration order (built-ins first, then plug-ins).

    Args:
        kind: what the entries are, for messages (``diagnostic``, ``fix``).
        group: entry-point group whose entries are loaded on the first lookup (None: none).
        check: called with each plug-in class before it is registered; raises to refuse it.
    """

    def __init__(self, kind: str, group: str | None = None, check: Callable[[Any], None] | None = None) -> None:
        self.kind = kind
        self.group = group
        self._check = check
        self._items: dict[str, T] = {}
        self._loaded = group is None
        #: entry-point name -> why that plug-in was skipped
        self.skipped: dict[str, str] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Class decorator: register under ``name`` (default: the class's ``name`` attribute)."""

        def decorate(obj: T) -> T:
            key = name or getattr(obj, "name")
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return decorate

    def load_plugins(self) -> None:
        """Load the entry points of ``group`` (once; later calls do nothing)."""
        if self._loaded:
            return
        self._loaded = True  # first: a plug-in that looks names up while it loads must not recurse
        for ep in metadata.entry_points(group=self.group):
            try:
                self._load(ep)
            except Exception as exc:  # noqa: BLE001 - a broken plug-in must never stop mmdiag
                why = f"{type(exc).__name__}: {exc}"
                self.skipped[ep.name] = why
                warnings.warn(f"mmdiag skipped the {self.kind} plug-in {ep.name!r} ({ep.value}, entry-point "
                              f"group {self.group}): {why}", MmdiagWarning, stacklevel=3)

    def _load(self, ep: metadata.EntryPoint) -> None:
        obj = ep.load()
        if inspect.ismodule(obj):  # a module entry point: importing it registered its classes
            return
        if self._check is not None:
            self._check(obj)
        name = getattr(obj, "name")
        if name != ep.name:
            raise ValueError(f"the entry point is called {ep.name!r} but the {self.kind}'s name is {name!r}; "
                             "give both the same name")
        self.register()(obj)

    def get(self, name: str) -> T:
        """The plug-in called ``name``; a ConfigError naming the closest match otherwise."""
        self.load_plugins()
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(unknown_name_message(self.kind, name, list(self._items))) from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        self.load_plugins()
        return list(self._items)

    def classes(self) -> list[T]:
        """Registered classes, in registration order."""
        self.load_plugins()
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.load_plugins()
        return len(self._items)
