"""Every registered fix through one contract (a new fix is covered by registering it).

Hooks: each fires as often as the loop calls it, in a user's own loop (exact counts) and in the
reference loop. Teardown: nothing stays installed (module, parameter and global hooks, encoder
stubs, swapped modules) after training, after an exception between a step's forward and backward,
and after one raised inside a fusion-head call; on a concat head and on a non-linear (gated) fusion.
State: a fresh fix loaded from ``state_dict`` continues exactly as the original (same losses,
gradients, signals). Parameters: a negative or wrongly typed number, or an unknown option, is a
ConfigError. Black box: a model without named encoders is supported, or refused at ``setup`` with a
ConfigError naming the encoders (and by the reference loop before its first step). Distributed:
two identical ranks take the single-process decisions, and two gloo processes end with identical
weights, auxiliary modules and signals.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import socket
import time
from dataclasses import fields
from typing import Any, Mapping

import pytest
import torch
from torch import Tensor

from mmdiag.errors import ConfigError, MmdiagError
from mmdiag.fixes import FIXES, Fix, fix_step
from tests.helpers.fixkit import (SHORT, Blob, HeadTrap, Run, assert_state_equal, batch, check_teardown, counting,
                                  declared_hooks, fit_run, hook_inventory, make_run, raised_boom, saved, toy_model,
                                  train)
from tests.helpers.toys import DOMINANT

NAMES = FIXES.names()
#: parameters that switch each fix's mechanism on within two short epochs (the defaults of some wait
#: for a warm-up longer than that); a fix not listed runs with its defaults
ACTIVE: dict[str, dict[str, Any]] = {
    "arl": {"start": 1},
    "cal": {"warmup": 1},
    "mdacl": {"rescale": True},
    "udml": {"cycle_epoch": 0, "weight_warmup": 1},
    "mmanet": {"begin_epoch": 0, "mar_on": "all"},
    "dmrnet": {"detect_epochs": 1},
    "gblending": {"every": 1},
    "relearn": {"every": 1},
}
FUSIONS = ("concat", "gated")
#: known bugs, one case each (strict: the mark must go when the fix is fixed)
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def cases(check: str) -> list[Any]:
    """The registered fixes, the known bug of ``check`` marked as a strict xfail."""
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[(check, n)]))
            if (check, n) in KNOWN_BUGS else n for n in NAMES]


def make(name: str) -> Fix:
    return FIXES.get(name)(**ACTIVE.get(name, {}))


def black_box_run(fix: Fix) -> Run:
    torch.manual_seed(0)
    return make_run(fix, model=Blob())


# ------------------------------------------------------------------------------------ hooks, teardown
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("name", NAMES)
def test_every_hook_fires_and_nothing_survives_teardown(name: str, fusion: str) -> None:
    """In a user's own loop, on a concat head and on a gated fusion: exact hook counts, then nothing
    left installed after training, after an exception between forward and backward, and after one
    raised inside a head call."""
    run = check_teardown(lambda: make(name), fusion=fusion, rows=SHORT)
    calls = run.fix.__dict__["_calls"]
    assert all(calls[h] > 0 for h in declared_hooks(FIXES.get(name))), calls
    signals = run.fix.signals()
    assert all(isinstance(v, str) or math.isfinite(v) for v in signals.values()), signals


@pytest.mark.parametrize("name", NAMES)
def test_every_hook_fires_in_the_reference_loop_and_teardown_follows_an_exception(name: str) -> None:
    """The reference loop calls every hook (setup and teardown once) and, when a head call raises
    mid-training, still tears the fix down, leaving nothing installed."""
    model = toy_model(0)
    reference = hook_inventory(model)
    counter = HeadTrap(model)
    fix = counting(make(name))
    fit_run(fix, model=model, epochs=2, rows=SHORT, validate=False)
    calls = fix.__dict__["_calls"]
    assert all(calls[h] > 0 for h in calls), calls
    assert calls["setup"] == 1 and calls["teardown"] == 1 and calls["on_epoch_end"] == 2, calls
    counter.remove()
    assert hook_inventory(model) == reference

    at = counter.calls // 2 + 1  # a head call in the middle of the run (the run is deterministic)
    model = toy_model(0)
    reference = hook_inventory(model)
    trap = HeadTrap(model, at)
    before = hook_inventory(model)
    fix = counting(make(name))
    with pytest.raises(Exception) as info:
        fit_run(fix, model=model, epochs=2, rows=SHORT, validate=False)
    assert raised_boom(info.value), info.value
    assert fix.__dict__["_calls"]["setup"] == 1 and fix.__dict__["_calls"]["teardown"] == 1
    assert trap.calls == at and hook_inventory(model) == before
    trap.remove()
    assert hook_inventory(model) == reference


# ------------------------------------------------------------------------------------ state
def snapshot(run: Run) -> dict[str, Any]:
    """What a checkpoint holds mid-training: weights, auxiliary modules, optimizer, fix state, RNG."""
    assert run.ctx.optimizer is not None
    return {"model": copy.deepcopy(run.model.state_dict()), "aux": copy.deepcopy(run.ctx.aux.state_dict()),
            "optimizer": copy.deepcopy(run.ctx.optimizer.state_dict()), "fix": saved(run.fix.state_dict()),
            "rng": torch.get_rng_state()}


def restore(snap: Mapping[str, Any], fix: Fix, strength=DOMINANT, fusion: str = "concat") -> Run:
    """A new run resumed from ``snap`` with the fresh ``fix`` (setup, then states loaded, as the reference loop resumes)."""
    run = make_run(fix, strength, fusion=fusion)
    run.model.load_state_dict(snap["model"])
    fix.setup(run.ctx)
    run.ctx.aux.load_state_dict(snap["aux"])
    assert run.ctx.optimizer is not None
    run.ctx.optimizer.load_state_dict(snap["optimizer"])
    fix.load_state_dict(snap["fix"])
    return run


def continue_steps(run: Run, epoch: int, rng: Tensor, n_steps: int = 3, strength=DOMINANT) -> list[dict[str, Any]]:
    """From the global random state ``rng``, train ``n_steps`` more batches in ``epoch``, then end it
    and tear down; per step the loss, the logs, the signals and every gradient after
    ``after_backward``; last the ``on_epoch_end`` signals and the fix's state."""
    fix, ctx, opt = run.fix, run.ctx, run.ctx.optimizer
    assert opt is not None
    torch.set_rng_state(rng)
    run.model.train()
    out: list[dict[str, Any]] = []
    try:
        for index in range(n_steps):
            xs, y = batch(strength, 0, 64, offset=64 * index)
            step = fix_step(ctx, fix, xs, y, epoch, index)
            opt.zero_grad()
            step.loss.backward()
            fix.after_backward(ctx, step)
            grads = {n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.grad is not None}
            out.append({"loss": step.loss.detach().clone(), "logs": dict(step.logs), "signals": fix.signals(),
                        "grads": grads})
            opt.step()
        out.append({"epoch_end": fix.on_epoch_end(ctx, epoch) or {}, "state": fix.state_dict()})
    finally:
        fix.teardown(ctx)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_a_fix_loaded_from_its_state_dict_continues_identically(name: str) -> None:
    original = make(name)
    run = train(original, epochs=2, rows=SHORT, keep_open=True)
    snap = snapshot(run)
    fresh = make(name)
    assert_state_equal(saved_state(fresh, snap), snap["fix"])
    resumed = restore(snap, fresh)
    want = continue_steps(run, 2, snap["rng"])
    got = continue_steps(resumed, 2, snap["rng"])
    for a, b in zip(want[:-1], got[:-1]):
        assert torch.equal(a["loss"], b["loss"])
        assert a["logs"] == b["logs"] and a["signals"] == b["signals"]
        assert a["grads"].keys() == b["grads"].keys()
        for k in a["grads"]:
            assert torch.equal(a["grads"][k], b["grads"][k]), k
    assert want[-1]["epoch_end"] == got[-1]["epoch_end"]
    assert_state_equal(want[-1]["state"], got[-1]["state"])


def saved_state(fresh: Fix, snap: dict) -> dict:
    """``fresh`` loaded from the snapshot's fix state, then its state_dict (the load/save round trip)."""
    probe = copy.deepcopy(fresh)
    probe.load_state_dict(snap["fix"])
    return probe.state_dict()


# ------------------------------------------------------------------------------------ parameters
def bad_values() -> list[Any]:
    cases = []
    for name in NAMES:
        for f in fields(FIXES.get(name)):
            if not f.init or f.name.startswith("_"):
                continue
            kind = str(f.type)
            if "int" in kind or "float" in kind:
                if f.name != "seed":  # any integer seeds a generator
                    cases.append(pytest.param(name, f.name, -1 if "int" in kind else -1.0, id=f"{name}-{f.name}-neg"))
                cases.append(pytest.param(name, f.name, "1", id=f"{name}-{f.name}-str"))
                if "float" in kind:
                    cases.append(pytest.param(name, f.name, float("nan"), id=f"{name}-{f.name}-nan"))
            elif kind == "str":
                cases.append(pytest.param(name, f.name, "no-such-option", id=f"{name}-{f.name}-option"))
    return cases


@pytest.mark.parametrize("name, param, value", bad_values())
def test_bad_parameters_are_config_errors(name: str, param: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=param):
        FIXES.get(name)(**{param: value})


# ------------------------------------------------------------------------------------ black box
@pytest.mark.parametrize("name", cases("black_box"))
def test_black_box_is_supported_or_refused_at_setup(name: str) -> None:
    """No named encoders: a fix needing them refuses at setup (and the reference loop before any step);
    any other runs to the end, leaving the model as it found it."""
    fix = make(name)
    run = black_box_run(fix)
    assert not run.adapter.has_encoders
    before = hook_inventory(run.model)
    if FIXES.get(name).needs_encoders:
        with pytest.raises(ConfigError, match="encoder"):
            fix.setup(run.ctx)
        fix.teardown(run.ctx)  # the reference loop tears down after a failed setup too
        with pytest.raises(MmdiagError, match="encoder"):
            fit_run(make(name), model=Blob(), epochs=1)
    else:
        train(fix, run=run, epochs=2, rows=SHORT)
        assert run.steps == 4
        _, hist = fit_run(make(name), model=Blob(), epochs=1, rows=SHORT, validate=False)
        assert math.isfinite(hist.last["loss"])
    assert hook_inventory(run.model) == before


# ------------------------------------------------------------------------------------ distributed
def _doubling(run: Run) -> Run:
    """``run`` as one of two identical ranks: world size 2, every all-reduce doubles, a broadcast
    returns the value."""
    run.ctx.world_size = 2
    run.ctx.all_reduce_sum = lambda v: v.detach().clone() * 2  # type: ignore[method-assign]
    run.ctx.broadcast = lambda v: v.detach().clone()  # type: ignore[method-assign]
    return run


@pytest.mark.parametrize("name", NAMES)
def test_identical_ranks_take_the_single_process_decisions(name: str) -> None:
    """Two ranks holding the same batches must do exactly what one process does: the fix
    synchronises its statistics (sums over ranks, or means) so every rank decides the same."""
    records: dict[str, list] = {"single": [], "ranked": []}

    def record(key: str):
        return lambda r, s: records[key].append(({n: p.grad.clone() for n, p in r.model.named_parameters()
                                                  if p.grad is not None}, r.fix.signals(), float(s.loss.detach())))

    single = train(make(name), epochs=2, rows=SHORT, on_step=record("single"))
    fix = make(name)
    ranked = train(fix, run=_doubling(make_run(fix)), epochs=2, rows=SHORT, on_step=record("ranked"))
    assert len(records["single"]) == len(records["ranked"]) == 4
    for (ga, sa, la), (gb, sb, lb) in zip(records["single"], records["ranked"]):
        assert la == pytest.approx(lb, rel=1e-6) and sb == pytest.approx(sa, abs=1e-9)
        for k in ga:
            torch.testing.assert_close(gb[k], ga[k])
    assert ranked.history == pytest.approx(single.history)


def _ddp_worker(rank: int, world: int, port: int, out: str, names: list[str]) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a rank that fails exits at once (the parent then stops the other); a lost peer times out
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    for name in names:
        fix = make(name)
        run = make_run(fix, model=toy_model(seed=rank))  # DDP broadcasts rank 0's weights
        wrapped = copy.copy(run.adapter)
        wrapped.model = DistributedDataParallel(run.model)
        run.ctx.adapter = wrapped
        run.ctx.world_size, run.ctx.rank = world, rank
        torch.manual_seed(0)  # one global stream on every rank (noise, dropout draws, auxiliary modules)
        train(fix, run=run, epochs=2, rows=slice(rank, 256, world), batch_size=32)
        torch.save({"model": run.model.state_dict(), "aux": run.ctx.aux.state_dict(), "history": run.history},
                   os.path.join(out, f"{name}-{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo: once, before the fork
    procs = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(out), NAMES), nprocs=2, join=False,
                               start_method="fork")
    deadline = time.monotonic() + 180
    while not procs.join(timeout=1):  # raises with the rank's traceback when one fails
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.terminate()
            pytest.fail("the two gloo processes did not finish within 180 s")
    return out


def _ranks(out: Any, name: str) -> tuple[dict, dict]:
    return tuple(torch.load(out / f"{name}-{r}.pt", weights_only=True) for r in (0, 1))  # type: ignore[return-value]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_two_gloo_processes_end_with_identical_weights(name: str, ddp_results: Any) -> None:
    """Each rank trains on its own shard (DistributedDataParallel averages the model's gradients,
    the fix synchronises its decisions): the replicas must end identical."""
    r0, r1 = _ranks(ddp_results, name)
    assert_state_equal(r0["model"], r1["model"])


@pytest.mark.slow
@pytest.mark.parametrize("name", cases("gloo_aux"))
def test_two_gloo_processes_end_with_identical_auxiliary_modules_and_signals(name: str, ddp_results: Any) -> None:
    r0, r1 = _ranks(ddp_results, name)
    assert_state_equal(r0["aux"], r1["aux"])
    assert r0["history"] == r1["history"]
