"""What training reports: a :class:`TrainProgress` per batch and per epoch, and the :class:`History`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from mmdiag.io import write_atomic

__all__ = ["History", "ProgressFn", "TrainProgress"]


@dataclass
class TrainProgress:
    """What a ``progress`` callback receives after every batch and every epoch.

    Attributes:
        stage: ``batch`` or ``epoch``.
        epoch: 0-based epoch; epochs: planned epochs.
        batch: batches done in this epoch; batches: batches per epoch.
        loss: mean training loss of the epoch so far.
        signals: the fix's latest signals.
        row: the history row (``epoch`` stage only).
    """

    stage: str
    epoch: int
    epochs: int
    batch: int
    batches: int
    loss: float
    signals: dict[str, Any]
    row: dict[str, Any] | None = None


ProgressFn = Callable[[TrainProgress], None]


@dataclass
class History:
    """One row per completed epoch: ``epoch`` (0-based), ``loss``, ``lr``, ``val_loss``,
    ``val_accuracy``, ``unimodal_acc.<m>`` (accuracy with only ``m`` present, others masked as the
    adapter masks), ``signal.<key>`` (the fix's signals), ``log.<key>`` (epoch means of the fix's
    per-step logs) and ``time_s``.

    Attributes:
        rows: the rows.
        fix: name of the fix that was trained.
        checkpoint: path of the last checkpoint written (None without ``out_dir``).
        aux: the auxiliary modules fixes added (unimodal heads...), empty for most fixes.
        resumed_from: epoch (and batch) the run resumed from, when it did.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    fix: str = "none"
    checkpoint: str | None = None
    aux: nn.ModuleDict = field(default_factory=nn.ModuleDict, repr=False)
    resumed_from: dict[str, int] | None = None

    @property
    def last(self) -> dict[str, Any]:
        """The last row ({} before the first epoch)."""
        return self.rows[-1] if self.rows else {}

    def column(self, name: str) -> list[Any]:
        """Values of one column over the epochs (None where a row lacks it)."""
        return [r.get(name) for r in self.rows]

    def to_frame(self) -> Any:
        """The rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write ``history.csv`` atomically."""
        path = Path(path)
        text = self.to_frame().to_csv(index=False)
        write_atomic(path, text)
        return path
