"""restore: the MMD term and the whole loss by hand, combinations, encoder outputs of any rank (tuples
refused), hooks, teardown and state, and the direction on the dominance toy (dominant modality missing).

The contract every fix meets (hooks, teardown, state, parameters, distributed) is in test_conformance.py;
saving, loading and deploying the translator are in tests/test_deploy.py.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES, fix_step
from mmdiag.fixes.restore import Restore, Translator, mmd_rbf
from tests.helpers.fixkit import (BUDGET, MODS, batch, check_hooks_fire, check_teardown, make_run, mean, one_step,
                                  plain_accuracy, roundtrip, tensors, toy_model, train)
from tests.helpers.toys import DOMINANT, toy_split

ROWS = slice(0, 128)


def mmd_by_hand(x: torch.Tensor, y: torch.Tensor) -> float:
    """Biased MMD² with exp(-d²/h), h the lower median of the distinct pairs' squared distances, by loops."""
    pts = [p.double() for p in torch.cat([x, y])]
    n, nx = len(pts), len(x)
    d2 = [[float(((pts[i] - pts[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    h = statistics.median_low([d2[i][j] for i in range(n) for j in range(i + 1, n)])

    def k(rows: range, cols: range) -> float:
        return statistics.fmean(math.exp(-d2[i][j] / h) for i in rows for j in cols)

    xs, ys = range(nx), range(nx, n)
    return k(xs, xs) + k(ys, ys) - 2 * k(xs, ys)


def test_registered_with_metadata() -> None:
    cls = FIXES.get("restore")
    assert cls is Restore and cls.needs_encoders and not cls.scales_gradients
    assert cls.targets == ("missing_modality",) and cls.matches and "PROPOSED" in cls.summary
    assert cls().params() == {"lambda_rec": 1.0, "lambda_align": 0.1, "lambda_restored": 1.0, "hidden": 256,
                              "flatten_limit": 4096, "missing": None, "combinations": None, "seed": 0}


@pytest.mark.parametrize("bad", [{"lambda_rec": -1.0}, {"lambda_align": float("nan")}, {"hidden": 0},
                                 {"flatten_limit": 1.5}, {"missing": "audio"}, {"missing": "audio=1.5"},
                                 {"missing": "audio=0.2", "combinations": "visual=1"}, {"combinations": 3}])
def test_bad_params(bad: dict) -> None:
    with pytest.raises(ConfigError):
        Restore(**bad)


def test_unknown_modality_is_refused_at_setup() -> None:
    fix = Restore(missing="depth=0.3")
    with pytest.raises(ConfigError, match="depth"):
        fix.setup(make_run(fix).ctx)


def test_mmd_matches_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g) + 0.7
    assert float(mmd_rbf(x, y)) == pytest.approx(mmd_by_hand(x, y), rel=1e-5, abs=1e-7)
    assert float(mmd_rbf(x, x.clone())) == pytest.approx(0.0, abs=1e-6)
    same = x.clone().requires_grad_(True)  # coinciding points: the gradient stays finite
    mmd_rbf(same, x).backward()
    assert bool(torch.isfinite(same.grad).all())


def test_draws_follow_the_missing_rates() -> None:
    fix = Restore(missing="audio=1")  # audio always missing: only {visual} remains
    fix.setup(make_run(fix).ctx)
    keep = fix.draw(500, torch.device("cpu"))
    assert not bool(keep[:, 0].any()) and bool(keep[:, 1].all())
    fix = Restore()
    fix.setup(make_run(fix).ctx)
    keep = fix.draw(3000, torch.device("cpu"))
    frac = torch.stack([keep[:, 0] & ~keep[:, 1], ~keep[:, 0] & keep[:, 1], keep.all(1)]).float().mean(1)
    assert torch.allclose(frac, torch.full((3,), 1 / 3), atol=0.04), frac


def test_loss_matches_a_hand_computation() -> None:
    """CE(fused) + CE(head on restored) + Σ MSE + 0.1 Σ MMD², recomputed from the translator's weights."""
    model = toy_model(0)
    fix = Restore()
    run = make_run(fix, model=model)
    fix.setup(run.ctx)
    x, y = batch(n=48)
    torch.manual_seed(3)
    step = fix_step(run.ctx, fix, x, y)
    torch.manual_seed(3)
    keep = fix.draw(48, torch.device("cpu"))
    tr = run.ctx.aux["restore"]
    with torch.no_grad():
        h = {m: model.encoders[m](x[m]) for m in MODS}
        restored, rec, align = {}, 0.0, 0.0
        for j, m in enumerate(MODS):
            other = 1 - j
            on = keep[:, other].float()[:, None]
            b = tr.branches[m]
            est = F.relu(torch.cat([h[MODS[other]] * on, on], 1) @ b.w1.T + b.b1) @ b.w2.T + b.b2
            rows = keep[:, other]
            rec += float(((est[rows] - h[m][rows]) ** 2).mean())
            align += mmd_by_hand(est[rows], h[m][rows])
            restored[m] = torch.where(keep[:, j:j + 1], h[m], est)
        fused = F.cross_entropy(model(x), y)
        ce = F.cross_entropy(model.head(torch.cat([restored["audio"], restored["visual"]], 1)), y)
        want = float(fused + ce) + rec + 0.1 * align
    assert float(step.loss.detach()) == pytest.approx(want, rel=1e-5)
    assert step.logs["rec"] == pytest.approx(rec, rel=1e-5)


class _Maps(nn.Module):
    """Encoder outputs of rank 3 ([B, 4, 4]), a concat head over their flattened values."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(8, 16), nn.Unflatten(1, (4, 4)))
        self.visual = nn.Sequential(nn.Linear(8, 16), nn.Unflatten(1, (4, 4)))
        self.head = nn.Linear(32, 4)

    def forward(self, x: dict) -> torch.Tensor:
        return self.head(torch.cat([self.audio(x["audio"]).flatten(1), self.visual(x["visual"]).flatten(1)], 1))


@pytest.mark.parametrize("limit, width", [(4096, 16), (4, 4)])
def test_encoder_outputs_of_any_rank_flattened_or_pooled(limit: int, width: int) -> None:
    torch.manual_seed(0)
    fix = Restore(flatten_limit=limit)
    run, step = one_step(fix, run=make_run(fix, model=_Maps()))
    tr = run.ctx.aux["restore"]
    assert tr.describe()["shapes"] == {"audio": [4, 4], "visual": [4, 4]}
    assert tr.describe()["in_features"] == {"audio": width + 1, "visual": width + 1}  # + the presence bit
    out = tr.restore(step.features, ["visual"])
    assert out["audio"].shape == (64, 4, 4) and out["visual"] is step.features["visual"]
    fix.teardown(run.ctx)


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        return h, h.mean(1)


class _TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio, self.visual, self.head = _Pair(), _Pair(), nn.Linear(32, 4)

    def forward(self, x: dict) -> torch.Tensor:
        return self.head(torch.cat([self.audio(x["audio"])[0], self.visual(x["visual"])[0]], 1))


def test_tuple_encoder_outputs_are_refused_with_a_message() -> None:
    fix = Restore()
    run = make_run(fix, model=_TupleNet())
    fix.setup(run.ctx)
    x, y = batch()
    with pytest.raises(ConfigError, match="returns tuple.*single tensor"):
        fix_step(run.ctx, fix, x, y)
    fix.teardown(run.ctx)


def test_hooks_fire_teardown_is_clean_and_state_round_trips() -> None:
    run = check_hooks_fire(Restore(), rows=ROWS)
    assert {"rec.audio", "rec.visual", "align.audio", "align.visual", "acc.restored"} <= set(run.history[-1])
    assert all(math.isfinite(v) for v in run.history[-1].values())
    assert isinstance(run.ctx.aux["restore"], Translator) and run.ctx.aux["restore"].trained
    roundtrip(run.fix)
    check_teardown(Restore, rows=ROWS)


@torch.no_grad()
def restored_accuracy(run, seed: int, missing: str = "audio") -> float:
    """Held-out accuracy with ``missing`` absent and restored by the run's translator."""
    from mmdiag.deploy import with_restoration

    xs, y = tensors(toy_split(DOMINANT, seed)[1])
    net = with_restoration(run.model, run.ctx.aux["restore"]).eval()
    return (net({m: x for m, x in xs.items() if m != missing}).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_direction_restoring_the_missing_dominant_modality_beats_masking_it() -> None:
    """Dominant modality (audio) missing at test time: the restored model beats plain training with
    audio masked, on every seed of the shared budget."""
    restored, plain = [], []
    for s in BUDGET.seeds:
        restored.append(restored_accuracy(train(Restore(), seed=s), s))
        plain.append(plain_accuracy(s)["visual"])
    assert all(r > p for r, p in zip(restored, plain)), (restored, plain)
    assert mean(restored) > mean(plain) + 0.1, (restored, plain)
