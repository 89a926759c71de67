"""The Diagnostic base class and its registry.

A diagnostic is a frozen dataclass: class attributes say what it is (``name``, ``summary``,
``needs``, ``higher_is_better``), dataclass fields are its parameters, and :meth:`Diagnostic.compute`
turns :class:`~mmdiag.evidence.Evidence` into a :class:`~mmdiag.report.Result`. It never runs the
model. Register a new one with ``@register_diagnostic`` in a module of this package; the CLI
listing, the conformance tests and the docs pick it up from the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping

from mmdiag.evidence import ENCODER_KINDS, Evidence
from mmdiag.registry import Registry
from mmdiag.report import Result

DIAGNOSTICS: Registry[type["Diagnostic"]] = Registry("diagnostic")


def register_diagnostic(cls: type["Diagnostic"]) -> type["Diagnostic"]:
    """Class decorator adding a diagnostic to :data:`DIAGNOSTICS` under its ``name``."""
    return DIAGNOSTICS.register()(cls)


@dataclass(frozen=True)
class Diagnostic(ABC):
    """Base of every diagnostic.

    Attributes:
        bootstrap: number of bootstrap resamples for the intervals (0 disables them).
        seed: seed of the bootstrap.
        level: coverage of the intervals.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    #: names of other diagnostics whose results :meth:`compute` reads from ``prior`` when they ran.
    uses: ClassVar[tuple[str, ...]] = ()
    higher_is_better: ClassVar[bool | None] = None
    #: part of the default suite (expensive ones may opt out).
    default: ClassVar[bool] = True

    bootstrap: int = 1000
    seed: int = 0
    level: float = 0.95

    @classmethod
    def requires_encoders(cls) -> bool:
        """Whether the diagnostic needs encoder-level evidence (skipped for black-box models)."""
        return bool(cls.needs & ENCODER_KINDS)

    @classmethod
    def param_names(cls) -> list[str]:
        """The diagnostic's own parameters (dataclass fields beyond the bootstrap ones)."""
        return [f.name for f in fields(cls) if f.name not in ("bootstrap", "seed", "level")]

    def params(self) -> dict[str, Any]:
        """Parameter values, for the report."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @abstractmethod
    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        """Turn evidence (and, for summaries, earlier results) into a Result."""

    def result(self, value: float | None, per_modality: Mapping[str, float], **kw: Any) -> Result:
        """A Result filled with this diagnostic's name, direction, parameters and summary."""
        return Result(
            name=self.name,
            value=None if value is None else float(value),
            per_modality={k: float(v) for k, v in per_modality.items()},
            higher_is_better=self.higher_is_better,
            params=self.params(),
            summary=self.summary,
            **kw,
        )
