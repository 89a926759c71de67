"""Three-stream late-fusion classifier: spoken digit + top half + bottom half of the digit image.

``forward(audio, top, bottom)`` takes positional tensors; each modality has its own encoder
(``audio_net``, ``top_net``, ``bottom_net``) and the head is one Linear layer over the concatenated
features, so mmdiag finds the encoders by name and evaluates all 2^3 = 8 subsets from one encoder pass.
"""

from __future__ import annotations

import torch
from torch import nn


class ThreeViewNet(nn.Module):
    """audio [B, 1, 20, 20] log-mel spectrogram, top/bottom [B, 1, 4, 8] image halves -> 10 logits."""

    def __init__(self, n_classes: int = 10, feat_dim: int = 32) -> None:
        super().__init__()
        self.audio_net = nn.Sequential(
            nn.GroupNorm(1, 1),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(32 * 16, feat_dim), nn.ReLU(),
        )
        self.top_net = self._half_encoder(feat_dim)
        self.bottom_net = self._half_encoder(feat_dim)
        self.fusion_head = nn.Linear(3 * feat_dim, n_classes)

    @staticmethod
    def _half_encoder(feat_dim: int) -> nn.Sequential:
        return nn.Sequential(nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, feat_dim), nn.ReLU())

    def forward(self, audio: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        feats = [self.audio_net(audio), self.top_net(top), self.bottom_net(bottom)]
        return self.fusion_head(torch.cat(feats, dim=1))


def build() -> ThreeViewNet:
    """The factory ``mmdiag --model model.py:build`` calls."""
    return ThreeViewNet()
