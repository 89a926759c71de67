"""Where mmdiag runs: the device, and torch.distributed set-up shared by ``analyze`` and
``rebalance`` when started under torchrun."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mmdiag.errors import ConfigError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; explicit names are checked."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; found {name!r}.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but PyTorch sees no CUDA device. Use --device cpu.")
    return device


def init_from_env(device: str = "auto") -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; (rank, world size).

    Uses nccl when the device is CUDA and gloo otherwise. Without ``WORLD_SIZE > 1`` in the
    environment nothing is initialised and (0, 1) is returned.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): only it writes files and prints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shutdown() -> None:
    """Destroy the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank leaves while a peer is still in a collective
        dist.destroy_process_group()
