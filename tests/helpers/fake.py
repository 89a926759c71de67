"""Hand-built Evidence for reference tests: random subset logits, no model."""

from __future__ import annotations

import torch

from mmdiag.evidence import Evidence


def fake_evidence(m_count: int = 3, n: int = 50, c: int = 4, seed: int = 0, absent_class: int | None = None) -> Evidence:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    if absent_class is not None:
        labels[labels == absent_class] = (absent_class + 1) % c
    subsets = torch.randn(1 << m_count, n, c, generator=g) * 2
    names = ("audio", "visual") if m_count == 2 else tuple(f"m{j}" for j in range(m_count))
    return Evidence(modalities=names, n_classes=c, labels=labels, logits=subsets[-1].clone(),
                    index=torch.arange(n), subsets=subsets)
