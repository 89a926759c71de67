"""agm: Shapley responses, the coefficient's sign, gradient scaling, the black box, direction.

The contract every fix meets (hooks, teardown, state, parameters, distributed) is in test_conformance.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES, fix_step
from mmdiag.fixes._common import grad_scale
from mmdiag.fixes.agm import AGM, shapley_responses
from tests.helpers.fixkit import MODS, Blob, batch, direction, fit_run, make_run, mean, toy_model
from tests.helpers.toys import DOMINANT, trained_toy


def test_registered_with_metadata() -> None:
    cls = FIXES.get("agm")
    assert cls is AGM and not cls.needs_encoders
    assert AGM().params() == {"alpha": 1.0, "start_epoch": 0, "end_epoch": 20, "cap": 10.0, "clip_norm": 1.0}


@pytest.mark.parametrize("bad", [{"alpha": -1.0}, {"cap": float("inf")}, {"clip_norm": 0.0},
                                 {"start_epoch": 3, "end_epoch": 1}, {"start_epoch": 0.5}])
def test_bad_params(bad: dict) -> None:
    with pytest.raises(ConfigError):
        AGM(**bad)


def test_two_modality_responses_are_the_original_formula() -> None:
    t, pv, pa = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)  # T, P_v = v({a}), P_a = v({v})
    psi = shapley_responses(t, {frozenset({"a"}): pv, frozenset({"v"}): pa}, ("a", "v"))
    assert torch.allclose(psi["a"], 0.5 * (t - pa + pv))
    assert torch.allclose(psi["v"], 0.5 * (t - pv + pa))


def test_three_modality_responses_add_up_and_match_brute_force() -> None:
    mods = ("a", "b", "c")
    gen = torch.Generator().manual_seed(0)
    values = {frozenset(s): torch.randn(4, 2, generator=gen)
              for s in ({"a"}, {"b"}, {"c"}, {"a", "b"}, {"a", "c"}, {"b", "c"})}
    full = torch.randn(4, 2, generator=gen)
    psi = shapley_responses(full, values, mods)
    assert torch.allclose(sum(psi.values()), full, atol=1e-6)  # efficiency with v(empty) = 0
    # brute force over orderings: average marginal contribution
    import itertools

    def v(s: frozenset) -> torch.Tensor:
        return full if len(s) == 3 else values[s] if s else torch.zeros(4, 2)

    for m in mods:
        total = torch.zeros(4, 2)
        perms = list(itertools.permutations(mods))
        for order in perms:
            before = frozenset(order[:order.index(m)])
            total += v(before | {m}) - v(before)
        assert torch.allclose(psi[m], total / len(perms), atol=1e-6)


def test_coefficient_sign_follows_the_original() -> None:
    """A modality currently stronger (lower loss) than in its history is slowed (kappa < 1)."""
    fix = AGM(alpha=1.0)
    fix._mean = {"audio": 0.5, "visual": 0.5}
    kappa = fix.coefficients({"audio": 0.1, "visual": 0.9})
    assert kappa["audio"] < 1 < kappa["visual"]
    # the M-modality form reduces to r^a = exp(s^v - s^a) for M = 2
    r_a = math.exp(0.9 - 0.1)
    assert kappa["audio"] == pytest.approx(math.exp(1.0 * min(1.0 - r_a, 10.0)))
    fix._mean = {}
    assert fix.coefficients({"audio": 0.3, "visual": 0.3}) == {"audio": 1.0, "visual": 1.0}


def test_grad_scale_scales_only_the_gradient() -> None:
    x = torch.randn(3, requires_grad=True)
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(x.grad, 0.25 * torch.tensor([1.0, 2.0, 3.0]))


def test_forward_returns_the_sum_of_responses_and_scales_their_gradients() -> None:
    model = copy.deepcopy(trained_toy(DOMINANT, 0))
    x, y = batch(n=32)
    ctx = make_run(AGM(), model=model).ctx
    fix = AGM(alpha=1.0)
    fix._mean = {"audio": 1.0, "visual": 1.0}
    fix._iterations = 10
    step = fix_step(ctx, fix, x, y)
    with torch.no_grad():
        plain = model(x)
    assert torch.allclose(step.logits, plain, atol=1e-5)  # sum_m psi_m = T
    sig = fix.signals()
    assert sig["coeff.audio"] < 1 < sig["coeff.visual"]  # audio got stronger than its (fake) history
    # the gradient reaching the head equals the one of CE(kappa_a psi_a + kappa_v psi_v) without scaling
    step.loss.backward()
    got = model.head.weight.grad.clone()
    model.zero_grad()
    feats = {m: model.encoders[m](x[m]) for m in MODS}
    t = model.head(torch.cat([feats["audio"], feats["visual"]], 1))
    p_v = model.head(torch.cat([feats["audio"], torch.zeros_like(feats["visual"])], 1))
    p_a = model.head(torch.cat([torch.zeros_like(feats["audio"]), feats["visual"]], 1))
    psi_a, psi_v = 0.5 * (t - p_a + p_v), 0.5 * (t - p_v + p_a)
    ka, kv = sig["coeff.audio"], sig["coeff.visual"]
    z = psi_a + psi_v
    # d CE / d psi_m is the same tensor for both responses; scaling psi_m's gradient by kappa_m is the
    # gradient of <g, ka psi_a + kv psi_v> with g = dCE/dz held fixed
    g = torch.autograd.grad(F.cross_entropy(z, y), z, retain_graph=True)[0]
    (g * (ka * psi_a + kv * psi_v)).sum().backward()
    assert torch.allclose(got, model.head.weight.grad, atol=1e-6)


def test_running_mean_is_cumulative_over_iterations() -> None:
    fix = AGM(alpha=1.0)
    _, hist = fit_run(fix, epochs=2)
    assert fix._iterations == 2 * 10  # 600 samples, batch 64, two epochs
    assert set(fix.signals()) == {"score.audio", "score.visual", "coeff.audio", "coeff.visual"}
    assert "signal.coeff.audio" in hist.rows[0]


def test_outside_the_window_training_is_plain() -> None:
    ctx = make_run(AGM(), model=toy_model(0)).ctx
    x, y = batch(n=16)
    fix = AGM(start_epoch=2)
    assert fix.forward(ctx, fix_step(ctx, fix, x, y, epoch=0)) is None
    assert fix._iterations == 0


def test_black_box_model_uses_input_masking() -> None:
    """Without known encoders the subset readouts mask inputs (AGM's original padding)."""
    torch.manual_seed(0)
    _, hist = fit_run(AGM(), model=Blob(), epochs=1)
    assert math.isfinite(hist.last["signal.coeff.audio"])


def test_direction_weak_modality_gains() -> None:
    """AGM (alpha 2.5, the original's AV-MNIST setting) leaves the weak modality's unimodal
    accuracy higher than plain training under the same seeds and budget (mean of 3 seeds)."""
    fixed, plain, _, _ = direction(lambda: AGM(alpha=2.5))
    assert mean(fixed) > mean(plain), (fixed, plain)
