"""gblending: OGR weights from known losses, the weighted loss by hand, the held-out rows (hash and
reserved rows) against independent recomputations, other fusions, and direction on the toy.

The contract every fix meets (hooks, teardown, state, parameters, distributed) is in test_conformance.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES
from mmdiag.fixes._heldout import row_hash
from mmdiag.fixes.gblending import GBlending, blending_weights
from tests.helpers.fixkit import (BUDGET, SHORT, batch, direction, fit_run, hand_readouts, mean, one_step,
                                  plain_accuracy, train)
from tests.helpers.toys import DOMINANT, toy_split


def test_registered_with_defaults() -> None:
    assert FIXES.get("gblending") is GBlending and GBlending.needs_encoders
    assert GBlending().params() == {"every": 10, "holdout_fraction": 0.1, "seed": 0}


@pytest.mark.parametrize("bad", [{"every": 0}, {"holdout_fraction": 0.0}, {"holdout_fraction": 1.0}, {"seed": 1.5}])
def test_bad_parameters(bad: dict) -> None:
    with pytest.raises(ConfigError, match="gblending: "):
        GBlending(**bad)


def test_weights_from_known_losses_match_the_hand_computation() -> None:
    """(train, held-out) losses at the window's start and end -> w ∝ |ΔG| / ΔO², OGR = |ΔO / ΔG|."""
    before = {"audio": (1.0, 1.2), "visual": (1.5, 1.6), "fused": (0.9, 1.1)}
    after = {"audio": (0.5, 1.0), "visual": (1.0, 1.25), "fused": (0.4, 0.9)}
    # audio: O 0.2 -> 0.5 (ΔO 0.3), ΔG 0.2; visual: O 0.1 -> 0.25 (ΔO 0.15), ΔG 0.35; fused: ΔO 0.3, ΔG 0.2
    raw = {"audio": 0.2 / 0.09, "visual": 0.35 / 0.0225, "fused": 0.2 / 0.09}
    total = sum(raw.values())
    w, ogr = blending_weights(before, after)
    assert w == pytest.approx({k: v / total for k, v in raw.items()}, rel=1e-9)
    assert ogr == pytest.approx({"audio": 1.5, "visual": 0.15 / 0.35, "fused": 1.5}, rel=1e-9)
    # a head whose held-out loss rose weighs by |ΔG| too (BalanceMM's |g/o²|)
    worse = dict(after, visual=(1.0, 1.7))  # O 0.1 -> 0.7 (ΔO 0.6), ΔG -0.1
    w2, _ = blending_weights(before, worse)
    raw2 = dict(raw, visual=0.1 / 0.36)
    assert w2["visual"] == pytest.approx(raw2["visual"] / sum(raw2.values()), rel=1e-9)
    # nothing moved: uniform, OGR infinite
    w3, ogr3 = blending_weights(before, before)
    assert w3 == {k: pytest.approx(1 / 3) for k in before} and all(math.isinf(v) for v in ogr3.values())


def test_loss_is_the_weighted_sum_over_rows_not_held_out() -> None:
    fix = GBlending()
    fix.load_state_dict({"weights": {"audio": 0.5, "visual": 0.3, "fused": 0.2}})
    run, step = one_step(fix, n=64)
    fix.teardown(run.ctx)
    xs, y = batch(n=64)
    with torch.no_grad():
        _, z = hand_readouts(run.model, xs)
        z["fused"] = run.model(xs)
        # the held-out rows, recomputed from the definition of the hash: frac of the row's values only
        held = row_hash(xs, ("audio", "visual"), 0) < 0.1
        keep = ~held
        want = sum(w * F.cross_entropy(z[k][keep], y[keep]) for k, w in (("audio", 0.5), ("visual", 0.3),
                                                                             ("fused", 0.2)))
    assert 0 < int(held.sum()) < 64
    assert float(step.loss.detach()) == pytest.approx(float(want), rel=1e-5)


def test_row_hash_depends_on_the_row_alone() -> None:
    xs, _ = batch(n=600)
    h = row_hash(xs, ("audio", "visual"), 0)
    perm = torch.randperm(600, generator=torch.Generator().manual_seed(3))
    assert torch.equal(row_hash({m: x[perm] for m, x in xs.items()}, ("audio", "visual"), 0), h[perm])
    assert torch.equal(row_hash({m: x[:7] for m, x in xs.items()}, ("audio", "visual"), 0), h[:7])
    assert len(set(h.tolist())) == 600  # distinct rows, distinct values
    assert 0.07 < float((h < 0.1).double().mean()) < 0.13  # about the fraction asked for
    assert not torch.equal(row_hash(xs, ("audio", "visual"), 1), h)  # the seed changes the draw


def test_reserved_rows_records_match_an_independent_evaluation() -> None:
    """In the reference loop (training data in the context) the record at the last window's end holds
    each head's mean CE on the reserved rows and on as many training rows, with the final model."""
    fix = GBlending(every=1)
    model, hist = fit_run(fix, rows=slice(0, 200), epochs=2, validate=False)
    assert hist.last["signal.held_out"] == "training rows"
    data = toy_split(DOMINANT, 0)[0]
    n, k = 200, 20
    held = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].tolist())
    rest = [i for i in torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist() if i not in held][:k]
    model.eval()
    record = fix.state_dict()["record"]
    with torch.no_grad():
        for part, rows in ((1, held), (0, sorted(rest))):
            xs = {m: torch.as_tensor(data[m][rows]) for m in ("audio", "visual")}
            y = torch.as_tensor(data["label"][rows])
            _, z = hand_readouts(model, xs)
            z["fused"] = model(xs)
            for head, logits in z.items():
                assert record[head][part] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert fix.state_dict()["estimates"] == 2
    assert sum(fix.state_dict()["weights"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("fusion,strength", [("gated", (3.0, 0.8)), ("film", (3.0, 0.8)), ("concat", (3.0, 0.8, 0.8))])
def test_other_fusions_and_three_modalities(fusion: str, strength: tuple) -> None:
    run = train(GBlending(every=1), strength, 0, fusion=fusion, epochs=2, rows=SHORT)
    sig = run.fix.signals()
    heads = [f"w.m{j}" for j in range(len(strength))] if len(strength) == 3 else ["w.audio", "w.visual"]
    assert set(heads + ["w.fused"]) <= set(sig)
    assert sum(sig[h] for h in heads + ["w.fused"]) == pytest.approx(1.0)


@pytest.mark.slow
def test_direction_raises_weak_modality_unimodal_accuracy() -> None:
    fixed, plain, full, _ = direction(lambda: GBlending(every=2))
    assert mean(fixed) > mean(plain) + 0.1, (fixed, plain)
    fused_plain = mean([plain_accuracy(s)["fused"] for s in BUDGET.seeds])
    assert mean([a["fused"] for a in full]) >= fused_plain - 0.02
