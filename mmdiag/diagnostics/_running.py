"""Computing diagnostics on collected evidence: each in turn, a crash or missing evidence kept as a
:class:`~mmdiag.report.Failure`; those that declare ``concurrent`` in a worker thread beside the rest.

Why a worker: the fitted diagnostics (``udml``'s regressors, ``probe``'s logistic fits) are fixed
costs of many small operations on one core, while the others are mostly bulk NumPy and torch
arithmetic; side by side on two cores, the whole phase took 0.45-0.6 s instead of 0.64-0.7 s at
three modalities and 5k rows. The results are the same as computed one after another: a concurrent
diagnostic reads no other's result (it is given an empty ``prior``), touches no global random
state, and the whole phase runs torch and BLAS on one thread each, so no number depends on which
thread got there first. A diagnostic that reads ``prior`` waits for the results it reads. When the
main thread has finished its own list, it computes the concurrent diagnostics the worker has not
started yet (from the back of the queue) rather than wait.

A diagnostic may also hand independent pieces of its work (``probe``'s fits, one per modality) to
:func:`~mmdiag.runtime.threads.share`: a thread that would otherwise wait (the main
thread at the end of its list or waiting for a result it reads, the worker with its queue done)
takes the pieces not yet started, so three fits are split between two threads instead of queued
on one.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Mapping, Sequence, Union

from mmdiag.diagnostics.base import Diagnostic
from mmdiag.errors import MmdiagError
from mmdiag.evidence import ENCODER_KINDS, Evidence
from mmdiag.report import Failure, Result
from mmdiag.runtime.threads import SharedWork, one_thread, sharing_work

Outcome = Union[Result, Failure]


def compute_one(d: Diagnostic, ev: Evidence, prior: Mapping[str, Result]) -> Outcome:
    """``d``'s result on ``ev``, or the :class:`Failure` that says why there is none."""
    missing = [k for k in d.needs if not ev.has(k)]
    if missing:
        unavailable = ev.meta.get("unavailable", {})
        reason = "; ".join(f"{k}: {unavailable.get(k, 'not collected')}" for k in missing)
        # skipped (not applicable): encoder evidence of a black box, or a kind the setup ruled out
        ruled_out = set(ev.meta.get("skipped_kinds", ()))
        black_box = any(k in ENCODER_KINDS for k in missing) and not ev.meta.get("encoders")
        kind = "skipped" if black_box or any(k in ruled_out for k in missing) else "error"
        return Failure(d.name, f"needs {', '.join(missing)} evidence ({reason})", kind)
    try:
        return d.compute(ev, prior)
    except MmdiagError as exc:
        return Failure(d.name, str(exc), "error")
    except Exception as exc:  # noqa: BLE001 - a crashing diagnostic must not kill the run
        return Failure(d.name, f"{type(exc).__name__}: {exc}", "error")


class _Prior(Mapping[str, Result]):
    """The results of the diagnostics listed before the current one, as its ``compute`` reads
    them: one still computing in the worker is waited for when it is read (by key, ``in``,
    ``get`` or iteration), so the mapping holds exactly what a one-after-another run would."""

    def __init__(self, earlier: Sequence[str], outcomes: dict[str, Outcome],
                 pending: dict[str, "Future[Outcome]"], work: SharedWork | None = None) -> None:
        self.earlier, self.outcomes, self.pending, self.work = list(earlier), outcomes, pending, work

    def _settled(self, name: str) -> Outcome | None:
        future = self.pending.get(name)
        if future is not None:
            if self.work is not None:  # while it computes, take on pieces of the work it shares
                self.work.help_until(future.done)
            self.outcomes[name] = future.result()
            del self.pending[name]
        return self.outcomes.get(name)

    def __bool__(self) -> bool:
        # ``prior or {}`` must not wait for every earlier result: one settled result answers it
        if any(isinstance(self.outcomes.get(n), Result) for n in self.earlier if n not in self.pending):
            return True
        return any(isinstance(self._settled(n), Result) for n in self.earlier)

    def __getitem__(self, name: str) -> Result:
        outcome = self._settled(name) if name in self.earlier else None
        if not isinstance(outcome, Result):
            raise KeyError(name)
        return outcome

    def __iter__(self) -> Iterator[str]:
        return iter([n for n in self.earlier if isinstance(self._settled(n), Result)])

    def __len__(self) -> int:
        return sum(1 for _ in self)


def run_diagnostics(ev: Evidence, diagnostics: Sequence[Diagnostic]) -> tuple[dict[str, Result], list[Failure]]:
    """Compute each diagnostic (results and failures in the order given); a crash or missing
    evidence becomes a Failure, not a dead run."""
    side = [d for d in diagnostics if type(d).concurrent]
    outcomes: dict[str, Outcome] = {}
    if not side or len(side) == len(diagnostics):
        for d in diagnostics:
            outcomes[d.name] = compute_one(d, ev, _Prior(list(outcomes), outcomes, {}))
    else:
        names = [d.name for d in diagnostics]
        with one_thread(), sharing_work() as work:
            worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmdiag-diagnostic")
            phase_over = threading.Event()
            try:
                # one worker: the concurrent diagnostics run one after another, in their order
                pending = {d.name: worker.submit(compute_one, d, ev, {}) for d in side}
                for future in pending.values():
                    future.add_done_callback(work.wake)
                # with its queue done, the worker takes on pieces that this thread's diagnostics share
                worker.submit(work.help_until, phase_over.is_set)
                for i, d in enumerate(diagnostics):
                    if d.name not in pending and d.name not in outcomes:
                        outcomes[d.name] = compute_one(d, ev, _Prior(names[:i], outcomes, pending, work))
                # the worker takes its queue from the front; this thread, with nothing else left,
                # takes from the back what the worker has not started, instead of waiting for it,
                # then takes on the pieces the running ones share (:func:`share`) until they finish
                for d in reversed(side):
                    if d.name in pending and pending[d.name].cancel():
                        del pending[d.name]
                        outcomes[d.name] = compute_one(d, ev, {})
                work.help_until(lambda: all(f.done() for f in pending.values()))
                for name, future in list(pending.items()):
                    outcomes[name] = future.result()
            finally:
                phase_over.set()
                work.wake()
                # on an interrupt the queued diagnostics are dropped and the running one finishes
                # before the thread count is restored (it holds one_thread itself)
                worker.shutdown(wait=True, cancel_futures=True)
    results = {d.name: o for d in diagnostics if isinstance(o := outcomes[d.name], Result)}
    failures = [o for d in diagnostics if isinstance(o := outcomes[d.name], Failure)]
    return results, failures
