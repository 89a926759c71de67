"""The Diagnostic base class and its registry.

A diagnostic is a frozen dataclass: class attributes say what it is and declare what the rest of
mmdiag needs to know about it (``name``, ``summary``, ``needs``, ``higher_is_better``, whether it is
a contribution measure, its scale, how to read it, its figures, the problems it argues for),
dataclass fields are its parameters, and :meth:`Diagnostic.compute` turns
:class:`~mmdiag.evidence.Evidence` into a :class:`~mmdiag.report.Result`. It never runs the model.
Register a new one with ``@register_diagnostic`` in a module of this package, or from another
package through the entry-point group ``mmdiag.diagnostics`` (docs/extending.md); the CLI listing,
the verdict, the report, the conformance tests and the docs read the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping, Sequence

from mmdiag.evidence import ENCODER_KINDS, Evidence
from mmdiag.registry import Registry, check_plugin_class
from mmdiag.report import Result
from mmdiag.validation import Spec

#: built-in diagnostics, then those of installed plug-ins (entry-point group ``mmdiag.diagnostics``)
DIAGNOSTICS: Registry[type["Diagnostic"]] = Registry(
    "diagnostic", group="mmdiag.diagnostics", check=lambda obj: check_plugin_class(obj, Diagnostic))


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
    #: parameter -> what it must be (type and range), checked when the diagnostic is built, so a
    #: bad value in ``[params.<name>]`` is refused instead of silently producing a number
    limits: ClassVar[Mapping[str, Spec]] = {}
    higher_is_better: ClassVar[bool | None] = None
    #: part of the default suite (expensive ones may opt out).
    default: ClassVar[bool] = True
    #: computed in a worker thread beside the other diagnostics (their times overlap). Only for a
    #: diagnostic whose :meth:`compute` reads nothing from ``prior`` (it is given an empty mapping)
    #: and touches no global state: no global random generator (seed a ``torch.Generator`` or
    #: ``numpy.random.default_rng``), no ``warnings.catch_warnings`` (it swaps the process's
    #: filters), no change of torch's thread count. Resampling through :mod:`mmdiag.stats` is safe.
    concurrent: ClassVar[bool] = False
    #: a contribution measure: ``per_modality`` rises with how much the model's prediction rests on
    #: each modality, so its ranking can be set beside the verdict's (the verdict's reasons, the
    #: side-by-side figure).
    contribution: ClassVar[bool] = False
    #: (contribution measures) 0 means "contributes nothing" and values add up like amounts, so
    #: q_m = max(c_m, 0) / sum_k max(c_k, 0) is a share of the contribution: ``balance`` can summarise it.
    shareable: ClassVar[bool] = False
    #: what the per-modality values are, in words ("accuracy", "share of the attribution", "ratio").
    #: what the headline value is, in a word or two ("spread" = max - min over modalities)
    headline: ClassVar[str] = ""
    #: what the per-modality cells are when not "more of this modality" (read by the summaries)
    cells: ClassVar[str] = ""
    scale: ClassVar[str] = ""
    #: what a higher per-modality value means, in words.
    higher_means: ClassVar[str] = ""
    #: how to read the result, a few sentences (shown beside the numbers in the report).
    how_to_read: ClassVar[str] = ""
    #: report figures drawn from the result: names of figures registered in ``mmdiag.render.figures``.
    figures: ClassVar[tuple[str, ...]] = ("modality_bars",)
    #: problems the verdict can establish from this result (``mmdiag.verdict.PROBLEMS``); the fixes it
    #: argues for are the registered fixes whose ``targets`` name one of them.
    argues_for: ClassVar[tuple[str, ...]] = ()
    #: gate keys beyond the modalities: ``<name>.<key>`` reads the number ``details[value]`` and its
    #: interval ``details[interval]`` (None: none), for key -> (value, interval); a modality of the
    #: same name wins.
    gate_keys: ClassVar[dict[str, tuple[str, str | None]]] = {}

    bootstrap: int = 1000
    seed: int = 0
    level: float = 0.95

    @classmethod
    def requires_encoders(cls) -> bool:
        """Whether the diagnostic needs encoder-level evidence (skipped for black-box models)."""
        return bool(cls.needs & ENCODER_KINDS)

    def __post_init__(self) -> None:
        check_limits(self)

    @classmethod
    def param_names(cls) -> list[str]:
        """The diagnostic's own parameters (dataclass fields beyond the bootstrap ones)."""
        return [f.name for f in fields(cls) if f.name not in ("bootstrap", "seed", "level")]

    def params(self) -> dict[str, Any]:
        """Parameter values, for the report."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def check(self, modalities: Sequence[str]) -> None:
        """Refuse parameters that cannot apply to a model with these modalities (ConfigError); called
        before any evidence is collected, so a wrong setting fails before the long pass."""

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
            headline=self.headline,
            cells=self.cells,
            **kw,
        )


def contribution_measures(shareable: bool = False) -> tuple[str, ...]:
    """Registered contribution measures (plug-ins included), in registry order.

    Args:
        shareable: only those whose values ``balance`` can turn into shares.
    """
    return tuple(cls.name for cls in DIAGNOSTICS.classes()
                 if cls.contribution and (cls.shareable or not shareable))


def declared(name: str) -> type[Diagnostic] | None:
    """The registered class behind a result called ``name``; None for a name this installation does
    not know (a report written with a plug-in that is not installed here)."""
    return DIAGNOSTICS.get(name) if name in DIAGNOSTICS else None


class RegistryView:
    """A class attribute computed from the registry each time it is read.

    For metadata that depends on which diagnostics are registered (plug-ins load after the built-in
    classes are defined), e.g. ``uses = RegistryView(contribution_measures, shareable=True)``.
    """

    def __init__(self, query: Any, **kwargs: Any) -> None:
        self.query, self.kwargs = query, kwargs

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        return self.query(**self.kwargs)


def check_limits(diagnostic: "Diagnostic") -> None:
    """Refuse (ConfigError) a parameter outside what the diagnostic's ``limits`` declare."""
    for name, spec in type(diagnostic).limits.items():
        spec.check(getattr(diagnostic, name), f"{diagnostic.name} parameter {name}")
