"""The training row order of :func:`mmdiag.train.fit` as a sampler, for framework loops to replay it."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class FitOrder(Sampler):
    """The row order of :func:`mmdiag.train.fit` on one process: epoch e takes the (e+1)-th
    ``randperm(n)`` of a generator seeded once with the training seed.

    A framework that calls ``set_epoch`` (Lightning) gets the order of that epoch, so a resumed run
    replays it; without ``set_epoch`` each iteration moves on to the next epoch's order.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):
            torch.randperm(self.n, generator=gen)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=gen).tolist())
