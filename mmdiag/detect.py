"""Finding how to drive a model: its call convention, its encoders and its fusion head.

Detection reads the model's ``forward`` signature and its module names. What it cannot decide
without guessing (data keys that match none of forward's parameter names, say) it refuses with a
message rather than guess: a wrong guess changes the method without a word.
"""

from __future__ import annotations

import inspect
from typing import Literal, Mapping, Sequence

from torch import nn

from mmdiag.errors import ConfigError
from mmdiag.registry import closest

CallStyle = Literal["dict", "kwargs", "positional"]

# Names that a fusion head commonly goes by in research code, most specific first.
_HEAD_NAMES = ("fusion_head", "fusion_module", "fusion", "head", "classifier", "fc_out", "cls", "fc")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module) and inner is not model:
            model = inner
        else:
            return model


def forward_parameters(model: nn.Module) -> list[inspect.Parameter] | None:
    """The named parameters of ``forward`` (no ``*args``/``**kwargs``), or None if unreadable."""
    try:
        return [
            p
            for p in inspect.signature(unwrap(model).forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
    except (TypeError, ValueError):
        return None


def detect_call_style(model: nn.Module, modalities: Sequence[str]) -> CallStyle:
    """How ``model.forward`` takes its inputs, from its signature.

    * ``kwargs`` when every modality name is a parameter name (extra optional parameters, such as
      a missing-modality mask, keep their defaults);
    * ``dict`` when forward takes one required parameter and there are several modalities;
    * ``positional`` when forward takes only ``*args`` (nothing to match names against).

    Otherwise the data's keys and forward's parameter names disagree (``image`` vs ``visual``):
    calling positionally would be a guess that silently decides which tensor goes where, so a
    :class:`ConfigError` names both sets and the ways to say what is meant.
    """
    params = forward_parameters(model)
    if params is None:
        return "positional"
    names = [p.name for p in params]
    if all(m in names for m in modalities):
        return "kwargs"
    required = [p for p in params if p.default is p.empty]
    if len(required) == 1 and len(modalities) > 1:
        return "dict"
    if not params:
        return "positional"
    raise ConfigError(
        f"The data's modalities ({', '.join(modalities)}) do not match the parameter names of the "
        f"model's forward ({', '.join(names)}), so mmdiag cannot tell which tensor goes where. "
        "Rename the data arrays after forward's parameters, or say how to call the model: "
        f"`call='positional'` passes the modalities in the order given by `modalities={list(modalities)!r}` "
        "(list them in forward's order)."
    )


def find_module(root: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name``; ConfigError with the closest name otherwise."""
    modules = dict(root.named_modules())
    if name not in modules:
        known = [n for n in modules if n]
        near = closest(name, known)
        hint = f" Did you mean {near!r}?" if near else ""
        raise ConfigError(
            f"The model has no submodule named {name!r}.{hint} Top-level submodules: "
            f"{', '.join(n for n, _ in root.named_children()) or '(none)'}."
        )
    return modules[name]


def find_encoders(root: nn.Module, modalities: Sequence[str]) -> dict[str, str] | None:
    """Encoder submodule names found from module names that contain the modality names, or None.

    For each modality, the shallowest submodule whose own name (last path component) contains the
    modality name; see :func:`search_encoders` for why a search finds none.
    """
    return search_encoders(root, modalities)[0]


def search_encoders(root: nn.Module, modalities: Sequence[str]) -> tuple[dict[str, str] | None, str]:
    """(modality -> encoder name, or None; the reason when None).

    Found only when every modality has exactly one shallowest module named like it and no module
    is claimed twice or contains another's (a modality name inside another, "rgb" in "rgbd").
    """
    found: dict[str, str] = {}
    names = [n for n, _ in root.named_modules() if n]
    for m in modalities:
        hits = [n for n in names if m.lower() in n.rsplit(".", 1)[-1].lower()]
        if not hits:
            return None, f"no submodule is named like {m!r}"
        depth = min(h.count(".") for h in hits)
        top = [h for h in hits if h.count(".") == depth]
        if len(top) != 1:
            return None, f"{m!r} matches several submodules ({', '.join(top[:4])}), so none is taken as its encoder"
        found[m] = top[0]
    paths = list(found.values())
    for a in paths:
        for b in paths:
            if a == b and list(found.values()).count(a) > 1 or a != b and b.startswith(a + "."):
                owners = [m for m, p in found.items() if p in (a, b)]
                return None, f"{' and '.join(map(repr, owners))} match the same module tree ({a})"
    return found, ""


def find_head(root: nn.Module, encoders: Mapping[str, str] | None) -> str | None:
    """A fusion-head submodule by conventional name, outside the encoders, or ``None``."""
    children = dict(root.named_children())
    enc_roots = {e.split(".")[0] for e in (encoders or {}).values()}
    for name in _HEAD_NAMES:
        if name in children and name not in enc_roots:
            return name
    return None


