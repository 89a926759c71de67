"""mla: the OWM projection by hand, alternating unimodal losses, the refusal without a linear head,
other fusions, and direction on the toy.

The contract every fix meets (hooks, teardown, state, parameters, distributed) is in test_conformance.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmdiag.adapter import ModelAdapter
from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES, FixContext, fix_step
from mmdiag.fixes.mla import MLA, owm_alpha, owm_update
from tests.helpers.fixkit import (BUDGET, SHORT, batch, direction, hand_readouts, make_run, mean, plain_accuracy,
                                  train)


def test_registered_with_defaults() -> None:
    assert FIXES.get("mla") is MLA and MLA.needs_encoders
    assert MLA().params() == {"project": True}
    with pytest.raises(ConfigError, match="mla: project"):
        MLA(project=1)  # type: ignore[arg-type]


def test_owm_update_by_hand() -> None:
    """P - k k^T / (a + r k) with k = P r^T, then divided by its Frobenius norm, element by element."""
    p = [[1.0, 0.5, 0.0], [0.5, 2.0, 0.0], [0.0, 0.0, 1.0]]
    r = [1.0, -2.0, 0.5]
    a = 0.1
    k = [sum(p[i][j] * r[j] for j in range(3)) for i in range(3)]
    rk = sum(r[i] * k[i] for i in range(3))
    new = [[p[i][j] - k[i] * k[j] / (a + rk) for j in range(3)] for i in range(3)]
    norm = math.sqrt(sum(v * v for row in new for v in row))
    got = owm_update(torch.tensor(p, dtype=torch.float64), torch.tensor(r, dtype=torch.float64), a)
    assert got.flatten().tolist() == pytest.approx([v / norm for row in new for v in row], rel=1e-12)
    # the updated projector (before normalising) nearly annihilates r: P r^T = k a / (a + r k)
    unnormalised = got * norm
    torch.testing.assert_close(unnormalised @ torch.tensor(r, dtype=torch.float64),
                               torch.tensor(k, dtype=torch.float64) * a / (a + rk))


def test_owm_alpha() -> None:
    assert owm_alpha(0, 10) == pytest.approx(0.1)
    assert owm_alpha(5, 10) == pytest.approx(0.1 ** 1.5)
    assert owm_alpha(3, None) == 0.1


def test_turns_alternate_and_the_head_gradient_is_projected() -> None:
    """Batch t trains modality t mod M alone through the shared head: the loss is its unimodal CE, the
    other encoder gets no gradient, and from the second batch the head's weight gradient is G P^T with
    P updated by the batch mean of the head's input."""
    fix = MLA()
    run = make_run(fix)
    fix.setup(run.ctx)
    projector = torch.eye(32, dtype=torch.float64)
    try:
        for t in range(4):
            xs, y = batch(n=32, offset=32 * t)
            m = ("audio", "visual")[t % 2]
            other = "visual" if m == "audio" else "audio"
            step = fix_step(run.ctx, fix, xs, y, 0, t)
            run.ctx.optimizer.zero_grad()
            step.loss.backward()
            with torch.no_grad():
                feats, z = hand_readouts(run.model, xs)
                blocks = [feats[k] if k == m else torch.zeros_like(feats[k]) for k in ("audio", "visual")]
                r = torch.cat(blocks, 1).double().mean(0)
            assert float(step.loss.detach()) == pytest.approx(float(F.cross_entropy(z[m], y)), rel=1e-5)
            raw = run.model.head.weight.grad.clone()
            fix.after_backward(run.ctx, step)
            assert all(p.grad is None or not bool(p.grad.any()) for p in run.ctx.encoder_parameters(other))
            if t == 0:
                assert torch.equal(run.model.head.weight.grad, raw)  # MLA skips its first update
            else:
                projector = owm_update(projector, r, 0.1)
                want = (raw.double() @ projector.t()).float()
                torch.testing.assert_close(run.model.head.weight.grad, want, rtol=1e-5, atol=1e-8)
            assert fix.signals()["turn"] == m
            run.ctx.optimizer.step()
    finally:
        fix.teardown(run.ctx)


class TwoLayerHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: nn.Linear(8, 4) for m in ("audio", "visual")})
        self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x: dict) -> torch.Tensor:
        return self.head(torch.cat([self.encoders["audio"](x["audio"]), self.encoders["visual"](x["visual"])], 1))


def test_refuses_a_head_that_is_not_one_linear_layer() -> None:
    adapter = ModelAdapter(TwoLayerHead(), ("audio", "visual"), head="head")
    ctx = FixContext(adapter=adapter, optimizer=None, epochs=1, n_classes=4)
    with pytest.raises(ConfigError, match="nn.Linear.*Sequential|Sequential.*`head`"):
        MLA().setup(ctx)


@pytest.mark.parametrize("fusion,strength", [("gated", (3.0, 0.8)), ("film", (3.0, 0.8)), ("concat", (3.0, 0.8, 0.8))])
def test_other_fusions_and_three_modalities(fusion: str, strength: tuple) -> None:
    run = train(MLA(), strength, 0, fusion=fusion, epochs=2, rows=SHORT)
    sig = run.history[-1]
    losses = [k for k in sig if k.startswith("loss.")]
    # two batches an epoch: with three modalities the turns reach all of them over the run
    assert len(losses) == min(len(strength), 2) and all(math.isfinite(sig[k]) for k in losses)
    assert run.fix.state_dict()["batches"] == 4


@pytest.mark.slow
def test_direction_raises_weak_modality_unimodal_accuracy() -> None:
    fixed, plain, full, _ = direction(MLA)
    assert mean(fixed) > mean(plain) + 0.1, (fixed, plain)
    fused_plain = mean([plain_accuracy(s)["fused"] for s in BUDGET.seeds])
    # alternating unimodal training gives up some fused accuracy on this toy (each encoder gets half
    # the steps and the fused loss is not trained): at most 0.05
    assert mean([a["fused"] for a in full]) >= fused_plain - 0.05
