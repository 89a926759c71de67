"""The benchmark's workload: sizes, the synthetic data and the model it analyses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mmdiag.adapter import ModelAdapter
from mmdiag.api import select_diagnostics
from mmdiag.collect import CollectSettings
from mmdiag.diagnostics import DIAGNOSTICS


@dataclass
class Sizes:
    #: (M, N) pairs of table 1: every M in 2..4 at every N in 1k, 5k, 20k
    cost_grid: tuple[tuple[int, int], ...] = tuple((m, n) for m in (2, 3, 4) for n in (1000, 5000, 20000))
    #: runs of the one-off measurements (each diagnostic's compute() on the collected evidence)
    extra_repeats: int = 1
    subset_m: tuple[int, ...] = (2, 3, 4, 5, 6)
    subset_n: int = 1024
    #: steps per fix and round (fixes take turns for max(repeats, 5) rounds)
    fix_steps: int = 10
    fix_batch: int = 64
    scaling_n: tuple[int, ...] = (1000, 10000, 100000)
    repeats: int = 3
    image: int = 16
    fix_image: int = 32
    scaling_image: int = 8
    profile: bool = True
    subprocess_scaling: bool = True
    #: Adam steps (batch 64) that train the analysed models before they are measured
    train_steps: int = 60
    #: bootstrap resamples of the analyses (1000 = mmdiag's default)
    bootstrap: int = 1000
    #: CollectSettings overrides (none: mmdiag's defaults)
    caps: tuple[tuple[str, Any], ...] = ()

    def collect_settings(self, device: torch.device | str) -> CollectSettings:
        return CollectSettings(device=str(device), **dict(self.caps))


#: tiny sizes and caps for the smoke test: the numbers mean nothing, the code paths all run
QUICK = Sizes(cost_grid=((2, 64),), subset_m=(2, 4), subset_n=64, fix_steps=1, fix_batch=8,
              scaling_n=(32, 64), repeats=1, image=8, fix_image=8, scaling_image=8, profile=False,
              subprocess_scaling=False, bootstrap=20, train_steps=2,
              caps=(("max_attribution_samples", 8), ("ig_steps", 4), ("max_noise_samples", 16),
                    ("noise_levels", (1, 2, 3)), ("max_feature_samples", 64), ("max_grad_samples", 16),
                    ("permutations", 1)))


def conv_encoder(size: int, feat: int) -> nn.Sequential:
    """1 x size x size -> feat: two 3x3 conv blocks, global pooling, a linear layer."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4, feat), nn.ReLU(),
    )


class BenchNet(nn.Module):
    """M convolutional encoders (``encoders.<m>``) and a linear concat head; takes one dict."""

    def __init__(self, modalities: Sequence[str], size: int = 16, feat: int = 32, n_classes: int = 4) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.encoders = nn.ModuleDict({m: conv_encoder(size, feat) for m in self.modalities})
        self.head = nn.Linear(len(self.modalities) * feat, n_classes)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.head(torch.cat([self.encoders[m](inputs[m]) for m in self.modalities], dim=1))


def names(m_count: int) -> tuple[str, ...]:
    return tuple(f"m{j}" for j in range(m_count))


def strengths(m_count: int) -> list[float]:
    """The first modality carries the most label signal (a dominance to find)."""
    return [2.0] + [0.8] * (m_count - 1)


class StreamingDataset(Dataset):
    """A map-style Dataset that makes sample ``i`` on the fly (class prototype + noise, seeded by
    ``first + i``; the prototypes by ``seed``).

    Nothing but the prototypes is held in memory, so the dataset can be as long as wanted.
    """

    def __init__(self, n: int, m_count: int, size: int, n_classes: int = 4, seed: int = 0, first: int = 0) -> None:
        self.n, self.size, self.n_classes, self.seed, self.first = n, size, n_classes, seed, first
        self.modalities = names(m_count)
        g = torch.Generator().manual_seed(seed)
        self.protos = torch.randn(n_classes, m_count, 1, size, size, generator=g)
        self.scale = torch.tensor(strengths(m_count)).view(1, m_count, 1, 1, 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.first + int(i))
        y = int(torch.randint(self.n_classes, (1,), generator=g))
        x = self.scale[0] * self.protos[y] + torch.randn(len(self.modalities), 1, self.size, self.size, generator=g)
        return {**{m: x[j] for j, m in enumerate(self.modalities)}, "label": torch.tensor(y)}


def in_memory(n: int, m_count: int, size: int, seed: int = 0) -> Dataset:
    """The same samples materialised as arrays, wrapped the way ``mmdiag.analyze`` wraps a dict of arrays."""
    from mmdiag.loading import dataset_from_arrays

    stream = StreamingDataset(n, m_count, size, seed=seed)
    batch = next(iter(DataLoader(stream, batch_size=n)))
    arrays = {k: v.numpy() for k, v in batch.items()}
    return dataset_from_arrays(arrays, list(stream.modalities))


def make_model(m_count: int, size: int, seed: int = 0, train_steps: int = 60) -> BenchNet:
    """A briefly trained BenchNet (so that the diagnostics see a model that has learned something).

    It trains on the task it is measured on (the prototypes of ``seed``) but on samples the
    measurements never draw (numbers from 10^9 on).
    """
    torch.manual_seed(seed)
    model = BenchNet(names(m_count), size=size)
    if train_steps:
        data = StreamingDataset(64 * train_steps, m_count, size, seed=seed, first=10**9)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for batch in DataLoader(data, batch_size=64):
            y = batch.pop("label")
            loss = F.cross_entropy(model(batch), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def adapter_for(model: BenchNet) -> ModelAdapter:
    return ModelAdapter(model, tuple(model.modalities), call="dict",
                        encoders={m: f"encoders.{m}" for m in model.modalities}, head="head")


def default_needs(skip: Sequence[str] = ()) -> set[str]:
    return set().union(*(DIAGNOSTICS.get(n).needs for n in select_diagnostics(skip=list(skip))))


def evidence_bytes(ev: Any) -> int:
    """Total bytes of the tensors an Evidence holds (nested dicts/lists included)."""
    def size(obj: Any) -> int:
        if isinstance(obj, Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, Mapping):
            return sum(size(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(size(v) for v in obj)
        return 0
    return sum(size(v) for k, v in ev.to_dict().items() if k != "meta")
