"""A two-stream 1-D CNN for smartwatch motion: one encoder per sensor, concatenated, one linear head.

Written the way sensor-fusion research code usually is: positional ``forward(acc, gyro)``, encoders
named after the sensors, a plain concat head. mmdiag needs no changes to it: it finds ``acc_net`` and
``gyro_net`` from their names (modalities ``acc`` and ``gyro``) and the head ``classifier``.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_encoder(in_channels: int, width: int) -> nn.Sequential:
    """[B, C, T] -> [B, 2 * width]: two conv blocks and global average pooling over time."""
    return nn.Sequential(
        nn.Conv1d(in_channels, width, kernel_size=7, padding=3),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(width, 2 * width, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
    )


class MotionNet(nn.Module):
    """Accelerometer and gyroscope streams ([B, 3, 100] each) -> 4 activity logits."""

    def __init__(self, n_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.acc_net = conv_encoder(3, width)
        self.gyro_net = conv_encoder(3, width)
        self.classifier = nn.Linear(4 * width, n_classes)

    def forward(self, acc: torch.Tensor, gyro: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.cat([self.acc_net(acc), self.gyro_net(gyro)], dim=1))


def build(n_classes: int = 4, width: int = 16) -> MotionNet:
    """The factory ``mmdiag --model model.py:build`` calls."""
    return MotionNet(n_classes=n_classes, width=width)
