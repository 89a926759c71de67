"""Shared toy fixtures: a dominance-knob dataset, trained ToyNets and their evidence (cached).

Everything is deterministic for a seed and small enough to train on CPU in well under a second.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from mmdiag.adapter import ModelAdapter
from mmdiag.collect import CollectSettings, collect
from mmdiag.evidence import EVIDENCE_KINDS, Evidence
from mmdiag.loading import dataset_from_arrays
from mmdiag.examples_data.synthetic import ToyNet, fit_toy, make_toy

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


def trained_toy(strength: Sequence[float] = DOMINANT, seed: int = 0, fusion: str = "concat",
                epochs: int = 8) -> ToyNet:
    """A ToyNet trained on the knob's training half (cached; positional and keyword calls share it)."""
    return _trained_toy(tuple(strength), int(seed), str(fusion), int(epochs))


@functools.lru_cache(maxsize=None)
def _trained_toy(strength: tuple[float, ...], seed: int, fusion: str, epochs: int) -> ToyNet:
    torch.manual_seed(seed)
    names = names_for(len(strength))
    model = ToyNet(names, fusion=fusion)  # type: ignore[arg-type]
    return fit_toy(model, toy_data(tuple(strength), seed=seed), epochs=epochs, seed=seed)


def toy_evidence(strength: Sequence[float] = DOMINANT, seed: int = 0, fusion: str = "concat",
                 kinds: Sequence[str] = ALL_KINDS, mask: str = "zero", mask_at: str | None = None) -> Evidence:
    """Evidence of a trained ToyNet on the knob's held-out half (cached)."""
    return _toy_evidence(tuple(strength), int(seed), str(fusion), tuple(sorted(kinds)), mask, mask_at)


@functools.lru_cache(maxsize=None)
def _toy_evidence(strength: tuple[float, ...], seed: int, fusion: str, kinds: tuple[str, ...], mask: str,
                  mask_at: str | None) -> Evidence:
    model = trained_toy(tuple(strength), seed, fusion)
    names = names_for(len(strength))
    data = dataset_from_arrays(toy_split(tuple(strength), seed)[1])
    adapter = ModelAdapter(model, tuple(names), mask=mask, mask_at=mask_at)  # type: ignore[arg-type]
    # explicit row counts (fractions 1): the reference values were worked out on these subsamples
    settings = CollectSettings(device="cpu", seed=seed, batch_size=128, max_attribution_samples=64,
                               attribution_fraction=1.0, grad_fraction=1.0, param_grad_fraction=1.0, noise_fraction=1.0,
                               max_noise_samples=200, ig_steps=16)
    return collect(adapter, data, set(kinds), settings)


def toy_new_data(strength: Sequence[float] = DOMINANT, seed: int = 0, shifted: str = "visual") -> dict:
    """New data for the ``ood`` diagnostic: the held-out half, with ``shifted``'s input in its second
    half replaced by noise of four times the toy's scale (a drift of that modality alone)."""
    new = {k: v.copy() for k, v in toy_split(tuple(strength), seed)[1].items()}
    half = len(new["label"]) // 2
    rng = np.random.default_rng(seed + 7)
    new[shifted][half:] = rng.normal(scale=4.0, size=new[shifted][half:].shape).astype(new[shifted].dtype)
    return new


def with_new_data(ev: Evidence, strength: Sequence[float] = DOMINANT, seed: int = 0, fusion: str = "concat") -> Evidence:
    """A copy of ``ev`` that also holds the pooled features of every row of :func:`toy_new_data`
    (what the ``ood`` diagnostic scores), from the trained ToyNet of the same knob."""
    rows, feats = _new_data_features(tuple(strength), int(seed), str(fusion))
    return ev.replace(ood_rows=rows, ood_features=feats)


@functools.lru_cache(maxsize=None)
def _new_data_features(strength: tuple[float, ...], seed: int, fusion: str) -> tuple[torch.Tensor, dict]:
    model = trained_toy(strength, seed, fusion)
    adapter = ModelAdapter(model, tuple(names_for(len(strength))))
    new = toy_new_data(strength, seed)
    n = len(new["label"])
    settings = CollectSettings(device="cpu", seed=seed, batch_size=128, max_feature_samples=n)
    ev = collect(adapter, dataset_from_arrays(new), {"features"}, settings)
    assert ev.features is not None and ev.feature_rows is not None
    rows = ev.index[ev.feature_rows]
    order = torch.argsort(rows)
    return rows[order], {m: f[order] for m, f in ev.features.items()}
