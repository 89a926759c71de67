"""Holding torch and BLAS to one thread for a stretch of small arithmetic."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from threadpoolctl import threadpool_limits


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch and numpy's BLAS (through ``threadpoolctl``) on one thread for the duration
    (restored afterwards).

    For fits of thousands of rows by tens of columns (the probes, ``udml``'s regressors) and for the
    diagnostics phase while a worker thread computes beside it: thread start-up costs more than it
    saves, and on a busy machine several threads per tiny operation slow the fit ten-fold (SciPy's
    solvers on a multi-threaded BLAS: 20x measured on two busy cores).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(n)
