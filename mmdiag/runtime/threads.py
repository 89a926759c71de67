"""Holding torch and BLAS to one thread for a stretch of small arithmetic, and sharing independent
pieces of work between the threads of the diagnostics phase."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from threadpoolctl import threadpool_limits

T = TypeVar("T")


_STATE_LOCK = threading.Lock()
_HOLDERS = 0  # one_thread blocks entered and not yet left, in any thread


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch and numpy's BLAS (through ``threadpoolctl``) on one thread for the duration
    (restored afterwards).

    For fits of thousands of rows by tens of columns (the probes, ``udml``'s regressors) and for the
    diagnostics phase while a worker thread computes beside it: thread start-up costs more than it
    saves, and on a busy machine several threads per tiny operation slow the fit ten-fold (SciPy's
    solvers on a multi-threaded BLAS: 20x measured on two busy cores).

    Nested blocks (in any thread) leave the setting to the outermost one, which restores it when it
    ends: entering again would cost about 2 ms for nothing.
    """
    global _HOLDERS
    with _STATE_LOCK:
        _HOLDERS += 1
        outermost = _HOLDERS == 1
    try:
        if not outermost:  # already held (e.g. by the diagnostics phase)
            yield
            return
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with threadpool_limits(limits=1):
                yield
        finally:
            torch.set_num_threads(n)
    finally:
        with _STATE_LOCK:
            _HOLDERS -= 1


class _Task:
    """One call ``fn(item)`` of a :meth:`SharedWork.map`; ``error`` holds what it raised."""

    __slots__ = ("fn", "item", "result", "error", "done")

    def __init__(self, fn: Callable[[Any], Any], item: Any) -> None:
        self.fn, self.item = fn, item
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False


class SharedWork:
    """Independent pieces of one computation that idle threads may take over.

    A diagnostic that fits one model per modality hands the fits to :func:`share`; while a
    diagnostics phase holds a ``SharedWork`` (see :func:`sharing_work`), a thread with nothing left
    to do (:meth:`help_until`) takes queued pieces, so two threads share three fits instead of one
    thread doing all three while the other waits. Each piece must be independent of the others and
    of the thread it runs on (its own seeds, no global state): the results are then the same as in
    a loop, and come back in the order given.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[_Task] = deque()

    def map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """``[fn(x) for x in items]``, the calls after the first offered to idle threads; the first
        error (in the order given) is raised once every call has finished."""
        tasks = [_Task(fn, x) for x in items]
        with self._cond:
            self._queue.extend(tasks[1:])
            self._cond.notify_all()
        for task in tasks:  # the caller works through its own calls that nobody has taken
            if task is tasks[0] or self._claim(task):
                self._run(task)
        self.help_until(lambda: all(t.done for t in tasks))
        for task in tasks:
            if task.error is not None:
                raise task.error
        return [t.result for t in tasks]

    def help_until(self, finished: Callable[[], bool]) -> None:
        """Run queued calls (oldest first) until ``finished()``; sleep while there are none."""
        while True:
            with self._cond:
                while not finished() and not self._queue:
                    self._cond.wait(timeout=0.5)  # woken by :meth:`wake`; the timeout is a safety net
                if finished():
                    return
                task = self._queue.popleft()
            self._run(task)

    def wake(self, *_: Any) -> None:
        """Let waiting threads check again (e.g. a future of the phase has finished)."""
        with self._cond:
            self._cond.notify_all()

    def _claim(self, task: _Task) -> bool:
        with self._cond:
            if task in self._queue:
                self._queue.remove(task)
                return True
            return False

    def _run(self, task: _Task) -> None:
        try:
            task.result = task.fn(task.item)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of map, whichever thread ran it
            task.error = exc
            if threading.current_thread() is threading.main_thread() and not isinstance(exc, Exception):
                raise  # an interrupt stops this thread too
        finally:
            with self._cond:
                task.done = True
                self._cond.notify_all()


_ACTIVE: SharedWork | None = None


@contextlib.contextmanager
def sharing_work() -> Iterator[SharedWork]:
    """Make :func:`share` offer its calls to the threads of a phase (process-wide while held: the
    worker threads of the phase must see it). A phase that starts while another holds one (in
    another thread) joins it: the pool is not tied to a phase, and the first holder ends it."""
    global _ACTIVE
    with _STATE_LOCK:
        owner = _ACTIVE is None
        if owner:
            _ACTIVE = SharedWork()
        work = _ACTIVE
    try:
        yield work
    finally:
        if owner:
            with _STATE_LOCK:
                _ACTIVE = None


def share(fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
    """``[fn(x) for x in items]``: in a loop, or, inside :func:`sharing_work`, with idle threads
    of the phase taking calls the caller has not started (same results, same order)."""
    work = _ACTIVE
    if work is None or len(items) < 2:
        return [fn(x) for x in items]
    return work.map(fn, items)
