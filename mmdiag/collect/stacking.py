"""Fusion-head calls on several feature sets of one batch, stacked into one call when that is exact.

The subsets and permutations kinds call the fusion head 2^M - 2 + K * M times a batch, each on the
batch's cached encoder outputs with some modality masked or shuffled. A small head (one linear layer)
costs less than the model's forward around it, so those calls were mostly overhead: at M = 4 they
took a quarter of a plain pass. Stacking the feature sets along the batch dimension makes it one
call of K x B rows, which gives each row the logits it would get alone when the model treats its
rows independently (an evaluation-mode model does, unless its forward mixes rows or reads the
batch size from the inputs).

That is checked, not assumed: the first stacked call of each shape (rows per set, number of sets)
is compared with the calls one set at a time, which must be equal to the last bit. A CPU matrix
product can round a row differently depending on how many rows share the call (a last batch of a
few rows does), so a shape the check has not seen is checked again. A difference leaves that shape
to one call per set; an error or a shape the split cannot undo turns stacking off for the rest of
the pass. Either way the numbers are those of one call per set.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from mmdiag.tensors import map_leaves_indexed, tensor_leaves

#: most bytes of stacked encoder outputs in one call (more sets go in several calls)
STACK_BYTES = 64 * 2**20


class StackedHead:
    """Logits of the fusion head on several feature sets of one batch (see the module docstring)."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        #: (rows per set, number of sets) -> whether the stacked call gave the same bits
        self.checked: dict[tuple[int, int], bool] = {}
        #: False once a stacked call raised or returned a shape the split cannot undo
        self.usable = True

    @property
    def exact(self) -> bool | None:
        """Whether stacking was exact for every shape checked so far (None: nothing checked yet)."""
        if not self.usable:
            return False
        return all(self.checked.values()) if self.checked else None

    def logits(self, inputs: Mapping[str, Tensor], feature_sets: Sequence[Mapping[str, Any]]) -> list[Tensor]:
        """``[adapter.head_forward(inputs, f) for f in feature_sets]``, in fewer calls when exact."""
        rows = _batch_rows(feature_sets)
        shape = (rows or 0, len(feature_sets))
        if not self.usable or len(feature_sets) < 2 or rows is None or self.checked.get(shape) is False:
            return self._one_at_a_time(inputs, feature_sets)
        if shape not in self.checked:
            singles = self._one_at_a_time(inputs, feature_sets)
            try:
                stacked = self._stacked(inputs, feature_sets, rows)
            except Exception:  # noqa: BLE001 - a forward that cannot take stacked features: one set at a time
                self.usable = False
                return singles
            self.checked[shape] = len(stacked) == len(singles) and all(
                a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(stacked, singles))
            return singles
        try:
            return self._stacked(inputs, feature_sets, rows)
        except Exception:  # noqa: BLE001 - checked on an earlier batch; one set at a time from now on
            self.usable = False
            return self._one_at_a_time(inputs, feature_sets)

    def _one_at_a_time(self, inputs: Mapping[str, Tensor], feature_sets: Sequence[Mapping[str, Any]]) -> list[Tensor]:
        return [self.adapter.head_forward(inputs, f) for f in feature_sets]

    def _stacked(self, inputs: Mapping[str, Tensor], feature_sets: Sequence[Mapping[str, Any]],
                 rows: int) -> list[Tensor]:
        per_set = sum(t.numel() * t.element_size() for f in feature_sets[:1] for v in f.values()
                      for t in tensor_leaves(v))
        group = max(1, STACK_BYTES // max(per_set, 1))
        out: list[Tensor] = []
        for start in range(0, len(feature_sets), group):
            sets = feature_sets[start:start + group]
            z = self.adapter.head_forward(inputs, {m: _cat_like([f[m] for f in sets]) for m in sets[0]},
                                          rows * len(sets))
            out.extend(z.split(rows))
        return out


def _batch_rows(feature_sets: Sequence[Mapping[str, Any]]) -> int | None:
    """The batch size shared by the first dimension of every feature tensor, or None."""
    sizes = {t.shape[0] if t.dim() else -1 for f in feature_sets for v in f.values() for t in tensor_leaves(v)}
    if len(sizes) != 1:
        return None
    rows = sizes.pop()
    return rows if rows > 0 else None


def _cat_like(values: Sequence[Any]) -> Any:
    """One structure like ``values[0]`` whose tensors are the matching tensors of every value,
    concatenated along dimension 0."""
    leaves = [tensor_leaves(v) for v in values]
    return map_leaves_indexed(lambda _t, i: torch.cat([lv[i or 0] for lv in leaves], dim=0), values[0])
