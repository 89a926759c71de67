"""inforeg: the window test and the Fisher trace from known gradients, the proximal gradient by hand,
other fusions, and direction on the toy.

The contract every fix meets (hooks, teardown, state, parameters, distributed) is in test_conformance.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES, fix_step
from mmdiag.fixes.inforeg import InfoReg, proximal_beta, window_test
from tests.helpers.fixkit import (BUDGET, SHORT, batch, direction, hand_readouts, make_run, mean, one_step,
                                  plain_accuracy, train)


def test_registered_with_the_code_defaults() -> None:
    assert FIXES.get("inforeg") is InfoReg and InfoReg.needs_encoders
    assert InfoReg().params() == {"beta": 0.95, "threshold": 0.04, "window": 10, "unimodal_weight": 1.0}


@pytest.mark.parametrize("bad", [{"window": 0}, {"beta": float("nan")}, {"threshold": -0.1}])
def test_bad_parameters(bad: dict) -> None:
    with pytest.raises(ConfigError, match="inforeg: "):
        InfoReg(**bad)


def test_window_test_from_known_traces() -> None:
    assert window_test([]) == 1.0
    assert window_test([2.0]) == pytest.approx(1.0)  # tr1 = 0.2, tr2 = 0 (both sums divided by 10)
    assert window_test([1.0, 3.0]) == pytest.approx((0.4 - 0.1) / 0.4)
    traces = [float(t) for t in range(1, 13)]  # 1..12
    tr1 = (3 + 4 + 5 + 6 + 7 + 8 + 9 + 10 + 11 + 12) / 10
    tr2 = (2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 10 + 11) / 10
    assert window_test(traces) == pytest.approx((tr1 - tr2) / tr1)
    assert window_test([1.0, 2.0, 4.0], window=2) == pytest.approx(((2 + 4) / 2 - (1 + 2) / 2) / ((2 + 4) / 2))
    assert window_test([0.0, 0.0]) == 0.0


def test_beta_of_the_leader() -> None:
    lead, beta = proximal_beta({"a": 40.0, "v": 39.5, "x": 10.0}, 0.95)
    assert lead == "a" and beta == pytest.approx(0.95 * math.exp(math.tanh(0.5)))
    assert proximal_beta({"a": 1.0, "v": 3.0}, 0.5) == ("v", pytest.approx(0.5 * math.exp(math.tanh(2.0))))


def test_proximal_gradient_and_fisher_trace_by_hand() -> None:
    """g <- g + beta (theta - theta_start) on the leader's encoder only; the epoch's trace is the sum
    over its weight matrices of the mean squared (final) gradient."""
    fix = InfoReg()
    run = make_run(fix)
    fix.setup(run.ctx)
    xs, y = batch(n=64)
    # a start point away from the current weights, so that the pull is not zero
    fix._snapshot(run.ctx, 0)
    g = torch.Generator().manual_seed(5)
    fix._start = {m: [p - 0.1 * torch.randn(p.shape, generator=g) for p in ps] for m, ps in fix._start.items()}
    start = {m: [t.clone() for t in ts] for m, ts in fix._start.items()}
    step = fix_step(run.ctx, fix, xs, y, 0, 0)
    run.ctx.optimizer.zero_grad()
    step.loss.backward()
    before = {m: [p.grad.clone() for p in run.ctx.encoder_parameters(m)] for m in ("audio", "visual")}
    fix.after_backward(run.ctx, step)
    with torch.no_grad():
        _, z = hand_readouts(run.model, xs)
        s = {m: float(F.softmax(z[m], 1)[torch.arange(64), y].sum()) for m in z}
        want_loss = F.cross_entropy(run.model(xs), y) + F.cross_entropy(z["audio"], y) + F.cross_entropy(z["visual"], y)
    assert float(step.loss.detach()) == pytest.approx(float(want_loss), rel=1e-5)
    lead = max(s, key=s.get)
    other = "visual" if lead == "audio" else "audio"
    beta = 0.95 * math.exp(math.tanh(s[lead] - s[other]))
    for p, g0, p0 in zip(run.ctx.encoder_parameters(lead), before[lead], start[lead]):
        torch.testing.assert_close(p.grad, g0 + beta * (p.detach() - p0), rtol=1e-5, atol=1e-7)
    for p, g0 in zip(run.ctx.encoder_parameters(other), before[other]):
        assert torch.equal(p.grad, g0)
    assert fix.signals()[f"beta.{lead}"] == pytest.approx(beta, rel=1e-5) and fix.signals()[f"beta.{other}"] == 0.0
    fix.on_epoch_end(run.ctx, 0)
    for m in ("audio", "visual"):
        weights = [p for p in run.ctx.encoder_parameters(m) if p.dim() > 1]
        want = sum(float((p.grad.double() ** 2).mean()) for p in weights)
        assert fix.signals()[f"trace.{m}"] == pytest.approx(want, rel=1e-9)
        assert fix.signals()[f"k.{m}"] == pytest.approx(1.0)  # one trace: tr2 = 0
    fix.teardown(run.ctx)


def test_the_pull_follows_the_leaders_window() -> None:
    """Open while the leader's moving trace still rises (k > 0.04), closed once it falls (k < 0)."""
    # k = (1.0 - 0.5) / 1.0 = 0.5; then tr1 = 10 x 1 / 10 = 1.0, tr2 = (10 + 9 x 1) / 10 = 1.9: k < 0
    for traces, is_open in (([5.0, 5.0], True), ([10.0] + [1.0] * 10, False)):
        fix = InfoReg()
        fix.load_state_dict({"traces": {"audio": list(traces), "visual": list(traces)}})
        run, _ = one_step(fix, n=32, epoch=0)
        assert (fix._pending is not None) is is_open
        assert any(v > 0 for k, v in fix.signals().items() if k.startswith("beta.")) is is_open
        fix.teardown(run.ctx)


@pytest.mark.parametrize("fusion,strength", [("gated", (3.0, 0.8)), ("film", (3.0, 0.8)), ("concat", (3.0, 0.8, 0.8))])
def test_other_fusions_and_three_modalities(fusion: str, strength: tuple) -> None:
    run = train(InfoReg(), strength, 0, fusion=fusion, epochs=2, rows=SHORT)
    sig = run.history[-1]
    assert len([k for k in sig if k.startswith("trace.")]) == len(strength)
    assert all(math.isfinite(v) for v in sig.values())


@pytest.mark.slow
def test_direction_raises_weak_modality_unimodal_accuracy() -> None:
    fixed, plain, full, _ = direction(InfoReg)
    assert mean(fixed) > mean(plain) + 0.1, (fixed, plain)
    fused_plain = mean([plain_accuracy(s)["fused"] for s in BUDGET.seeds])
    assert mean([a["fused"] for a in full]) >= fused_plain - 0.02
