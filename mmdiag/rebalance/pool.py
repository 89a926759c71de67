"""Training several candidates: one after another, or in ``jobs`` worker processes.

Worker processes are started with ``spawn`` (a forked process would inherit torch's thread pools and
any CUDA state of the parent) and each limits torch to its share of the threads, so ``jobs`` workers
together use what one process would (``torch.get_num_threads() // jobs``, at least 1): the timings of
candidates trained side by side stay comparable with each other.

Under ``torchrun`` there is one candidate at a time, trained by all ranks (every rank calls
:func:`train_all` with the same jobs); worker processes are refused there.
"""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Sequence

import torch

from mmdiag.errors import ConfigError, TrainError
from mmdiag.rebalance.candidate import CandidateJob, TrainedCandidate, train_candidate
from mmdiag.runtime.distributed import distributed_rank
from mmdiag.train import TrainProgress

__all__ = ["train_all", "worker_threads"]

#: ``progress(fix, train_progress_or_None)``: None when a candidate goes to a worker process.
CandidateProgress = Callable[[str, "TrainProgress | None"], None]


def worker_threads(jobs: int, available: int | None = None) -> int:
    """Torch threads per worker so that ``jobs`` workers share ``available`` (default: this
    process's torch threads): ``available // jobs``, at least 1."""
    total = torch.get_num_threads() if available is None else available
    return max(1, total // max(1, jobs))


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _check_picklable(job: CandidateJob) -> None:
    try:
        pickle.dumps(job)
    except Exception as exc:  # noqa: BLE001 - whatever fails to pickle, the remedy is the same
        raise ConfigError(
            f"`jobs` > 1 trains candidates in other processes, which need the model factory and the data "
            f"to be picklable; they are not ({type(exc).__name__}: {exc}). Use a module-level function or "
            "functools.partial as the factory, or train one candidate at a time (`jobs=1`)."
        ) from None


def train_all(jobs: Sequence[CandidateJob], processes: int = 1,
              progress: CandidateProgress | None = None) -> list[TrainedCandidate]:
    """Train every job (see :func:`~mmdiag.rebalance.candidate.train_candidate`); results in job order.

    Raises:
        ConfigError: ``processes`` < 1, several processes under torchrun, or jobs that do not pickle.
    """
    if processes < 1:
        raise ConfigError(f"`jobs` must be at least 1; found {processes}.")
    if processes == 1 or len(jobs) <= 1:
        return [_one(job, progress) for job in jobs]
    if distributed_rank()[1] > 1:
        raise ConfigError("`jobs` > 1 cannot be combined with torchrun: there every candidate is trained by "
                          "all ranks, one after another. Leave `jobs` at 1.")
    for job in jobs:
        _check_picklable(job)
    ctx = multiprocessing.get_context("spawn")
    threads = worker_threads(processes)
    with ProcessPoolExecutor(max_workers=min(processes, len(jobs)), mp_context=ctx, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = []
        for job in jobs:
            if progress is not None:
                progress(job.fix, None)
            futures.append(pool.submit(_in_worker, job))
        try:
            return [f.result() for f in futures]
        except BrokenProcessPool as exc:
            raise TrainError(
                f"A worker process training the candidates died ({exc}). A script that trains with `jobs` > 1 "
                "must start it under `if __name__ == '__main__':` (workers are spawned and import the script); "
                "it may also have run out of memory: try fewer `jobs`. Finished candidates are kept."
            ) from None


def _in_worker(job: CandidateJob) -> TrainedCandidate:
    """:func:`train_candidate` in a worker process. Ctrl-C reaches the workers too; each saves its
    state at a batch boundary and stops (``Interrupted``), which is said as an error that pickles."""
    try:
        return train_candidate(job)
    except KeyboardInterrupt as exc:
        raise TrainError(f"{job.fix}: training interrupted ({exc}); its state is saved, so `resume=True` "
                         "continues it.") from None


def _one(job: CandidateJob, progress: CandidateProgress | None) -> TrainedCandidate:
    if progress is None:
        return train_candidate(job)
    return train_candidate(job, lambda p: progress(job.fix, p))  # silent for a candidate already trained
