"""Checkpoint layouts: where a checkpoint keeps its weights and how their names map onto the model's.

A checkpoint file holds either a bare state dict, a dict that wraps one (``{"state_dict": ...}``,
``{"model": ...}``, a Lightning ``.ckpt`` with its training state beside the weights), or a whole
pickled module (Hugging Face style folders are :mod:`mmdiag.loading.folders`). Nothing here reads
a file: :mod:`mmdiag.loading.checkpoints` reads, this module only looks at what was read.

Names are matched by one rule: the checkpoint's keys are used as they are when they match the
model's; otherwise the shortest dotted prefix ``p`` such that ``{k[len(p):] for k starting with p}``
matches the model's keys is stripped (``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``,
a LightningModule's attribute such as ``model.``, or any combination such as ``model.module.``).
Keys outside ``p`` are dropped only in a Lightning checkpoint (whose LightningModule may keep a
loss or a teacher beside the model), only when the stripped keys match the model exactly and none
of the dropped keys sits under ``p``'s first attribute; they are reported. Two different prefixes
that both match are an error, never a guess. ``--strip-prefix`` names the prefix outright.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mmdiag.errors import LoadError

#: Keys of a wrapper dict searched, in this order, for the state dict.
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "net", "module")
#: Top-level entries that only a Lightning checkpoint has beside its ``state_dict``.
LIGHTNING_MARKERS: tuple[str, ...] = (
    "pytorch-lightning_version", "global_step", "loops", "optimizer_states", "lr_schedulers",
)
SHOW = 5  # how many keys of each kind a message lists
FLAGS_HINT = (
    "If the weights sit under another entry of the checkpoint or another prefix, name them with "
    "`key=KEY` or `strip_prefix=PREFIX`."
)


def list_keys(keys: Sequence[str]) -> str:
    """The first few ``keys``, comma-separated, with ``...`` when there are more."""
    shown = ", ".join(keys[:SHOW])
    return shown + (", ..." if len(keys) > SHOW else "")


def is_tensor_map(obj: Any) -> bool:
    """Whether ``obj`` is a non-empty mapping of str names to tensors (a state dict)."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    return all(
        isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))
        for k, v in obj.items()
    )


def describe(obj: Any) -> str:
    """A short description of a checkpoint's object for messages ("a dict with keys ...")."""
    if isinstance(obj, Mapping):
        if not obj:
            return "an empty dict"
        keys = [repr(k) for k in list(obj)[:10]]
        return f"a dict with keys {', '.join(keys)}" + (" ..." if len(obj) > 10 else "")
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def lookup(obj: Any, key: str, path: Path) -> Any:
    """The entry ``key`` of ``obj``: a top-level key, or a dotted path through nested dicts."""
    if isinstance(obj, Mapping) and key in obj:
        return obj[key]
    here: Any = obj
    walked: list[str] = []
    for part in key.split("."):
        if isinstance(here, Mapping) and part in here:
            here = here[part]
        elif isinstance(here, (list, tuple)) and part.isdigit() and int(part) < len(here):
            here = here[int(part)]
        else:
            where = f"under {'.'.join(walked)!r}" if walked else "at the top level"
            raise LoadError(
                f"Checkpoint {path} has no entry {key!r} (`key`): expected {part!r} "
                f"{where}, found {describe(here)}. Pass one of those keys as `key` (a "
                f"dotted path such as model.state_dict reaches into nested dicts)."
            )
        walked.append(part)
    return here


def _is_lightning(obj: Mapping[str, Any]) -> bool:
    return "state_dict" in obj and any(m in obj for m in LIGHTNING_MARKERS)


def unwrap(obj: Any, path: Path, fmt: str, key: str | None = None) -> tuple[dict[str, Any], str, str | None, str]:
    """(state dict, format, key it was read from, layout) from what a checkpoint file held.

    ``key`` (``--checkpoint-key``) names the entry to read; otherwise a bare state dict is used as
    it is, a dict's entries :data:`WRAPPER_KEYS` are searched in order, and failing those the one
    entry that is a state dict. The layout is "state-dict", "wrapped", "lightning" or "module".
    """
    layout = "lightning" if isinstance(obj, Mapping) and _is_lightning(obj) else "wrapped"
    if key is not None:
        if is_tensor_map(obj):
            raise LoadError(
                f"Checkpoint {path} is a bare state dict (its keys are parameter names such as "
                f"{list_keys(list(obj))}), so there is no entry {key!r} to read: `key` "
                f"names the entry of a dict that wraps the state dict. Drop `key`."
            )
        inner = lookup(obj, key, path)
        if isinstance(inner, nn.Module):
            return dict(inner.state_dict()), _module_format(fmt), key, "module"
        if is_tensor_map(inner):
            return dict(inner), fmt, key, layout
        raise LoadError(
            f"Checkpoint {path}: the entry {key!r} (`key`) holds {describe(inner)}; "
            f"expected a state dict (parameter names mapped to tensors) or an nn.Module. Pass "
            f"the key of the entry that holds the weights."
        )
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), _module_format(fmt), None, "module"
    if is_tensor_map(obj):
        return dict(obj), fmt, None, "state-dict"
    if isinstance(obj, Mapping):
        for name in WRAPPER_KEYS:
            inner = obj.get(name)
            if isinstance(inner, nn.Module):
                return dict(inner.state_dict()), "module-pickle", name, "module"
            if is_tensor_map(inner):
                return dict(inner), fmt, name, layout
        found = [k for k, v in obj.items() if isinstance(k, str) and is_tensor_map(v)]
        if len(found) == 1:
            return dict(obj[found[0]]), fmt, found[0], layout
        if len(found) > 1:
            raise LoadError(
                f"Checkpoint {path} holds several state dicts, under {', '.join(map(repr, found))}; "
                f"expected one, or one under {', '.join(map(repr, WRAPPER_KEYS))}. Name the one "
                f"to load with `key` (for example `key={found[0]!r}`)."
            )
    raise LoadError(
        f"Checkpoint {path} holds {describe(obj)}; expected a state dict (a mapping of parameter "
        f"names to tensors), a dict with one under 'state_dict', 'model_state_dict', 'model', "
        f"'net' or 'module', or a whole nn.Module. Name the entry that holds the weights with "
        f"`key=KEY`, or re-save it with torch.save(model.state_dict(), path)."
    )


def _module_format(fmt: str) -> str:
    return "torchscript" if fmt == "torchscript" else "module-pickle"


# --------------------------------------------------------------------------------------------
# Key matching
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyMatch:
    """How the checkpoint's keys were mapped onto the model's.

    ``state`` is the state dict with the ``prefix`` removed (``None``: keys used as they are);
    ``dropped`` the checkpoint keys outside the prefix, left out because the rest matched the model
    exactly; ``exact`` whether the keys now match the model's; ``tried`` the prefixes examined,
    shortest first; ``closest`` how many of the model's tensors (names and shapes) the best
    candidate supplied; ``near``
    the prefixes that would match if the keys outside them were dropped, which was not allowed.
    """

    state: dict[str, Any]
    prefix: str | None
    dropped: tuple[str, ...]
    exact: bool
    tried: tuple[str, ...] = ()
    closest: int = 0
    near: tuple[str, ...] = ()


def _dotted_prefixes(key: str) -> list[str]:
    """"", "a.", "a.b." ... for "a.b.c": every prefix that ends at a dot (the empty one first)."""
    out = [""]
    i = key.find(".")
    while i != -1:
        out.append(key[: i + 1])
        i = key.find(".", i + 1)
    return out


def _renamed(state: Mapping[str, Any], prefix: str) -> tuple[dict[str, Any], list[str]]:
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    outside = [k for k in state if not k.startswith(prefix)]
    return inside, outside


def match_keys(
    state: Mapping[str, Any],
    model_state: Mapping[str, Any],
    path: Path,
    strip_prefix: str | None = None,
    drop_others: bool = False,
) -> KeyMatch:
    """Map the checkpoint's keys onto those of ``model_state`` (see the module doc for the rule).

    BatchNorm's ``num_batches_tracked`` counters may be absent. With ``strip_prefix`` exactly that
    prefix is removed ("" removes none). Keys outside a detected prefix are dropped only with
    ``drop_others`` (a Lightning checkpoint, whose LightningModule may hold a loss or a teacher
    beside the model), and only when none of them shares the prefix's first attribute: stripping
    ``model.encoder.`` never throws away the rest of ``model.``. When nothing matches, the result has
    ``exact=False`` and holds the candidate that supplies most of the model's keys (names and shapes).
    """
    allowed = set(model_state)
    required = {k for k in allowed if not k.endswith("num_batches_tracked")}
    if strip_prefix is not None:
        given = _match_given(state, allowed, required, path, strip_prefix)
        if not given.exact:  # say what detection would have done
            with contextlib.suppress(LoadError):
                auto = match_keys(state, model_state, path, None, drop_others)
                if auto.exact:
                    return replace(given, near=(auto.prefix or "",))
        return given
    count: Counter[str] = Counter()
    hit: Counter[str] = Counter()
    need: Counter[str] = Counter()
    good: Counter[str] = Counter()  # names and shapes agree
    for k, v in state.items():
        for p in _dotted_prefixes(k):
            rest = k[len(p):]
            count[p] += 1
            hit[p] += rest in allowed
            need[p] += rest in required
            good[p] += rest in allowed and _shape(v) == _shape(model_state[rest])
    tried = tuple(sorted((p for p in count if p), key=lambda p: (p.count("."), -count[p], p)))
    if hit[""] == count[""] and need[""] == len(required):
        return KeyMatch(dict(state), None, (), True, tried, closest=hit[""])
    fits = [p for p in tried if hit[p] == count[p] and need[p] == len(required)]
    usable = [
        p for p in fits
        if count[p] == count[""] or (drop_others and count[p.split(".", 1)[0] + "."] == count[p])
    ]
    if len(usable) > 1:
        raise LoadError(
            f"Checkpoint {path} holds the model's weights more than once: after stripping any of "
            f"the prefixes {', '.join(map(repr, usable))} its keys match the model's (for example a "
            f"LightningModule that keeps a student and a teacher, or a model and its EMA copy). "
            f"Choose one with `strip_prefix=PREFIX` (for example `strip_prefix={usable[0]!r}`)."
        )
    if usable:
        inside, outside = _renamed(state, usable[0])
        return KeyMatch(inside, usable[0], tuple(outside), True, tried, closest=hit[usable[0]])
    near = [p for p in fits if good[p] == count[p]]
    best = near[0] if near else max([""] + list(tried), key=lambda p: (good[p], hit[p], -p.count(".")))
    if not good[best]:
        best = ""  # no candidate supplies a single tensor of the right shape: show the keys as they are
    inside, outside = _renamed(state, best)
    inside.update({k: state[k] for k in outside if k not in inside})
    return KeyMatch(inside, best or None, (), False, tried, closest=good[best], near=tuple(near))


def _match_given(
    state: Mapping[str, Any], allowed: set[str], required: set[str], path: Path, prefix: str
) -> KeyMatch:
    if prefix == "":
        keys = set(state)
        exact = required <= keys <= allowed
        return KeyMatch(dict(state), None, (), exact, ("",), closest=len(keys & allowed))
    under = [k for k in state if k.startswith(prefix)]
    if not prefix.endswith(".") and under and all(k[len(prefix):].startswith(".") for k in under):
        prefix += "."  # --strip-prefix model means the dotted prefix "model."
    if not under:
        heads = Counter(k.split(".", 1)[0] + "." for k in state if "." in k)
        common = ", ".join(repr(p) for p, _ in heads.most_common(SHOW)) or "none"
        raise LoadError(
            f"Checkpoint {path}: none of its {len(state)} keys starts with {prefix!r} "
            f"(`strip_prefix`); they start with {common} (for example {list_keys(list(state))}). "
            f"Pass one of those prefixes as `strip_prefix`, or leave it out to detect it."
        )
    inside, outside = _renamed(state, prefix)
    exact = required <= set(inside) <= allowed
    closest = len(set(inside) & allowed)
    if exact:
        return KeyMatch(inside, prefix, tuple(outside), True, (prefix,), closest)
    inside.update({k: state[k] for k in outside if k not in inside})
    return KeyMatch(inside, prefix, (), False, (prefix,), closest)


def _shape(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def differences(state: Mapping[str, Any], model_state: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mismatched) keys of ``state`` against the model's state dict."""
    missing = [
        k for k in model_state if k not in state and not k.endswith("num_batches_tracked")
    ]  # BatchNorm fills a missing counter itself
    unexpected = [k for k in state if k not in model_state]
    mismatched = [
        k for k in model_state if k in state and _shape(state[k]) != _shape(model_state[k])
    ]
    return missing, unexpected, mismatched


def mismatch_error(
    path: Path, match: KeyMatch, model_state: Mapping[str, Any], n_tensors: int, given_prefix: bool
) -> LoadError:
    """The LoadError for a checkpoint whose keys or shapes do not fit the model."""
    missing, unexpected, mismatched = differences(match.state, model_state)
    parts = []
    if missing:
        parts.append(f"{len(missing)} model key(s) missing from the checkpoint ({list_keys(missing)})")
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected checkpoint key(s) the model lacks ({list_keys(unexpected)})"
        )
    if mismatched:
        shapes = [
            f"{k}: checkpoint {_shape(match.state[k])} vs model {_shape(model_state[k])}"
            for k in mismatched
        ]
        parts.append(f"{len(mismatched)} shape mismatch(es) ({list_keys(shapes)})")
    stripped = f" after stripping {match.prefix!r}" if match.prefix else ""
    text = (
        f"Checkpoint {path} does not fit the model: expected the model's {len(model_state)} keys "
        f"with the same shapes, found {n_tensors} tensors{stripped} with " + "; ".join(parts) + "."
    )
    if missing or unexpected:
        text += " " + _tried_text(match, len(model_state), given_prefix)
    text += (
        " Check that `model` builds the same architecture (and its keyword arguments) as the one "
        "that was trained."
    )
    if missing or unexpected:
        text += " " + FLAGS_HINT
    return LoadError(text)


def _tried_text(match: KeyMatch, n_model: int, given_prefix: bool) -> str:
    if given_prefix:
        text = f"The prefix {match.prefix or ''!r} came from `strip_prefix`."
        if match.near:
            would = f"strip {match.near[0]!r}" if match.near[0] else "strip nothing"
            text += f" Without it mmdiag would {would}, and the keys would match."
        return text
    if match.near:
        p = match.near[0]
        return (
            f"Stripping {p!r} supplies all of the model's keys but leaves checkpoint keys outside "
            f"it, and mmdiag drops keys only from a Lightning checkpoint's other top-level modules "
            f"(a loss, a teacher), so that part of a larger network is never loaded by accident. If "
            f"the keys outside {p!r} are not part of this model, pass `strip_prefix={p!r}`."
        )
    shown = ", ".join(repr(p) for p in match.tried[:6]) + (", ..." if len(match.tried) > 6 else "")
    tried = (
        f"no prefix, then {len(match.tried)} dotted prefix(es) of its keys ({shown})"
        if match.tried else "no prefix (its keys have no dotted prefix)"
    )
    return (
        f"Prefixes tried: {tried}; none makes the keys match the model's. The closest, "
        f"{match.prefix or 'no prefix'!r}, supplies {match.closest} of the model's {n_model} tensors "
        f"with the right shapes."
    )
