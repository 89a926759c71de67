"""The mmdiag exception hierarchy.

Every error a user can cause (a wrong flag, a file that does not load, a model that does not fit
the data) is raised as a subclass of :class:`MmdiagError`, whose message says what was expected,
what was found and what to try. The CLI turns these into exit code 2 without a traceback; any
other exception is a bug in mmdiag.
"""

from __future__ import annotations


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


def _user_frame(exc: BaseException) -> tuple[str, int] | None:
    """(file, line) of the innermost traceback frame outside mmdiag, torch and the standard library."""
    import sysconfig
    import traceback

    skip = tuple(
        p for p in {sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("purelib"),
                    sysconfig.get_paths().get("platlib")} if p
    )
    package_dir = __file__.rsplit("/", 1)[0].rsplit("\\", 1)[0]
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        name = frame.filename
        if name.startswith(package_dir) or (skip and name.startswith(skip)) or name.startswith("<"):
            continue
        found = (name, frame.lineno or 0)
    return found


def user_code_error(exc: BaseException, doing: str) -> UserCodeError:
    """A :class:`UserCodeError` for ``exc``, raised by the user's code while ``doing`` something.

    ``doing`` completes "... raised while {doing}", e.g. ``"running the model's forward"``.
    """
    where = _user_frame(exc)
    at = f" at {where[0]}:{where[1]}" if where else ""
    message = str(exc) or "(no message)"
    return UserCodeError(f"Your code raised {type(exc).__name__}{at} while {doing}: {message}")
