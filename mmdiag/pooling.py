"""Pooling encoder outputs of any rank into one vector per sample for the feature diagnostics.

Probes, prototypes, the MDI entropy and the evidential readouts need one feature vector per sample
and modality. An encoder output ``[B, D]`` is that already. Higher ranks are pooled over their
non-channel axes, so the vector has one entry per *channel*:

* channels first (CNN layout, ``[B, C, L]``, ``[B, C, H, W]``): pooled over the trailing axes;
* channels last (token layout, ``[B, T, D]`` from a transformer, ``[B, H, W, C]``): pooled over the
  middle axes.

Which layout an output has is read from the last layer that produced it (a ``Conv``/``BatchNorm``/
pooling layer means channels first; a ``Linear``/``LayerNorm``/``Embedding``/attention layer means
channels last), found on a real batch. When no such layer decides, rank 3 is read as tokens
(channels last) and rank 4 and more as a CNN map (channels first); the choice is recorded in the
report settings either way.

Modes (``[collect] pool``): ``mean`` over the non-channel axes (default), ``first`` (the first
position, e.g. a CLS token), ``flatten`` (every element, in order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import contextlib

from torch import Tensor, nn

from mmdiag.errors import ConfigError
from mmdiag.tensors import first_tensor

POOL_MODES = ("mean", "first", "flatten")

_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)
_CHANNELS_LAST = (
    nn.Linear, nn.LayerNorm, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention,
    nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder,
    nn.RNNBase, nn.Bilinear,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass(frozen=True)
class Layout:
    """How one modality's encoder output is laid out: its shape (batch excluded) and channel axis."""

    shape: tuple[int, ...]
    channels: str  # "first" or "last"
    source: str  # what decided it: a layer type, or "rank default"

    def describe(self, mode: str) -> str:
        """A sentence for the report, e.g. ``[B, 12, 32] tokens (channels last, from Linear): mean over axis 1``."""
        dims = ", ".join(["B", *map(str, self.shape)])
        if len(self.shape) <= 1:
            return f"[{dims}]: used as it is"
        axes = self.pooled_axes()
        what = "every element" if mode == "flatten" else f"{mode} over axis {', '.join(map(str, axes))}"
        return f"[{dims}] channels {self.channels} (from {self.source}): {what}"

    def pooled_axes(self) -> tuple[int, ...]:
        rank = len(self.shape) + 1
        return tuple(range(2, rank)) if self.channels == "first" else tuple(range(1, rank - 1))


def pool(feature: Any, layout: Layout | None = None, mode: str = "mean") -> Tensor:
    """One vector per sample from an encoder output (the first tensor of a tuple/dict output).

    Without a ``layout`` the rank default applies: ``[B, T, D]`` is read as tokens, four and more
    axes as a CNN map.
    """
    t = first_tensor(feature)
    if t.dim() == 1:
        return t[:, None]
    if t.dim() == 2:
        return t
    if mode == "flatten":
        return t.flatten(1)
    channels = layout.channels if layout is not None else ("last" if t.dim() == 3 else "first")
    if channels == "last":
        t = t.movedim(-1, 1)  # [B, C, ...] either way from here
    if mode == "first":
        return t.flatten(2)[:, :, 0]
    return t.flatten(2).mean(dim=2)


def check_mode(mode: str) -> str:
    if mode not in POOL_MODES:
        raise ConfigError(f"pool must be one of {', '.join(POOL_MODES)}; found {mode!r}.")
    return mode


@contextlib.contextmanager
def record_layers(encoder: nn.Module) -> Iterator[list[tuple[nn.Module, tuple[int, ...] | None]]]:
    """Record (module, output shape) of ``encoder`` and its submodules in the order they finish."""
    seen: list[tuple[nn.Module, tuple[int, ...] | None]] = []
    handles = []

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        shape = tuple(out.shape) if isinstance(out, Tensor) else (
            tuple(out[0].shape) if isinstance(out, tuple) and out and isinstance(out[0], Tensor) else None)
        seen.append((mod, shape))

    try:
        # the encoder itself too: an encoder that is one layer (a Conv1d) decides its own layout,
        # and it finishes last, so a decisive inner layer of the same shape is looked at after it
        for sub in encoder.modules():
            handles.append(sub.register_forward_hook(hook))
        yield seen
    finally:
        for h in handles:
            h.remove()


def infer_layout(output: Any, layers: list[tuple[nn.Module, tuple[int, ...] | None]]) -> Layout:
    """The layout of an encoder output from the layers that ran inside the encoder (last first)."""
    t = first_tensor(output)
    shape = tuple(t.shape)
    if t.dim() <= 2:
        return Layout(shape[1:], "last", "rank")
    for mod, out_shape in reversed(layers):
        if out_shape is None or len(out_shape) != len(shape) or out_shape[1:] != shape[1:]:
            continue
        if isinstance(mod, _CHANNELS_FIRST):
            return Layout(shape[1:], "first", type(mod).__name__)
        if isinstance(mod, _CHANNELS_LAST):
            return Layout(shape[1:], "last", type(mod).__name__)
    return Layout(shape[1:], "last" if t.dim() == 3 else "first", "rank default")
