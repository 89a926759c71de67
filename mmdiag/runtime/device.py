"""The device mmdiag runs on: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import torch

from mmdiag.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; explicit names are checked (ConfigError)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"`device` must be auto, cpu, cuda or cuda:N; found {name!r}.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`device='cuda'` was asked for, but PyTorch sees no CUDA device. Use `device='cpu'`.")
    return device
