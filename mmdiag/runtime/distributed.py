"""torch.distributed, in one place: joining and leaving the process group that ``torchrun`` sets up,
which rank this is, and the few collectives mmdiag uses (a flag on any rank, sums, gathers).

Started by ``torchrun`` (environment ``WORLD_SIZE`` > 1), :func:`join` initialises the default
process group (``nccl`` on CUDA, with ``cuda:LOCAL_RANK`` as the device; ``gloo`` otherwise). A group
that :func:`join` created is left at interpreter exit; :func:`process_group` scopes it explicitly.
Without ``WORLD_SIZE`` > 1 nothing is initialised and every collective returns its input.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from mmdiag.errors import ConfigError
from mmdiag.runtime.device import resolve_device

__all__ = ["DistInfo", "all_gather_objects", "all_reduce_sum", "any_rank", "barrier", "broadcast_object", "broadcast_tensor",
           "distributed_rank", "is_main_process", "join", "leave", "process_group", "sum_ranks"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run.

    Attributes:
        world: number of processes (1 when not distributed).
        rank: this process's rank; local_rank: its rank on this machine (its CUDA device).
        created: whether :func:`join` created the process group (it then leaves it at exit).
    """

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        """True on rank 0, the process that writes files and prints."""
        return self.rank == 0

    def device_for(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` for a distributed CUDA run, else ``device``."""
        if self.world > 1 and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _active() -> bool:
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized())


def join(device: str | torch.device = "auto") -> DistInfo:
    """Join the default process group when started by torchrun (``WORLD_SIZE`` > 1); a group that
    is already initialised is reused. Returns this process's :class:`DistInfo`.

    Raises:
        ConfigError: this PyTorch has no torch.distributed, or the group cannot be joined (the
            environment of torchrun is missing).
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistInfo()
    dist = _dist()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed.")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    created = False
    if not dist.is_initialized():
        use_cuda = resolve_device(device).type == "cuda"
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local)
        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"Could not join the torch.distributed process group ({backend}): {exc}. Start the "
                "command with torchrun (which sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE)."
            ) from None
        created = True
        atexit.register(_leave_at_exit)
    return DistInfo(world=dist.get_world_size(), rank=dist.get_rank(), local_rank=local, created=created)


def leave() -> None:
    """Leave and destroy the process group, if there is one.

    Every rank waits for the others first: a rank that tears the group down while a peer is still
    in a collective makes gloo abort the peer.
    """
    if _active():
        dist = _dist()
        dist.barrier()
        dist.destroy_process_group()


def _leave_at_exit() -> None:
    with contextlib.suppress(Exception):
        leave()


@contextlib.contextmanager
def process_group(device: str | torch.device = "auto") -> Iterator[DistInfo]:
    """:func:`join` for the ``with`` block, and leave at its end if this call created the group.
    Nested blocks (and training or analysis inside) reuse the group."""
    info = join(device)
    try:
        yield info
    finally:
        if info.created:
            leave()


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) when torch.distributed is initialised (e.g. under torchrun), else (0, 1)."""
    if _active():
        dist = _dist()
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): only it writes files and prints."""
    return distributed_rank()[0] == 0


def barrier() -> None:
    """Wait until every rank gets here (nothing when not distributed): what rank 0 wrote before is
    then on disk for the others to read."""
    if _active():
        _dist().barrier()


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (a tiny all-reduce per call when distributed)."""
    if world <= 1:
        return flag
    dist = _dist()
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sum_ranks(values: Sequence[float], world: int, device: torch.device) -> list[float]:
    """``values`` summed element-wise over the ranks (float64)."""
    if world <= 1:
        return list(values)
    dist = _dist()
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_reduce_sum(value: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """``value`` summed over the ranks, as a new tensor on ``value``'s device (a detached copy with one
    process or without an initialised group); the input is unchanged."""
    out = value.detach().clone()
    if world > 1 and _active():
        dist = _dist()
        out = out.to(device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out = out.to(value.device)
    return out


def broadcast_tensor(value: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """Rank 0's ``value`` on every rank, as a new tensor on ``value``'s device (a detached copy with
    one process or without an initialised group); the input is unchanged."""
    out = value.detach().clone()
    if world > 1 and _active():
        dist = _dist()
        out = out.to(device)
        dist.broadcast(out, src=0)
        out = out.to(value.device)
    return out


def all_gather_objects(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` with one process)."""
    if world <= 1:
        return [obj]
    parts: list[Any] = [None] * world
    _dist().all_gather_object(parts, obj)
    return parts


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (unchanged without an initialised group of several processes)."""
    rank, world = distributed_rank()
    if world > 1:
        box = [value]
        _dist().broadcast_object_list(box, src=0)
        return box[0]
    return value
