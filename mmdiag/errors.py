"""The mmdiag exception hierarchy.

Every error a user can cause (a wrong flag, a file that does not load, a model that does not fit
the data) is raised as a subclass of :class:`MmdiagError`, whose message says what was expected,
what was found and what to try. The CLI turns these into exit code 2 without a traceback. Any
other exception also exits 2: as an error in the user's code (with the file and line, see
:func:`user_code_error`) when a traceback frame is the user's, else as an internal error of mmdiag.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


class MmdiagError(Exception):
    """Base class of every error mmdiag raises on purpose."""

    exit_code: int = 2


class ConfigError(MmdiagError):
    """A setting, flag or config file entry is wrong or inconsistent."""


class LoadError(MmdiagError):
    """A model factory, checkpoint or dataset could not be loaded."""


class AdapterError(MmdiagError):
    """The model cannot be driven the way mmdiag was told to drive it (call convention, output)."""


class EvidenceError(MmdiagError):
    """Evidence is missing, malformed, or the data behind it is not usable (NaN, one class...)."""


class GateError(MmdiagError):
    """A gate rule does not parse or refers to something the report cannot answer."""


class TrainError(MmdiagError):
    """Retraining could not start or continue (bad resume directory, incompatible state)."""


class UserCodeError(MmdiagError):
    """The user's own code (a factory, a forward, a dataset) raised an exception.

    The message keeps the user's own exception type and message and names the file and line in
    their code where it was raised, so the CLI can report it with exit code 2 and no traceback.
    """


def _is_user_file(name: str) -> bool:
    """Whether ``name`` is a source file of the user's (not mmdiag, an installed package or the stdlib)."""
    import sysconfig

    skip = tuple(
        p for p in {sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("purelib"),
                    sysconfig.get_paths().get("platlib")} if p
    )
    package_dir = __file__.rsplit("/", 1)[0].rsplit("\\", 1)[0]
    return not (name.startswith(package_dir) or (skip and name.startswith(skip)) or name.startswith("<"))


def user_frame(exc: BaseException) -> tuple[str, int] | None:
    """(file, line) of the innermost traceback frame outside mmdiag, torch and the standard library.

    An exception re-raised from a DataLoader worker process carries the worker's traceback only as
    text in its message; the frames are then read from that text.
    """
    import re
    import traceback

    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if _is_user_file(frame.filename):
            found = (frame.filename, frame.lineno or 0)
    if found is None and "Original Traceback" in str(exc):
        for name, line in re.findall(r'File "([^"]+)", line (\d+)', str(exc)):
            if _is_user_file(name):
                found = (name, int(line))
    return found


def exception_message(exc: BaseException) -> str:
    """The exception's own message (for a DataLoader worker's exception, its last line, not the traceback)."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        head, sep, rest = last.partition(": ")
        text = rest if sep and head.rsplit(".", 1)[-1] == type(exc).__name__ else last
    return text or "(no message)"


def user_code_error(exc: BaseException, doing: str) -> UserCodeError:
    """A :class:`UserCodeError` for ``exc``, raised by the user's code while ``doing`` something.

    ``doing`` completes "... raised while {doing}", e.g. ``"running the model's forward"``.
    """
    return UserCodeError(f"Your code raised {type(exc).__name__}{user_location(exc)} while {doing}: "
                         f"{exception_message(exc)}")


def user_location(exc: BaseException) -> str:
    """`` at FILE:LINE`` of the user's code where ``exc`` was raised; empty when no frame is the user's."""
    where = user_frame(exc)
    return f" at {where[0]}:{where[1]}" if where else ""


def call_user(fn: Callable[..., T], doing: str, *args: Any) -> T:
    """``fn(*args)``, where ``fn`` is the user's own object (a dataset's ``__getitem__``): any exception
    it raises, but mmdiag's own errors, becomes a UserCodeError, also when the user's object is
    implemented in an installed package (a torchvision dataset whose file is missing)."""
    try:
        return fn(*args)
    except MmdiagError:
        raise
    except Exception as exc:
        raise user_code_error(exc, doing) from exc


def user_iteration(iterable: Iterable[T], doing: str) -> Iterator[T]:
    """Iterate ``iterable`` (a DataLoader over the user's dataset); an exception raised in the user's
    code meanwhile becomes a :class:`UserCodeError` saying what was being done and where it was raised.

    Errors of mmdiag's own, and exceptions that did not come from the user's code, pass unchanged.
    """
    try:
        iterator = iter(iterable)  # starting a DataLoader's iterator may already read items
    except Exception as exc:
        if not raised_in_user_code(exc):
            raise
        raise user_code_error(exc, doing) from exc
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            if not raised_in_user_code(exc):
                raise
            raise user_code_error(exc, doing) from exc
        yield item


def raised_in_user_code(exc: BaseException) -> bool:
    """Whether ``exc`` was raised in the user's code (and is not one of mmdiag's own errors)."""
    return not isinstance(exc, MmdiagError) and user_frame(exc) is not None


class MmdiagWarning(UserWarning):
    """A change of method or a condition that changes how the numbers read (also in ``Report.notes``)."""


_user_frame = user_frame  # the older private name
