"""Importing user objects: ``file.py:attr`` and ``package.module:attr`` specs, model factories."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Sequence

from torch import nn

from mmdiag.errors import ConfigError, LoadError, user_location
from mmdiag.registry import closest

# --------------------------------------------------------------------------------------------
# Importing objects from "file.py:attr" and "package.module:attr"
# --------------------------------------------------------------------------------------------


def _public_names(obj: Any) -> list[str]:
    try:
        names = dir(obj)
    except Exception:  # a hostile or broken __dir__
        return []
    return sorted(n for n in names if not n.startswith("_"))


def _few(names: Sequence[str], n: int = 10) -> str:
    if not names:
        return "(none)"
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _looks_like_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target or os.sep in target


@contextlib.contextmanager
def _on_sys_path(folder: str | None) -> Iterator[None]:
    """Put ``folder`` first on ``sys.path`` for the duration (so sibling imports resolve)."""
    if folder is None or folder in sys.path:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _module_name_for(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem) or "module"
    digest = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:10]
    return f"mmdiag_user_{stem}_{digest}"


def _exec_file_module(path: Path, spec_text: str) -> ModuleType:
    name = _module_name_for(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(
            f"Could not import {path} (from {spec_text!r}): Python found no loader for it; expected a "
            f"Python source file ending in .py. Check that the path before ':' points at a .py file."
        )
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module  # dataclasses, pickling and typing look modules up here
    try:
        with _on_sys_path(str(path.parent)):
            spec.loader.exec_module(module)
    except BaseException as e:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
        if isinstance(e, KeyboardInterrupt):
            raise
        raise _exec_error(path, e) from e
    return module


def _exec_error(path: Path, e: BaseException) -> LoadError:
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, ImportError):
        missing = getattr(e, "name", None)
        what = f"module {missing!r}" if missing else "a module it imports"
        return LoadError(
            f"Could not import {path}: it needs {what}, which failed to import ({text}). Expected "
            f"every import in the file to resolve; the file's own folder is on sys.path while it "
            f"runs, so sibling files can be imported by name. Install the missing package in this "
            f"environment or add its location to PYTHONPATH."
        )
    if isinstance(e, SyntaxError):
        return LoadError(
            f"Could not import {path}: it is not valid Python ({text}). Fix the syntax error and "
            f"try again."
        )
    if isinstance(e, SystemExit):
        return LoadError(
            f"Could not import {path}: it called sys.exit() while being imported (exit code "
            f"{e.code!r}). Expected a module that only defines things at import time; guard script "
            f"code with `if __name__ == \"__main__\":`."
        )
    return LoadError(
        f"Could not import {path}: running the file raised {type(e).__name__}{user_location(e)}: {e}. "
        f"Expected a module that can be imported without side effects failing; run `python {path}` to "
        f"see the full traceback."
    )


def _import_module(modname: str, spec_text: str) -> ModuleType:
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        missing = e.name or modname
        if missing == modname or modname.startswith(missing + "."):
            raise LoadError(
                f"Could not import module {modname!r} (from {spec_text!r}): no module named "
                f"{missing!r} was found ({type(e).__name__}: {e}). Expected an importable package; "
                f"install it in this environment, add its folder to PYTHONPATH, or give a file "
                f"path instead, like 'path/to/file.py:name'."
            ) from e
        raise LoadError(
            f"Could not import module {modname!r} (from {spec_text!r}): it imports {missing!r}, "
            f"which is not installed ({type(e).__name__}: {e}). Install the missing package in "
            f"this environment and try again."
        ) from e
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        raise LoadError(
            f"Could not import module {modname!r} (from {spec_text!r}): importing it raised "
            f"{type(e).__name__}: {e}. Run `python -c 'import {modname}'` to see the full traceback."
        ) from e


def _resolve_attr(root: Any, attr: str, origin: str, spec_text: str) -> Any:
    obj = root
    walked: list[str] = []
    for part in attr.split("."):
        if not part:
            raise ConfigError(
                f"Malformed object reference {spec_text!r}: the name after ':' ({attr!r}) has an "
                f"empty part. Expected dotted names like 'build_model' or 'Factory.create'."
            )
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = origin if not walked else f"{origin}:{'.'.join(walked)}"
            names = _public_names(obj)
            msg = (
                f"{where} has no attribute {part!r} (asked for {spec_text!r}). Public names "
                f"there: {_few(names)}."
            )
            near = closest(part, names)
            if near is not None:
                msg += f" Did you mean {near!r}?"
            msg += " Check the name after ':'."
            raise LoadError(msg) from None
        walked.append(part)
    return obj


def _import(spec: str) -> tuple[Any, str | None]:
    """``import_object`` plus the folder of the file it came from (``None`` for modules)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(
            f"Expected an object reference like 'path/to/file.py:name' or 'package.module:name', "
            f"found {spec!r}. Give the file or module, a colon, and the name to use."
        )
    spec = spec.strip()
    if ":" not in spec:
        example = f"{spec}:build_model" if _looks_like_file(spec) else "my_package.models:build_model"
        raise ConfigError(
            f"Expected an object reference like 'path/to/file.py:name' or 'package.module:name', "
            f"found {spec!r} with no ':'. Add the name of the object after a colon, e.g. "
            f"{example!r}."
        )
    target, attr = spec.rsplit(":", 1)
    if not target or not attr:
        raise ConfigError(
            f"Expected an object reference like 'path/to/file.py:name' or 'package.module:name', "
            f"found {spec!r} with an empty {'file or module' if not target else 'name'}. Give both "
            f"parts around the colon."
        )
    if _looks_like_file(target):
        path = Path(target).expanduser()
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise LoadError(
                f"Could not import {spec!r}: the file {target} {what} (looked in "
                f"{path.resolve()}). Expected a Python file; check the path, which is relative to "
                f"the current folder."
            )
        path = path.resolve()
        module = _exec_file_module(path, spec)
        return _resolve_attr(module, attr, str(path), spec), str(path.parent)
    module = _import_module(target, spec)
    return _resolve_attr(module, attr, target, spec), None


def import_object(spec: str) -> Any:
    """The object named by ``"path/to/file.py:attr"`` or ``"package.module:attr"``.

    A file is executed as a fresh module (under a name derived from its absolute path) with its
    own folder on ``sys.path`` so that it can import sibling files; ``attr`` may be dotted
    (``"mod:Class.create"``).
    """
    return _import(spec)[0]


def _callable_name(obj: Any, spec: str) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    return f"{name} (from {spec!r})" if name else repr(spec)


def call_factory(spec: str, kwargs: dict | None, what: str, expected: str, kwargs_hint: str = "") -> tuple[Any, Any]:
    """Import the factory named by ``spec`` and call it with ``kwargs``; returns (factory, result).

    ``what`` names the factory in messages ("model", "dataset"), ``expected`` what it should
    return; a factory that is not callable or raises becomes a LoadError saying so.
    """
    factory, folder = _import(spec)
    kwargs = dict(kwargs or {})
    if not callable(factory):
        raise LoadError(
            f"{spec!r} names a {type(factory).__name__}, not a class or function. Expected a {what} "
            f"factory that returns {expected}; point the name after ':' at it."
        )
    try:
        with _on_sys_path(folder):
            return factory, factory(**kwargs)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no keyword arguments"
        raise LoadError(
            f"The {what} factory {_callable_name(factory, spec)} raised {type(e).__name__}{user_location(e)}: "
            f"{e} when called with {given}. Check the keyword arguments passed to it{kwargs_hint} and that the "
            f"factory works on its own."
        ) from e


def build_model(spec: str, kwargs: dict | None = None) -> nn.Module:
    """Import the factory (a class or function) named by ``spec`` and call it with ``kwargs``."""
    factory, model = call_factory(spec, kwargs, "model", "a torch.nn.Module", " (`model_kwargs`)")
    if not isinstance(model, nn.Module):
        raise LoadError(
            f"The model factory {_callable_name(factory, spec)} returned a "
            f"{type(model).__module__}.{type(model).__qualname__}, expected a torch.nn.Module. "
            f"Make the factory return the model itself (not a tuple, a dict or a checkpoint path)."
        )
    return model


