"""Per-sample modality combinations, for the fixes that train a model to work with modalities missing.

A *combination* is a mask: a tuple of booleans in modality order (True = present), never all False.
Its name joins the present modalities with ``+`` (``rgb+depth``). A *distribution* maps masks to
probabilities; :func:`combination_distribution` builds it from a fix's ``missing`` or
``combinations`` parameter (uniform over the 2^M - 1 non-empty combinations by default), and
:func:`draw` gives every sample of a batch one combination of it. :func:`mixed_features` then masks
each sample's absent modalities at the encoder output through the adapter's baseline, so one fusion-head
call gives the logits of every sample under its own combination, whatever the fusion.

The two text forms (also accepted as mappings) are:

* ``missing``: per-modality missing rates, ``"rgb=0.3,depth=0.5"`` (a modality not named is never
  missing). Modalities go missing independently; the case where all are missing is left out (no
  prediction can be made without any input) and the rest renormalised:
  P(c) = prod_{m in c} (1 - r_m) * prod_{m not in c} r_m / (1 - prod_m r_m).
* ``combinations``: an explicit distribution over combinations, ``"rgb+depth=0.6,depth=0.4"``; the
  probabilities must sum to 1 (within 0.01; they are then renormalised exactly).

:func:`parse_missing` and :func:`parse_combinations` are the one place these forms are read; the
``--missing`` flag and any other entry point should call them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from mmdiag.adapter import ModelAdapter
from mmdiag.errors import ConfigError
from mmdiag.evidence import nonempty_subsets

__all__ = ["Mask", "all_masks", "combination_distribution", "check_spec", "draw", "histogram_kl", "mask_name",
           "mix", "mixed_features", "parse_combinations", "parse_missing", "present"]

Mask = tuple[bool, ...]


def all_masks(modalities: Sequence[str]) -> list[Mask]:
    """The 2^M - 1 non-empty combinations, by size then modality order (the last one is the full set)."""
    return [tuple(m in combo for m in modalities) for _, combo in nonempty_subsets(tuple(modalities))]


def mask_name(mask: Sequence[bool], modalities: Sequence[str]) -> str:
    """``rgb+depth`` for the mask of those two modalities."""
    return "+".join(present(mask, modalities))


def present(mask: Sequence[bool], modalities: Sequence[str]) -> list[str]:
    """The modalities a mask keeps."""
    return [m for m, on in zip(modalities, mask) if on]


def _entries(spec: Any, where: str, example: str) -> dict[str, float]:
    """``"key=p,key=p"`` or a mapping -> {key: p}, each p a number in [0, 1]."""
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"{where} must be a list of NAME=PROBABILITY pairs such as {example!r}; "
                                  f"found {spec!r} (the part {part.strip()!r} has no '=').")
            items.append((key.strip(), value.strip()))
    else:
        raise ConfigError(f"{where} must be text such as {example!r} or a mapping of names to probabilities; "
                          f"found {spec!r} ({type(spec).__name__}).")
    out: dict[str, float] = {}
    for key, value in items:
        try:
            p = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            p = math.nan
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise ConfigError(f"{where}: the probability of {key!r} must be a number between 0 and 1; found "
                              f"{value!r}. Write it like {example!r}.")
        if key in out:
            raise ConfigError(f"{where} names {key!r} twice; give each once, e.g. {example!r}.")
        out[key] = p
    if not out:
        raise ConfigError(f"{where} is empty; give at least one NAME=PROBABILITY pair, e.g. {example!r}.")
    return out


_MISSING_EXAMPLE = "rgb=0.3,depth=0.5"
_COMBINATIONS_EXAMPLE = "rgb+depth=0.6,depth=0.4"


def _unknown(where: str, name: str, modalities: Sequence[str]) -> ConfigError:
    return ConfigError(f"{where} names the modality {name!r}, which the model does not have; its modalities "
                       f"are {', '.join(modalities)}.")


def parse_missing(spec: str | Mapping[str, Any], modalities: Sequence[str],
                  where: str = "missing") -> dict[Mask, float]:
    """Per-modality missing rates (``"rgb=0.3,depth=0.5"`` or ``{"rgb": 0.3}``) -> the distribution of
    the present combinations, {mask: probability} (masks of probability 0 left out).

    Raises:
        ConfigError: bad syntax, a rate outside [0, 1], an unknown modality, or every modality
            always missing.
    """
    rates = _entries(spec, where, _MISSING_EXAMPLE)
    for name in rates:
        if name not in modalities:
            raise _unknown(where, name, modalities)
    r = [rates.get(m, 0.0) for m in modalities]
    if all(x >= 1.0 for x in r):
        raise ConfigError(f"{where}: every modality is missing with rate 1, so no sample has any input; "
                          f"found {spec!r}. Give at least one modality a rate below 1.")
    probs: dict[Mask, float] = {}
    for mask in all_masks(modalities):
        p = math.prod((1.0 - x) if on else x for on, x in zip(mask, r))
        if p > 0:
            probs[mask] = p
    total = sum(probs.values())
    return {k: v / total for k, v in probs.items()}


def parse_combinations(spec: str | Mapping[str, Any], modalities: Sequence[str],
                       where: str = "combinations") -> dict[Mask, float]:
    """An explicit distribution (``"rgb+depth=0.6,depth=0.4"`` or a mapping) -> {mask: probability}.

    Raises:
        ConfigError: bad syntax, an unknown modality or a repeated one in a name, a repeated
            combination, or probabilities that do not sum to 1 (within 0.01).
    """
    weights = _entries(spec, where, _COMBINATIONS_EXAMPLE)
    probs: dict[Mask, float] = {}
    for name, p in weights.items():
        members = [s.strip() for s in name.split("+")]
        if any(not s for s in members) or len(set(members)) != len(members):
            raise ConfigError(f"{where}: {name!r} is not a combination; write the present modalities joined by "
                              f"'+', each once (e.g. {_COMBINATIONS_EXAMPLE!r}).")
        for s in members:
            if s not in modalities:
                raise _unknown(where, s, modalities)
        mask = tuple(m in members for m in modalities)
        if mask in probs:
            raise ConfigError(f"{where} gives the combination {mask_name(mask, modalities)!r} twice.")
        probs[mask] = p
    total = sum(probs.values())
    if abs(total - 1.0) > 0.01:
        raise ConfigError(f"{where}: the probabilities must sum to 1; found {total:g} in {spec!r}. Adjust them "
                          f"(e.g. {_COMBINATIONS_EXAMPLE!r}).")
    return {k: v / total for k, v in probs.items() if v > 0}


def check_spec(fix_name: str, missing: Any, combinations: Any) -> None:
    """The syntax of a fix's ``missing`` / ``combinations`` parameters (the modality names are checked
    at ``setup``, when they are known)."""
    if missing is not None and combinations is not None:
        raise ConfigError(f"{fix_name}: give either `missing` (per-modality rates) or `combinations` (an explicit "
                          f"distribution), not both; found missing={missing!r} and combinations={combinations!r}.")
    if missing is not None:
        _entries(missing, f"{fix_name}: missing", _MISSING_EXAMPLE)
    if combinations is not None:
        _entries(combinations, f"{fix_name}: combinations", _COMBINATIONS_EXAMPLE)


def combination_distribution(fix_name: str, modalities: Sequence[str], missing: Any = None,
                             combinations: Any = None) -> list[float]:
    """Probability of each mask of :func:`all_masks` (zeros included): from ``missing``, from
    ``combinations``, or uniform."""
    check_spec(fix_name, missing, combinations)
    masks = all_masks(modalities)
    if missing is not None:
        dist = parse_missing(missing, modalities, f"{fix_name}: missing")
    elif combinations is not None:
        dist = parse_combinations(combinations, modalities, f"{fix_name}: combinations")
    else:
        dist = {mask: 1.0 / len(masks) for mask in masks}
    return [dist.get(mask, 0.0) for mask in masks]


def draw(probs: Sequence[float], masks: Sequence[Mask], batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(index [B] of each sample's combination in ``masks``, keep [B, M] booleans), on ``device``.

    Draws from torch's global generator (which the reference loop saves and restores, so a resumed
    run draws the same combinations).
    """
    index = torch.multinomial(torch.tensor(probs, dtype=torch.float64), batch, replacement=True)
    keep = torch.tensor(masks, dtype=torch.bool)[index]
    return index.to(device), keep.to(device)


def mix(value: Tensor, baseline: Tensor, keep: Tensor) -> Tensor:
    """Per sample, ``value`` where kept and ``baseline`` where dropped; gradients reach ``value`` for
    every sample (zero where dropped), so every encoder stays in the graph."""
    k = keep.to(value.device).view(-1, *([1] * (value.dim() - 1)))
    if not value.is_floating_point():
        return torch.where(k, value, baseline)
    return value * k.to(value.dtype) + baseline * (~k).to(value.dtype)


def _mix_nested(value: Any, baseline: Any, keep: Tensor) -> Any:
    if isinstance(value, Tensor):
        return mix(value, baseline, keep)
    if isinstance(value, tuple):
        return type(value)(*(_mix_nested(v, b, keep) for v, b in zip(value, baseline))) \
            if hasattr(value, "_fields") else tuple(_mix_nested(v, b, keep) for v, b in zip(value, baseline))
    if isinstance(value, list):
        return [_mix_nested(v, b, keep) for v, b in zip(value, baseline)]
    if isinstance(value, dict):
        return {k: _mix_nested(v, baseline[k], keep) for k, v in value.items()}
    return value


def mixed_features(adapter: ModelAdapter, features: Mapping[str, Any], keep: Tensor) -> dict[str, Any]:
    """Encoder outputs with modality j replaced by the adapter's baseline for the samples where
    ``keep[:, j]`` is False (nested outputs supported)."""
    base = adapter.masked_features(features, [])
    return {m: _mix_nested(features[m], base[m], keep[:, j]) for j, m in enumerate(adapter.modalities)}


def histogram_kl(counts: Tensor, reference: Tensor, smoothing: float) -> float:
    """KL(P || Q) of two predicted-label histograms (counts per class), each normalised and mixed with
    the uniform distribution, P~ = (1 - smoothing) P + smoothing / C, so that an empty class never
    gives log 0 (the result depends on the frequencies only, not on the number of samples)."""
    c = counts.numel()
    p = counts.double() / counts.double().sum().clamp_min(1e-300)
    q = reference.double() / reference.double().sum().clamp_min(1e-300)
    p = (1 - smoothing) * p + smoothing / c
    q = (1 - smoothing) * q + smoothing / c
    return float((p * (p / q).log()).sum())
