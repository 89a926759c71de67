"""Shared toy fixtures: a dominance-knob dataset, trained ToyNets and their evidence (cached).

Everything is deterministic for a seed and small enough to train on CPU in well under a second.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from mmdiag.adapter import ModelAdapter
from mmdiag.collect import CollectSettings, collect
from mmdiag.evidence import EVIDENCE_KINDS, Evidence
from mmdiag.loading import dataset_from_arrays
from mmdiag.synthetic import ToyNet, fit_toy, make_toy

ALL_KINDS = tuple(sorted(EVIDENCE_KINDS))
#: the knob settings used by direction tests
DOMINANT = (3.0, 0.8)       # first modality carries the signal
BALANCED = (1.6, 1.6)       # both carry it equally


def names_for(m_count: int) -> list[str]:
    return ["audio", "visual"] if m_count == 2 else [f"m{j}" for j in range(m_count)]


@functools.lru_cache(maxsize=None)
def toy_split(strength: Sequence[float] = DOMINANT, seed: int = 0) -> tuple[dict, dict]:
    """(train, test) halves of one draw (same class prototypes): 600 and 400 samples."""
    full = make_toy(n=1000, strength=tuple(strength), modalities=names_for(len(strength)), seed=seed)
    return {k: v[:600] for k, v in full.items()}, {k: v[600:] for k, v in full.items()}


def toy_data(strength: Sequence[float] = DOMINANT, seed: int = 0) -> dict:
    """The training half of :func:`toy_split`."""
    return toy_split(tuple(strength), seed)[0]


@functools.lru_cache(maxsize=None)
def trained_toy(strength: Sequence[float] = DOMINANT, seed: int = 0, fusion: str = "concat",
                epochs: int = 8) -> ToyNet:
    torch.manual_seed(seed)
    names = names_for(len(strength))
    model = ToyNet(names, fusion=fusion)  # type: ignore[arg-type]
    return fit_toy(model, toy_data(tuple(strength), seed=seed), epochs=epochs, seed=seed)


@functools.lru_cache(maxsize=None)
def toy_evidence(strength: Sequence[float] = DOMINANT, seed: int = 0, fusion: str = "concat",
                 kinds: Sequence[str] = ALL_KINDS, mask: str = "zero", mask_at: str | None = None) -> Evidence:
    """Evidence of a trained ToyNet on held-out data of the same knob (different seed)."""
    model = trained_toy(tuple(strength), seed, fusion)
    names = names_for(len(strength))
    data = dataset_from_arrays(toy_split(tuple(strength), seed)[1])
    adapter = ModelAdapter(model, tuple(names), mask=mask, mask_at=mask_at)  # type: ignore[arg-type]
    settings = CollectSettings(device="cpu", seed=seed, batch_size=128, max_attribution_samples=64,
                               max_noise_samples=200, ig_steps=16)
    return collect(adapter, data, set(kinds), settings)
