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
