"""The AV-digits demo model: a small late-fusion audio-visual classifier.

The model is written the way research code usually is: two modality encoders
whose features are concatenated and passed through a single linear fusion head.
Each modality reaches the head only through its encoder (``audio_net`` and
``visual_net``), so a modality can be masked by replacing that encoder's output.
The model has no BatchNorm, so masking does not interact with running statistics
in eval mode.

Example:
    >>> from mmdiag.examples_data.avdigits import load_avdigits, split_indices
    >>> data = load_avdigits()
    >>> tr, va = split_indices(len(data["label"]))
    >>> model = AVDigitsNet()
    >>> losses = train_plain(model, {k: v[tr] for k, v in data.items()}, epochs=20)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["AVDigitsNet", "train_plain"]


class AVDigitsNet(nn.Module):
    """Late-fusion classifier over an audio spectrogram and a digit image.

    Args:
        n_classes: Number of output classes.
        feat_dim: Width of each encoder's output feature.

    Attributes:
        audio_net: ``[B, 1, F, T]`` log-mel spectrogram -> ``[B, feat_dim]``. Per-clip
            normalisation (``GroupNorm(1, 1)``, i.e. mean/variance over the whole
            spectrogram of each clip), two 3x3 convolutions with ReLU and a 2x2 max
            pool, adaptive average pooling to a 4x4 map, then a linear layer with ReLU.
        visual_net: ``[B, 1, 8, 8]`` image -> ``[B, feat_dim]``. An MLP with ReLU.
        fusion_head: ``nn.Linear(2 * feat_dim, n_classes)`` over
            ``torch.cat([audio_feature, visual_feature], dim=1)``.
    """

    def __init__(self, n_classes: int = 10, feat_dim: int = 32) -> None:
        super().__init__()
        self.audio_net = nn.Sequential(
            nn.GroupNorm(1, 1),  # per-clip normalisation of the spectrogram (like CMVN)
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 16, feat_dim),
            nn.ReLU(),
        )
        self.visual_net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, feat_dim),
            nn.ReLU(),
        )
        self.fusion_head = nn.Linear(2 * feat_dim, n_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Return class logits ``[B, n_classes]``."""
        a = self.audio_net(audio)
        v = self.visual_net(visual)
        return self.fusion_head(torch.cat([a, v], dim=1))


def train_plain(
    model: nn.Module,
    data: dict[str, np.ndarray],
    epochs: int,
    seed: int = 0,
    lr: float = 3e-3,
    batch_size: int = 64,
) -> list[float]:
    """Train ``model`` with Adam and cross-entropy (a minimal, deterministic loop).

    A stopgap until the project's reference training loop exists. The model is
    called as ``model(audio, visual)``. For :class:`AVDigitsNet` on the AV-digits
    training split (1,258 samples), 20 epochs at ``lr=3e-3`` take about 5 s of CPU
    time. On small shared CPUs, ``torch.set_num_threads(1)`` is much faster than
    several threads for this tiny model.

    Args:
        model: The model to train in place, e.g. :class:`AVDigitsNet`.
        data: Dict with float32 ``"audio"`` and ``"visual"`` arrays and int64
            ``"label"``, as returned by :func:`mmdiag.examples_data.avdigits.load_avdigits`
            (index it first to keep only the training split).
        epochs: Number of passes over the data.
        seed: Seeds ``torch.manual_seed`` and the shuffling generator.
        lr: Adam learning rate.
        batch_size: Minibatch size.

    Returns:
        The mean training loss of each epoch.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    audio = torch.as_tensor(data["audio"], dtype=torch.float32)
    visual = torch.as_tensor(data["visual"], dtype=torch.float32)
    label = torch.as_tensor(data["label"], dtype=torch.long)
    n = len(label)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(audio[idx], visual[idx]), label[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
    model.eval()
    return losses
