"""Per-sample modality combinations, for the fixes that train a model to work with modalities missing
(mmanet, dmrnet, restore).

A *combination* is a mask: a tuple of booleans in modality order (True = present), never all False.
Its name joins the present modalities with ``+`` (``rgb+depth``). A fix's ``missing`` (per-modality
rates, ``"rgb=0.3,depth=0.5"``) or ``combinations`` (an explicit distribution,
``"rgb+depth=0.6,depth=0.4"``) parameter is read by :mod:`mmdiag.deployment`, the one parser of
both forms (the ``--missing`` flag and the ``deployment`` diagnostic read them there too); the
empty combination is left out and the rest renormalised, since nothing can be predicted without
any input. :func:`combination_distribution` gives the probability of every mask (uniform over the
2^M - 1 non-empty combinations when neither parameter is given), :func:`draw` one combination per
sample, and :func:`mixed_features` masks each sample's absent modalities at the encoder output
through the adapter's baseline, so that one fusion-head call gives the logits of every sample under
its own combination, whatever the fusion.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from mmdiag.adapter import ModelAdapter
from mmdiag.deployment import conditional, distribution
from mmdiag.errors import ConfigError
from mmdiag.evidence import nonempty_subsets

__all__ = ["Mask", "all_masks", "check_spec", "combination_distribution", "draw", "histogram_kl", "mask_distribution",
           "mask_name", "mix", "mixed_features", "present"]

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


def check_spec(fix_name: str, missing: Any, combinations: Any) -> None:
    """The syntax of a fix's ``missing`` / ``combinations`` parameters (ConfigError naming the fix);
    the modality names are checked at ``setup``, when they are known."""
    try:
        distribution(missing, combinations)
    except ConfigError as exc:
        raise ConfigError(f"{fix_name}: {exc}") from None


def mask_distribution(modalities: Sequence[str], missing: Any = None, combinations: Any = None) -> dict[Mask, float]:
    """{mask: probability} of the non-empty combinations of positive probability, from ``missing`` or
    ``combinations`` (uniform when neither), the empty combination left out and the rest renormalised."""
    q, _ = conditional(distribution(missing, combinations).probabilities(modalities))
    out: dict[Mask, float] = {}
    for mask in all_masks(modalities):
        p = float(q[sum(1 << j for j, on in enumerate(mask) if on)])
        if p > 0:
            out[mask] = p
    return out


def combination_distribution(fix_name: str, modalities: Sequence[str], missing: Any = None,
                             combinations: Any = None) -> list[float]:
    """Probability of each mask of :func:`all_masks` (zeros included); ConfigError naming the fix."""
    try:
        dist = mask_distribution(modalities, missing, combinations)
    except ConfigError as exc:
        raise ConfigError(f"{fix_name}: {exc}") from None
    return [dist.get(mask, 0.0) for mask in all_masks(modalities)]


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
