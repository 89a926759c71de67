"""Timing helpers: wall and CPU time, runs taken in turns, the plain evaluation pass."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@dataclass
class Timing:
    wall: float
    cpu: float


def timed(fn: Callable[[], Any]) -> tuple[Any, Timing]:
    sync()
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return out, Timing(time.perf_counter() - w, time.process_time() - c)


#: seconds after which a measurement is not repeated further (its median is over the runs done)
BUDGET_S = 40.0

#: short measurements repeat until their runs add up to this many seconds (at most SHORT_RUNS runs)
SHORT_TOTAL_S = 2.0
SHORT_RUNS = 15


def interleaved_timings(fns: Sequence[Callable[[], Any]], repeats: int,
                        budget_s: float | None = None) -> list[tuple[Any, Timing]]:
    """Median wall and CPU time of each of ``fns``, run in turns (one run of each per round).

    Turns, not one function's runs and then the next's: the functions then share the machine's
    state (other load, CPU clocks, and the C allocator's, whose free list after a large free makes
    small-tensor forwards up to 1.5x faster), so their ratio does not depend on which ran first.
    ``repeats`` rounds or more: like timeit's autorange, rounds whose runs are short repeat until
    each function's runs add up to ``SHORT_TOTAL_S`` (at most ``SHORT_RUNS`` rounds), because the
    median of three 0.1 s runs moves with every scheduler hiccup on a shared machine. No new round
    starts once ``budget_s`` is spent. ``repeats = 1`` means one round.
    """
    budget = BUDGET_S if budget_s is None else budget_s
    outs: list[Any] = [None] * len(fns)
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    while True:
        for j, fn in enumerate(fns):
            outs[j], t = timed(fn)
            walls[j].append(t.wall)
            cpus[j].append(t.cpu)
        rounds = len(walls[0])
        short = min(sum(w) for w in walls) >= SHORT_TOTAL_S or rounds >= SHORT_RUNS
        if (rounds >= max(1, repeats) and (repeats <= 1 or short)) or sum(map(sum, walls)) >= budget:
            break
    return [(out, Timing(statistics.median(w), statistics.median(c))) for out, w, c in zip(outs, walls, cpus)]


def median_timing(fn: Callable[[], Any], repeats: int, budget_s: float | None = None) -> tuple[Any, Timing]:
    """Median wall and CPU time of ``fn`` over ``repeats`` runs or more (see :func:`interleaved_timings`)."""
    return interleaved_timings([fn], repeats, budget_s)[0]


class UtilSampler:
    """Mean GPU utilisation (``torch.cuda.utilization``, percent) sampled every 50 ms while the block runs."""

    def __init__(self, device: torch.device) -> None:
        self.active = device.type == "cuda"
        self.samples: list[float] = []
        self.mean: float | None = None

    def __enter__(self) -> "UtilSampler":
        if self.active:
            import threading

            self._stop = threading.Event()

            def poll() -> None:
                while not self._stop.is_set():
                    with contextlib.suppress(Exception):
                        self.samples.append(float(torch.cuda.utilization()))
                    self._stop.wait(0.05)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            self._stop.set()
            self._thread.join()
            self.mean = statistics.fmean(self.samples) if self.samples else None


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def plain_pass(model: nn.Module, data: Dataset, batch_size: int, device: torch.device) -> int:
    """One evaluation pass: forward only, no grad, the DataLoader mmdiag would use."""
    n = 0
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=batch_size):
            y = batch.pop("label")
            model({k: v.to(device) for k, v in batch.items()})
            n += len(y)
    return n
