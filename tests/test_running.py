"""Diagnostics computed side by side: the same results as one after another, in the same order;
a reader of ``prior`` sees every earlier result; nothing global is left changed."""

from __future__ import annotations

import json
import threading
import time
import warnings
from typing import Any, Mapping

import numpy as np
import pytest
import torch

from mmdiag.api import select_diagnostics
from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.diagnostics._running import compute_one, run_diagnostics
from mmdiag.diagnostics.base import Diagnostic
from mmdiag.report import Result
from mmdiag.runtime.threads import share
from mmdiag.stats import shared_resamples
from tests.helpers.toys import DOMINANT, toy_evidence, with_new_data

CONCURRENT = sorted(n for n in DIAGNOSTICS.names() if DIAGNOSTICS.get(n).concurrent)


@pytest.fixture(scope="module")
def evidence() -> Any:
    return with_new_data(toy_evidence(DOMINANT, 0))


def as_json(results: Mapping[str, Result]) -> dict[str, str]:
    return {k: json.dumps(r.to_dict(), sort_keys=True, default=str) for k, r in results.items()}


def test_the_fitted_diagnostics_are_the_concurrent_ones() -> None:
    assert {"udml", "probe"} <= set(CONCURRENT)


def test_side_by_side_equals_one_after_another(evidence: Any) -> None:
    """The default suite with its concurrent diagnostics in a worker gives, key for key and in
    the same order, what computing each in turn on the main thread gives."""
    diagnostics = [DIAGNOSTICS.get(n)(bootstrap=200) for n in select_diagnostics()]
    assert any(type(d).concurrent for d in diagnostics) and not all(type(d).concurrent for d in diagnostics)
    threads = torch.get_num_threads()
    with shared_resamples():
        results, failures = run_diagnostics(evidence, diagnostics)
    assert torch.get_num_threads() == threads  # the phase's one-thread hold is undone
    serial: dict[str, Any] = {}
    with shared_resamples():
        for d in diagnostics:
            serial[d.name] = compute_one(d, evidence, {k: v for k, v in serial.items() if isinstance(v, Result)})
    assert list(results) == [n for n, o in serial.items() if isinstance(o, Result)]
    assert as_json(results) == as_json({n: o for n, o in serial.items() if isinstance(o, Result)})
    assert [f.diagnostic for f in failures] == [n for n, o in serial.items() if not isinstance(o, Result)]


class _Slow(Diagnostic):
    """A concurrent diagnostic that takes its time (and records the thread it ran on)."""

    name = "slow_side"
    summary = "test"
    concurrent = True
    threads: list[str] = []

    def compute(self, ev: Any, prior: Mapping[str, Result] | None = None) -> Result:
        assert prior == {}
        _Slow.threads.append(threading.current_thread().name)
        time.sleep(0.2)
        return self.result(1.0, {m: 1.0 for m in ev.modalities})


class _Crash(_Slow):
    name = "crash_side"

    def compute(self, ev: Any, prior: Mapping[str, Result] | None = None) -> Result:
        raise RuntimeError("crashed on purpose")


class _Reader(Diagnostic):
    """Reads every earlier result through ``prior``."""

    name = "reader"
    summary = "test"

    def compute(self, ev: Any, prior: Mapping[str, Result] | None = None) -> Result:
        assert prior is not None
        seen = list(prior)
        value = prior["slow_side"].value if "slow_side" in prior else -1.0
        missing = prior.get("crash_side")
        return self.result(value, {m: float(len(seen)) for m in ev.modalities},
                           details={"seen": seen, "crash": missing is None})


def test_a_reader_waits_for_earlier_concurrent_results(evidence: Any) -> None:
    """A diagnostic after a concurrent one reads its result (waiting for it), never one that
    comes after it, and a concurrent crash is a Failure in its place."""
    _Slow.threads.clear()
    unimodal = DIAGNOSTICS.get("unimodal")(bootstrap=0)
    results, failures = run_diagnostics(
        evidence, [_Slow(bootstrap=0), _Crash(bootstrap=0), unimodal, _Reader(bootstrap=0), DIAGNOSTICS.get("shapley")(bootstrap=0)])
    assert _Slow.threads and _Slow.threads[0] != threading.main_thread().name
    assert list(results) == ["slow_side", "unimodal", "reader", "shapley"]
    assert results["reader"].value == 1.0
    assert results["reader"].details["seen"] == ["slow_side", "unimodal"]
    assert results["reader"].details["crash"] is True
    assert [(f.diagnostic, f.kind) for f in failures] == [("crash_side", "error")]
    assert "crashed on purpose" in failures[0].error


@pytest.mark.parametrize("name", CONCURRENT)
def test_a_concurrent_diagnostic_leaves_global_state_alone(name: str, evidence: Any) -> None:
    """What ``concurrent`` promises: no global random draw, no warning filter change, torch's
    thread count as it was, and the result the main thread would compute."""
    d = DIAGNOSTICS.get(name)(bootstrap=50)
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    filters = list(warnings.filters)
    threads = torch.get_num_threads()
    box: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: box.setdefault("r", d.compute(evidence, {})))
    worker.start()
    worker.join()
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert warnings.filters == filters
    assert torch.get_num_threads() == threads
    assert as_json({name: box["r"]}) == as_json({name: d.compute(evidence, {})})


class _Interrupt(Diagnostic):
    name = "interrupt"
    summary = "test"

    def compute(self, ev: Any, prior: Mapping[str, Result] | None = None) -> Result:
        raise KeyboardInterrupt


def test_an_interrupt_drops_the_queued_and_restores_the_thread_count(evidence: Any) -> None:
    """Ctrl-C in the main thread: the running concurrent diagnostic finishes, the queued one never
    starts, and torch's thread count is what it was."""
    _Slow.threads.clear()

    class _Second(_Slow):
        name = "second_side"

    threads = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        run_diagnostics(evidence, [_Slow(bootstrap=0), _Second(bootstrap=0), _Interrupt(bootstrap=0)])
    assert len(_Slow.threads) == 1  # the second never started
    assert torch.get_num_threads() == threads


def test_the_main_thread_takes_a_concurrent_diagnostic_the_worker_has_not_started(evidence: Any) -> None:
    """With nothing else to do, the main thread computes a queued concurrent diagnostic itself
    (same result) instead of waiting for the busy worker."""
    _Slow.threads.clear()

    class _Second(_Slow):
        name = "second_side"

    results, failures = run_diagnostics(evidence, [_Slow(bootstrap=0), _Second(bootstrap=0),
                                                   DIAGNOSTICS.get("unimodal")(bootstrap=0)])
    assert not failures and list(results) == ["slow_side", "second_side", "unimodal"]
    assert _Slow.threads[0] != threading.main_thread().name
    assert _Slow.threads[1] == threading.main_thread().name


class _Pieces(Diagnostic):
    """A concurrent diagnostic whose work is three independent pieces handed to ``share``."""

    name = "pieces_side"
    summary = "test"
    concurrent = True
    ran_on: list[tuple[int, str]] = []

    def compute(self, ev: Any, prior: Mapping[str, Result] | None = None) -> Result:
        def piece(j: int) -> float:
            _Pieces.ran_on.append((j, threading.current_thread().name))
            time.sleep(0.15)
            return float(j * j)

        values = share(piece, [0, 1, 2, 3])
        return self.result(sum(values), {m: values[k % 4] for k, m in enumerate(ev.modalities)},
                           details={"values": values})


def test_share_outside_a_phase_is_a_loop() -> None:
    seen: list[str] = []
    out = share(lambda x: seen.append(threading.current_thread().name) or x + 1, [1, 2, 3])
    assert out == [2, 3, 4] and set(seen) == {threading.main_thread().name}


def test_an_idle_main_thread_takes_pieces_of_a_concurrent_diagnostic(evidence: Any) -> None:
    """The main thread, its own list done, runs some of the pieces a concurrent diagnostic shares;
    the pieces' results come back in order, as a loop gives them."""
    _Pieces.ran_on.clear()
    results, failures = run_diagnostics(evidence, [_Pieces(bootstrap=0), DIAGNOSTICS.get("unimodal")(bootstrap=0)])
    assert not failures
    assert results["pieces_side"].details["values"] == [0.0, 1.0, 4.0, 9.0]
    threads = {name for _, name in _Pieces.ran_on}
    assert sorted(j for j, _ in _Pieces.ran_on) == [0, 1, 2, 3]
    assert threading.main_thread().name in threads and len(threads) == 2


def test_the_worker_takes_pieces_of_a_main_thread_diagnostic(evidence: Any) -> None:
    """The main thread computes a diagnostic that shares pieces (here the queued concurrent one it
    took itself); the worker, its own queue done, takes some of them."""
    _Pieces.ran_on.clear()
    _Slow.threads.clear()

    class _MainPieces(_Pieces):
        name = "main_pieces"
        concurrent = False

    results, failures = run_diagnostics(evidence, [_Slow(bootstrap=0), _MainPieces(bootstrap=0)])
    assert not failures and results["main_pieces"].details["values"] == [0.0, 1.0, 4.0, 9.0]
    assert len({name for _, name in _Pieces.ran_on}) == 2


def test_a_failing_piece_fails_its_diagnostic_only(evidence: Any) -> None:
    def boom(j: int) -> int:
        if j == 2:
            raise ValueError("piece 2 broke")
        time.sleep(0.05)
        return j

    class _Breaks(_Pieces):
        name = "breaks_side"

        def compute(self, ev: Any, prior: Mapping[str, Result] | None = None) -> Result:
            share(boom, [0, 1, 2, 3])
            raise AssertionError("not reached")

    results, failures = run_diagnostics(evidence, [_Breaks(bootstrap=0), DIAGNOSTICS.get("unimodal")(bootstrap=0)])
    assert list(results) == ["unimodal"]
    assert [f.diagnostic for f in failures] == ["breaks_side"] and "piece 2 broke" in failures[0].error


def test_prior_truthiness_does_not_wait_for_a_concurrent_result(evidence: Any) -> None:
    """``prior or {}`` answers from a settled result instead of waiting for a running one."""

    class _Truthy(Diagnostic):
        name = "truthy"
        summary = "test"
        read: list[tuple[bool, bool]] = []

        def compute(self, ev: Any, prior: Mapping[str, Result] | None = None) -> Result:
            truth = bool(prior)  # true: unimodal has settled
            _Truthy.read.append((truth, _Slow.finished.is_set()))
            return self.result(0.0, {m: 0.0 for m in ev.modalities})

    class _SlowFlag(_Slow):
        def compute(self, ev: Any, prior: Mapping[str, Result] | None = None) -> Result:
            out = super().compute(ev, prior)
            _Slow.finished.set()
            return out

    _Slow.threads.clear()
    _Slow.finished = threading.Event()
    results, _ = run_diagnostics(evidence, [_SlowFlag(bootstrap=0), DIAGNOSTICS.get("unimodal")(bootstrap=0),
                                            _Truthy(bootstrap=0)])
    assert list(results) == ["slow_side", "unimodal", "truthy"]
    assert _Truthy.read == [(True, False)]  # answered while slow_side still ran


def test_one_thread_nests_and_the_outermost_restores() -> None:
    from threadpoolctl import threadpool_info

    from mmdiag.runtime.threads import one_thread

    threads = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1  # the inner block left the setting alone
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    assert torch.get_num_threads() == threads


def test_a_phase_started_while_another_holds_the_pool_joins_it() -> None:
    from mmdiag.runtime import threads as th

    with th.sharing_work() as outer:
        with th.sharing_work() as inner:
            assert inner is outer and th._ACTIVE is outer
        assert th._ACTIVE is outer  # the joiner does not end the owner's pool
    assert th._ACTIVE is None
    assert th.share(lambda x: x * 2, [1, 2]) == [2, 4]
