"""Audio-visual digit classifier with gated fusion (an ordinary research-code model, not made for mmdiag).

Nothing here knows about mmdiag: forward takes positional tensors and returns a tuple, as many
published training scripts do (``out, a, v = model(audio, visual)``); the encoders are called
``audio_net`` and ``visual_net`` and the fusion is a learned sigmoid gate, not a concatenation.
"""

import torch
import torch.nn as nn


class AudioEncoder(nn.Module):
    def __init__(self, dim=64):
        super(AudioEncoder, self).__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(32 * 4 * 4, dim)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.pool(x).flatten(1)
        return torch.relu(self.fc(x))


class VisualEncoder(nn.Module):
    def __init__(self, dim=64):
        super(VisualEncoder, self).__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, dim)

    def forward(self, x):
        x = torch.relu(self.fc1(x.flatten(1)))
        return torch.relu(self.fc2(x))


class GatedFusion(nn.Module):
    """out = fc_out(g * a + (1 - g) * v), g = sigmoid(W [a; v]) per feature."""

    def __init__(self, dim=64, n_classes=10):
        super(GatedFusion, self).__init__()
        self.gate = nn.Linear(2 * dim, dim)
        self.fc_out = nn.Linear(dim, n_classes)

    def forward(self, a, v):
        g = torch.sigmoid(self.gate(torch.cat((a, v), dim=1)))
        return self.fc_out(g * a + (1 - g) * v)


class AVNet(nn.Module):
    def __init__(self, dim=64, n_classes=10):
        super(AVNet, self).__init__()
        self.audio_net = AudioEncoder(dim)
        self.visual_net = VisualEncoder(dim)
        self.fusion_module = GatedFusion(dim, n_classes)

    def forward(self, audio, visual):
        a = self.audio_net(audio)
        v = self.visual_net(visual)
        out = self.fusion_module(a, v)
        return out, a, v


def build():
    return AVNet()
