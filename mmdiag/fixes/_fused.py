"""The fused representation of a model: what enters its fusion head, read (and optionally replaced)
during a forward, for the fixes that distil or perturb it (mmanet, dmrnet).

When the adapter knows the head module (``head=``, or found by name), the representation is the head's
input: a forward pre-hook, installed only for the calls inside :func:`fused_input` and removed on
leaving it (also after an exception), flattens the head's floating-point positional arguments of the
batch size and concatenates them, [B, D]. A ``transform`` may return a new [B, D] tensor, which is
split and reshaped back into the head's arguments. Without a known head, the representation is the
concatenation of the pooled encoder outputs (:func:`pooled_concat`).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from mmdiag.adapter import ModelAdapter, find_module, unwrap
from mmdiag.errors import ConfigError

__all__ = ["fused_input", "head_module", "plain_adapter", "pooled_concat", "single"]


def head_module(adapter: ModelAdapter, model: nn.Module | None = None) -> nn.Module | None:
    """The fusion head of ``model`` (default: the adapter's model), or None when the adapter names none."""
    if not adapter.head:
        return None
    return find_module(unwrap(model if model is not None else adapter.model), adapter.head)


def plain_adapter(adapter: ModelAdapter, model: nn.Module | None = None) -> ModelAdapter:
    """A copy of ``adapter`` driving ``model`` (default: the adapter's model without its
    DistributedDataParallel wrapper), with its own module lookup table and stub pool."""
    target = model if model is not None else unwrap(adapter.model)
    if target is adapter.model:
        return adapter
    out = copy.copy(adapter)
    out.model = target
    out.__dict__.pop("_module_cache", None)
    out.__dict__.pop("_stub_pool", None)
    return out


def _parts(args: tuple, batch: int | None) -> list[int]:
    return [j for j, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point() and a.dim() >= 1
            and (batch is None or a.shape[0] == batch)]


@contextlib.contextmanager
def fused_input(module: nn.Module, transform: Callable[[Tensor], Tensor] | None = None) -> Iterator[list[Tensor]]:
    """Record the representation entering ``module`` at each call inside the block (a list of [B, D]
    tensors, with grad), replacing it by ``transform(representation)`` when given."""
    seen: list[Tensor] = []

    def hook(_mod: nn.Module, args: tuple) -> tuple | None:
        idx = _parts(args, None)
        if not idx:
            raise ConfigError(
                f"The fusion head ({type(_mod).__name__}) received no floating-point tensor argument, so its input "
                "cannot serve as the fused representation. Name as `head` the module that receives the fused "
                "features as a tensor (for instance the final classifier), or name none to use the pooled "
                "encoder outputs."
            )
        batch = args[idx[0]].shape[0]
        idx = _parts(args, batch)
        parts = [args[j] for j in idx]
        flat = torch.cat([p.reshape(batch, -1) for p in parts], dim=1)
        seen.append(flat)
        if transform is None:
            return None
        new = transform(flat)
        out = list(args)
        offset = 0
        for j, p in zip(idx, parts):
            n = p[0].numel() if p.dim() > 1 else 1
            out[j] = new[:, offset:offset + n].reshape(p.shape).to(p.dtype)
            offset += n
        return tuple(out)

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def single(seen: list[Tensor], what: str) -> Tensor:
    """The one representation recorded by :func:`fused_input` (ConfigError when the head ran another
    number of times in one forward)."""
    if len(seen) != 1:
        raise ConfigError(
            f"The fusion head ran {len(seen)} times in one forward of the {what}, so its input is not one fused "
            "representation per sample. Name as `head` a module that runs once per forward, or name none to "
            "use the pooled encoder outputs."
        )
    return seen[0]


def pooled_concat(adapter: ModelAdapter, features: Mapping[str, Any]) -> Tensor:
    """The concatenated pooled encoder outputs, [B, sum of the feature sizes] (float)."""
    return torch.cat([adapter.pooled(m, features[m]).flatten(1).float() for m in adapter.modalities], dim=1)
