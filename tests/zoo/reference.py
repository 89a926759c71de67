"""Brute-force reference for the zoo: coalition accuracies and exact Shapley values in plain torch.

Independent of mmdiag on purpose: nothing here imports it. "Modality m absent" is

* at the feature level: a forward hook on m's encoder module that *returns* zeros shaped like the
  encoder's output (every tensor of a tuple/list/dict output), so the rest of the network runs
  unchanged on a zero feature; a module shared by several modalities is hooked per call (the
  k-th call of the module belongs to one modality);
* at the input level (black boxes, or when mmdiag falls back): the raw input replaced by zeros.

Every coalition is one full forward of the whole data set. Shapley values average the marginal
gains over all M! orders in which the modalities can be added (not the subset-weight formula), so
the reference does not share a formula with the code under test.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

#: where a modality's encoder output comes from: (dotted module path, call index or None for every call)
EncoderSite = tuple[str, "int | None"]


def zeros_like_output(out: Any) -> Any:
    """Zeros shaped like an encoder output, for every tensor of a nested tuple/list/dict."""
    if isinstance(out, Tensor):
        return torch.zeros_like(out)
    if isinstance(out, tuple):
        return tuple(zeros_like_output(o) for o in out)
    if isinstance(out, list):
        return [zeros_like_output(o) for o in out]
    if isinstance(out, dict):
        return {k: zeros_like_output(v) for k, v in out.items()}
    raise TypeError(f"cannot build a zero mask for an encoder output of type {type(out).__name__}")


@contextlib.contextmanager
def absent_at(model: nn.Module, sites: Sequence[EncoderSite]) -> Iterator[None]:
    """Within the block, each site's module output (or its k-th call's output) is replaced by zeros."""
    modules = dict(model.named_modules())
    every: set[str] = {path for path, k in sites if k is None}
    calls: dict[str, set[int]] = {}
    for path, k in sites:
        if k is not None:
            calls.setdefault(path, set()).add(k)
    handles = []
    try:
        for path in sorted(every | set(calls)):
            counter = itertools.count()

            def hook(_mod: nn.Module, _inp: Any, out: Any, path: str = path, counter: Any = counter) -> Any:
                k = next(counter)
                if path in every or k in calls.get(path, ()):
                    return zeros_like_output(out)
                return None

            handles.append(modules[path].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def predictions(z: Tensor, binary: bool) -> Tensor:
    """Class decisions: argmax, or ``logit > 0`` for a single-logit binary classifier."""
    if binary:
        return (z.reshape(z.shape[0], -1)[:, 0] > 0).long()
    return z.argmax(dim=-1)


def near_ties(z: Tensor, binary: bool, eps: float = 1e-5) -> int:
    """Rows whose decision hangs on less than ``eps`` (exact ties are deterministic and not counted)."""
    if binary:
        m = z.reshape(z.shape[0], -1)[:, 0].abs()
    else:
        top = z.topk(2, dim=-1).values
        m = top[:, 0] - top[:, 1]
    return int(((m > 0) & (m < eps)).sum())


@dataclass
class Reference:
    """What mmdiag should report: fused accuracy, unimodal accuracies, Shapley values."""

    modalities: tuple[str, ...]
    coalitions: dict[frozenset, float]
    near_ties: int = 0
    accuracy: float = field(init=False)
    unimodal: dict[str, float] = field(init=False)
    shapley: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        mods = self.modalities
        self.accuracy = self.coalitions[frozenset(mods)]
        self.unimodal = {m: self.coalitions[frozenset([m])] for m in mods}
        phi = {m: 0.0 for m in mods}
        orders = list(itertools.permutations(mods))
        for order in orders:
            present: set[str] = set()
            for m in order:
                before = self.coalitions[frozenset(present)]
                present.add(m)
                phi[m] += self.coalitions[frozenset(present)] - before
        self.shapley = {m: phi[m] / math.factorial(len(mods)) for m in mods}


def reference(
    model: nn.Module,
    call: Callable[[nn.Module, Mapping[str, Tensor]], Any],
    logits_of: Callable[[Any], Tensor],
    inputs: Mapping[str, Tensor],
    labels: Tensor,
    modalities: Sequence[str],
    sites: Mapping[str, EncoderSite] | None,
    binary: bool = False,
) -> Reference:
    """Accuracy of every coalition; ``sites=None`` masks inputs, otherwise encoder outputs."""
    mods = tuple(modalities)
    model.eval()
    coalitions: dict[frozenset, float] = {}
    ties = 0
    with torch.no_grad():
        for r in range(len(mods) + 1):
            for present in itertools.combinations(mods, r):
                absent = [m for m in mods if m not in present]
                if sites is None:
                    x = {m: (inputs[m] if m in present else torch.zeros_like(inputs[m])) for m in mods}
                    z = logits_of(call(model, x))
                else:
                    with absent_at(model, [sites[m] for m in absent]):
                        z = logits_of(call(model, dict(inputs)))
                ties += near_ties(z, binary)
                coalitions[frozenset(present)] = float((predictions(z, binary) == labels).double().mean())
    return Reference(mods, coalitions, ties)
