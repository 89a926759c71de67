"""The producer protocol: one evidence kind, gathered during the main pass.

A producer declares its :class:`~mmdiag.evidence.EvidenceKind` (name, fields, how they merge) and
implements a few steps that the main pass calls: ``prepare`` on a few rows before the pass (may
say why it cannot run), ``start`` once the number of rows is known (row selection), ``accumulate``
per batch, ``flush`` at the end of the pass, and ``finish`` (the fields it fills, plus facts for
``Evidence.meta``). Adding a kind is one module with one registered producer, plus its test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from torch import Tensor

from mmdiag.errors import AdapterError, EvidenceError
from mmdiag.evidence import EvidenceKind, register_kind


@dataclass
class Batch:
    """One evaluated batch as every producer sees it.

    ``feats`` are the encoder outputs of the batch (None for a black box); ``logits`` the fused
    logits; ``offset`` the row number of its first row in the pass.
    """

    offset: int
    inputs: dict[str, Tensor]
    labels: Tensor
    extras: dict[str, Tensor]
    logits: Tensor
    feats: Mapping[str, Any] | None

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


class Producer:
    """Gathers one evidence kind. Subclasses set ``kind`` and override the steps they need.

    Attributes:
        kind: the evidence kind (registered with :func:`register_producer`).
        order: position in the per-batch loop (random draws happen in this order, so it is fixed).
        auto: runs whenever it applies, without being requested (its kind is not requestable).
        caps: :class:`~mmdiag.collect.settings.CollectSettings` fields that cap its rows; split
            between processes under torchrun so the total stays the same.
        failures: exceptions that make the kind unavailable (with the reason) instead of ending
            the pass.
        needs_stats: needs the statistics pass (the data's scale) before the main pass.
    """

    kind: ClassVar[EvidenceKind]
    order: ClassVar[int] = 100
    auto: ClassVar[bool] = False
    caps: ClassVar[tuple[str, ...]] = ()
    failures: ClassVar[tuple[type[BaseException], ...]] = (EvidenceError, AdapterError, RuntimeError)
    needs_stats: ClassVar[bool] = False

    def __init__(self, run: Any) -> None:
        self.run = run  # the pass's shared state (adapter, settings, generator, row counts)

    def prepare(self, sample: Mapping[str, Tensor]) -> str | None:
        """Check on a few rows before the pass; a reason when the kind cannot be gathered."""
        return None

    def start(self) -> None:
        """Called once the rows of the pass are known (``run.n_total``): choose subsample rows."""

    def accumulate(self, batch: Batch) -> None:
        """Gather this kind's evidence from one batch."""

    def flush(self) -> None:
        """Gather what is still buffered at the end of the pass."""

    def finish(self) -> dict[str, Any]:
        """The evidence fields this producer fills (``{}`` when nothing was gathered)."""
        return {}

    def meta(self) -> dict[str, Any]:
        """Facts for ``Evidence.meta`` (e.g. ``{"subsample_rows": {"grad": 128}}``)."""
        return {}


#: Registered producers by kind name.
PRODUCERS: dict[str, type[Producer]] = {}


def register_producer(cls: type[Producer]) -> type[Producer]:
    """Class decorator: register the producer and its evidence kind."""
    register_kind(cls.kind)
    PRODUCERS[cls.kind.name] = cls
    return cls
