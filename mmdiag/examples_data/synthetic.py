"""Synthetic multimodal data and models with a dominance knob, for tests, benchmarks and trials.

:func:`make_toy` draws M modalities whose samples are class prototypes plus Gaussian noise; the
``strength`` of each modality scales its prototypes, so it sets how much of the label signal that
modality carries and how quickly a network learns it. A jointly trained :class:`ToyNet` on
``strength=(3, 1)`` leans on the first modality (and under-trains the second); ``(1.5, 1.5)`` is
balanced.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

Fusion = Literal["concat", "sum", "gated", "film"]


def make_toy(
    n: int = 600,
    strength: Sequence[float] = (3.0, 1.0),
    modalities: Sequence[str] | None = None,
    dim: int = 8,
    n_classes: int = 4,
    seed: int = 0,
    image: bool = False,
) -> dict[str, np.ndarray]:
    """A labelled multimodal dataset as a dict of arrays (modalities plus ``label``).

    Args:
        n: number of samples.
        strength: per-modality scale of the class prototypes (the dominance knob); 0 = pure noise.
        modalities: names (default ``m0, m1, ...``; ``audio, visual`` for two).
        dim: features per modality.
        n_classes: number of classes.
        seed: seeds prototypes, labels and noise.
        image: shape each modality as [n, 1, 4, dim // 4 * ...] single-channel maps instead of vectors.
    """
    names = list(modalities) if modalities is not None else (
        ["audio", "visual"] if len(strength) == 2 else [f"m{j}" for j in range(len(strength))]
    )
    if len(names) != len(strength):
        raise ValueError("one strength per modality")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, size=n)
    out: dict[str, np.ndarray] = {"label": labels.astype(np.int64)}
    for name, s in zip(names, strength):
        protos = rng.normal(size=(n_classes, dim)) / np.sqrt(dim) * 2.0
        x = s * protos[labels] + rng.normal(size=(n, dim))
        x = x.astype(np.float32)
        out[name] = x.reshape(n, 1, 2, dim // 2) if image else x
    return out


class ToyNet(nn.Module):
    """A small late-fusion classifier taking one dict argument.

    Each modality has its own MLP encoder under ``encoders[<name>]`` (so mmdiag finds them by name)
    and the fusion is ``concat`` (one Linear head over concatenated features), ``sum`` (features
    added), ``gated`` (a learned sigmoid gate per modality from all features) or ``film``
    (the first modality's feature modulated by the others).
    """

    def __init__(self, modalities: Sequence[str], in_dim: int = 8, feat_dim: int = 16,
                 n_classes: int = 4, fusion: Fusion = "concat") -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.fusion = fusion
        self.encoders = nn.ModuleDict({
            m: nn.Sequential(nn.Flatten(), nn.Linear(in_dim, feat_dim), nn.ReLU(), nn.Linear(feat_dim, feat_dim))
            for m in self.modalities
        })
        m_count = len(self.modalities)
        if fusion == "concat":
            self.head = nn.Linear(m_count * feat_dim, n_classes)
        else:
            self.head = nn.Linear(feat_dim, n_classes)
        if fusion == "gated":
            self.gate = nn.Linear(m_count * feat_dim, m_count)
        if fusion == "film":
            self.film = nn.Linear((m_count - 1) * feat_dim, 2 * feat_dim)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        feats = [self.encoders[m](inputs[m]) for m in self.modalities]
        if self.fusion == "concat":
            return self.head(torch.cat(feats, dim=1))
        if self.fusion == "sum":
            return self.head(torch.stack(feats).sum(0))
        if self.fusion == "gated":
            g = torch.sigmoid(self.gate(torch.cat(feats, dim=1)))
            return self.head(sum(g[:, j:j + 1] * f for j, f in enumerate(feats)))
        gamma, beta = self.film(torch.cat(feats[1:], dim=1)).chunk(2, dim=1)
        return self.head(feats[0] * (1 + gamma) + beta)


def fit_toy(model: nn.Module, data: Mapping[str, np.ndarray], epochs: int = 20, lr: float = 1e-2,
            seed: int = 0, batch_size: int = 64) -> nn.Module:
    """Train ``model`` jointly with cross-entropy (Adam); deterministic for a seed. Returns it in eval mode."""
    torch.manual_seed(seed)
    names = [k for k in data if k != "label"]
    xs = {m: torch.as_tensor(data[m]) for m in names}
    y = torch.as_tensor(data["label"])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(model({m: xs[m][idx] for m in names}), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
