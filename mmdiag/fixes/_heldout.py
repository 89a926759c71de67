"""Held-out training rows for the fixes that measure generalisation (gblending, relearn).

Two ways to have rows the model never trains on, chosen at ``setup``:

* ``rows``: when the context carries the training data (the reference loop sets ``ctx.train_data``),
  a ``fraction`` of its rows is reserved through :meth:`FixContext.hold_out`; the loop leaves them
  out of every batch, and the fix evaluates the model on them with its own passes
  (:meth:`HeldOut.passes`).
* ``hash``: without the training data (a user's own loop that does not set it), a row is held out
  when a hash of its input values falls below ``fraction`` (:func:`row_hash`). The same row gets the
  same hash in every epoch, so it is held out in every epoch: the fix leaves it out of its training
  loss and reads its losses or features from the step's own forward. The held-out rows still pass
  through the forward (a BatchNorm layer sees them), and which rows they are depends on the values,
  not on their positions.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from mmdiag.adapter import unwrap
from mmdiag.fixes._fused import plain_adapter
from mmdiag.fixes.base import FixContext
from mmdiag.runtime.batching import Batches

#: odd 64-bit multiplier of the final mixing step (splitmix64), as a signed int64
_MIX = 0xBF58476D1CE4E5B9 - (1 << 64)
_RESOLUTION = 1 << 24


def _as_int64_bits(x: Tensor) -> Tensor:
    """[B, D] integers that identify each value exactly (float32 bit patterns, or integer values)."""
    flat = x.detach().reshape(x.shape[0], -1)
    if flat.is_floating_point():
        return flat.float().contiguous().view(torch.int32).to(torch.int64)
    return flat.to(torch.int64)


def row_hash(inputs: Mapping[str, Tensor], modalities: Sequence[str], seed: int = 0) -> Tensor:
    """A number in [0, 1) per row, a deterministic function of the row's input values alone.

    h = sum over modalities and positions of bits(x_j) * c_j with fixed odd multipliers c_j drawn from
    ``seed`` (integer arithmetic wrapping modulo 2^64, so the order of the sum does not matter and
    every device gives the same value), then mixed (splitmix64's xor-shift-multiply); the low 24 bits
    over 2^24 are the result.
    """
    total: Tensor | None = None
    for j, m in enumerate(modalities):
        bits = _as_int64_bits(inputs[m])
        gen = torch.Generator().manual_seed(int(seed) * 1009 + j)
        mult = torch.randint(1, 1 << 31, (bits.shape[1],), generator=gen, dtype=torch.int64) * 2 + 1
        part = (bits * mult.to(bits.device)).sum(dim=1)
        total = part if total is None else total + part
    assert total is not None
    h = total ^ (total >> 29)
    h = h * _MIX
    h = h ^ (h >> 32)
    return (h & (_RESOLUTION - 1)).double() / _RESOLUTION


class HeldOut:
    """The held-out rows of one fix (see the module docstring)."""

    def __init__(self, fraction: float, seed: int) -> None:
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.rows: tuple[int, ...] = ()
        self.mode = "rows"

    @classmethod
    def reserve(cls, ctx: FixContext, fraction: float, seed: int) -> "HeldOut":
        """Held-out rows for one run (a fix's ``setup``): reserved through the context when it has the
        training data, else chosen by the row hash."""
        held = cls(fraction, seed)
        held.rows = ctx.hold_out(held.fraction, held.seed) if ctx.train_data is not None else ()
        held.mode = "rows" if held.rows else "hash"
        return held

    def batch_mask(self, ctx: FixContext, inputs: Mapping[str, Tensor]) -> Tensor | None:
        """In ``hash`` mode, which rows of the batch are held out ([B] bool); None in ``rows`` mode."""
        if self.mode != "hash":
            return None
        return row_hash(inputs, ctx.modalities, self.seed).to(next(iter(inputs.values())).device) < self.fraction

    def training_rows(self, ctx: FixContext, n: int | None = None) -> tuple[int, ...]:
        """A fixed sample (seeded) of ``n`` training rows that are not held out (all of them for None)."""
        held = set(self.rows)
        order = torch.randperm(len(ctx.train_data), generator=torch.Generator().manual_seed(self.seed + 1))
        rows = [i for i in order.tolist() if i not in held]
        return tuple(sorted(rows if n is None else rows[:n]))

    @torch.no_grad()
    def passes(self, ctx: FixContext, rows: Sequence[int], chunk: int = 256
               ) -> Iterator[tuple[Any, dict[str, Tensor], Tensor, Tensor, dict[str, Any]]]:
        """(adapter, inputs, labels, logits, encoder outputs) of ``rows`` in chunks, in evaluation mode
        without gradients (training mode is restored afterwards, also after an exception)."""
        adapter = plain_adapter(ctx.adapter)
        model = unwrap(adapter.model)
        was = model.training
        model.eval()
        batches = Batches(ctx.train_data, ctx.modalities, ctx.device)
        try:
            for start in range(0, len(rows), chunk):
                inputs, labels = batches.get(list(rows[start:start + chunk]))
                logits, feats = adapter.encode(inputs)
                yield adapter, inputs, labels, logits, feats
        finally:
            model.train(was)


def release(ctx: FixContext, held: HeldOut | None) -> None:
    """Give the reserved rows back to the loop (a fix's ``teardown``; nothing to do in hash mode)."""
    if held is not None and held.rows:
        ctx.held_out = ()
