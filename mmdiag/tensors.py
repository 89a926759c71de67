"""Trees of tensors: what encoders and models return, walked, copied and read the same way everywhere.

An encoder may return a tensor, a tuple or list (``(sequence, pooled)``), a dict, a named tuple, a
dataclass or a Hugging Face ``ModelOutput`` (an ordered dict that is also a dataclass). Masking a
modality replaces every tensor in that tree, so a container mmdiag cannot rebuild would leave a
modality unmasked without anyone noticing: :func:`unsupported_container` finds one so the adapter
can refuse feature-level masking of it.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from mmdiag.errors import AdapterError

#: How a model's output was read, recorded in the report: ``multiclass`` ([B, C] logits) or
#: ``binary`` ([B] or [B, 1] logits of one class, read as the two-class logits [0, z]).
OUTPUT_KINDS = ("multiclass", "binary")


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def map_tensors(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    """Apply ``fn`` to every tensor in a nested structure, keeping the containers' types.

    Tuples, named tuples, lists, dicts (and dict subclasses that can be rebuilt from a dict) and
    dataclasses are walked; any other object is returned as it is (see :func:`unsupported_container`).
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    if _is_namedtuple(obj):
        return type(obj)(*(map_tensors(fn, o) for o in obj))
    if isinstance(obj, tuple):
        return tuple(map_tensors(fn, o) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(fn, o) for o in obj]
    if isinstance(obj, Mapping):
        mapped = {k: map_tensors(fn, v) for k, v in obj.items()}
        if type(obj) is dict:
            return mapped
        try:  # OrderedDict, Hugging Face ModelOutput, ...: keep the type the model expects
            return type(obj)(**mapped) if dataclasses.is_dataclass(obj) else type(obj)(mapped)
        except Exception:  # noqa: BLE001 - a mapping that cannot be rebuilt is read as a plain dict
            return mapped
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_tensors(fn, getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


def leaf_key(name: str, index: int | None) -> str:
    """The key of a statistic of one tensor of a structured value: ``name`` for a plain tensor
    (``index`` None), ``name[index]`` for the index-th tensor of a structure (the order of
    :func:`tensor_leaves`)."""
    return name if index is None else f"{name}[{index}]"


def map_leaves_indexed(fn: Callable[[Tensor, int | None], Any], obj: Any) -> Any:
    """:func:`map_tensors` with each tensor's position: None for a plain tensor, else its index in
    :func:`tensor_leaves` order."""
    if isinstance(obj, Tensor):
        return fn(obj, None)
    position = itertools.count()
    return map_tensors(lambda t: fn(t, next(position)), obj)


def clone_tree(obj: Any) -> Any:
    """A private copy of every tensor in ``obj`` (autograd still flows through the copy).

    The adapter keeps copies of captured encoder outputs and hands the model a fresh copy at each
    replay, so a model that fuses in place (``out.add_(other)``, ``relu_``, ``x += y``) can never
    write into the features mmdiag reads.
    """
    return map_tensors(lambda t: t.clone(), obj)


def tensor_leaves(obj: Any) -> list[Tensor]:
    """Every tensor in a nested structure, in order."""
    found: list[Tensor] = []
    map_tensors(lambda t: found.append(t), obj)
    return found


def unsupported_container(obj: Any) -> str | None:
    """The type name of a non-tensor object in ``obj`` that holds tensors mmdiag cannot rebuild, or None.

    Such an object (a custom class with tensor attributes) would pass through masking unchanged.
    """
    if isinstance(obj, Tensor) or obj is None or isinstance(obj, (int, float, bool, str)):
        return None
    if isinstance(obj, (tuple, list)):
        items: Any = list(obj)
    elif isinstance(obj, Mapping):
        items = list(obj.values())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    else:
        holds = any(isinstance(v, Tensor) for v in vars(obj).values()) if hasattr(obj, "__dict__") else False
        return type(obj).__qualname__ if holds else None
    for item in items:
        bad = unsupported_container(item)
        if bad:
            return bad
    return None


def first_tensor(obj: Any) -> Tensor:
    """The first tensor in a nested output (an encoder that returns ``(sequence, pooled)``, say)."""
    leaves = tensor_leaves(obj)
    if not leaves:
        raise AdapterError(f"An encoder returned {type(obj).__name__} with no tensor in it.")
    return leaves[0]


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, a mapping or object with ``logits``, or a tuple's first item."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        raise AdapterError(
            f"The model returned a mapping with keys {sorted(map(str, output))}; expected a "
            "'logits' entry holding a [batch, classes] tensor. Return the logits, or a dict with 'logits'."
        )
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise AdapterError(
        f"The model returned {type(output).__name__}; expected a [batch, classes] logits tensor, "
        "a dict with 'logits', or a tuple whose first item is the logits."
    )


def as_class_logits(logits: Tensor, batch: int) -> tuple[Tensor, str]:
    """``[B, C]`` class logits from a model's logits, and the output kind.

    ``[B, C]`` with C >= 2 is returned as it is (``multiclass``). ``[B, 1]`` and ``[B]`` are a
    binary classifier's single logit z (trained with ``BCEWithLogitsLoss``, decision at z = 0):
    they become the two-class logits ``[0, z]``, whose softmax is ``[1 - sigmoid(z), sigmoid(z)]``
    and whose cross-entropy equals the binary cross-entropy of z, so every diagnostic and fix
    applies unchanged (``binary``).
    """
    if logits.dim() == 1 and logits.shape[0] == batch:
        logits = logits[:, None]
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise AdapterError(
            f"The model's logits have shape {tuple(logits.shape)}; expected [batch={batch}, classes], "
            f"or [batch] / [batch, 1] for a binary classifier with one logit. Check the forward "
            "convention (dict, keyword or positional call) and that the model returns class logits."
        )
    if logits.shape[1] == 1:
        return _binary_to_two_class(logits), "binary"
    return logits, "multiclass"


def _binary_to_two_class(z: Tensor) -> Tensor:
    return torch.cat([torch.zeros_like(z), z], dim=1)
