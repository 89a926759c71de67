import json
import math

import numpy as np
import pytest
import torch

from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.diagnostics._probes import row_split
from mmdiag.diagnostics.udml import UNDEFINED_SPEARMAN, udml_weights
from mmdiag.evidence import Evidence, mask_of
from tests.helpers.toys import BALANCED, DOMINANT, toy_evidence

Udml = DIAGNOSTICS.get("udml")
FAST = dict(steps=60, bootstrap=50)


def tiny(noise: dict, n_classes: int = 3, seed: int = 0) -> Evidence:
    """Evidence with hand-made noise features {m: [L, n, d]} and random subset logits."""
    names = tuple(noise)
    n_levels, n = next(iter(noise.values())).shape[:2]
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    subsets = torch.randn(1 << len(names), n, n_classes, generator=g)
    return Evidence(modalities=names, n_classes=n_classes, labels=labels, logits=subsets[-1].clone(),
                    index=torch.arange(n), subsets=subsets,
                    noise_levels=torch.arange(1, n_levels + 1),
                    noise_features={m: torch.as_tensor(f, dtype=torch.float32) for m, f in noise.items()},
                    noise_rows=torch.arange(n))


def detectable(n_levels=6, n=40, d=3, seed=0):
    """Features whose norm grows with the noise level: x + level * direction + jitter."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, d))
    return np.stack([base + 0.8 * lvl + rng.normal(scale=0.05, size=(n, d)) for lvl in range(1, n_levels + 1)])


def test_weights_match_udml_formulas():
    sa, sv, da, dv = 1.5, 3.0, 20.0, 5.0
    t, w = udml_weights(np.array([sa, sv]), np.array([da, dv]))
    # UDML's code for M = 2: t_a = 2 s_v^2 / (s_a^2 + s_v^2); w_m = 2 w'_m / (w'_a + w'_v), w'_m = t_m / dep_m
    assert t[0] == pytest.approx(2 * sv**2 / (sa**2 + sv**2))
    assert t[1] == pytest.approx(2 * sa**2 / (sa**2 + sv**2))
    wa, wv = t[0] / da, t[1] / dv
    assert w[0] == pytest.approx(2 * wa / (wa + wv)) and w[1] == pytest.approx(2 * wv / (wa + wv))
    # M = 3: means are 1, by loops
    s, dep = [1.0, 2.0, 4.0], [3.0, 1.0, 2.0]
    t3, w3 = udml_weights(np.array(s), np.array(dep))
    inv = [1 / x**2 for x in s]
    for j in range(3):
        assert t3[j] == pytest.approx(inv[j] / (sum(inv) / 3))
    raw = [t3[j] / dep[j] for j in range(3)]
    for j in range(3):
        assert w3[j] == pytest.approx(raw[j] / (sum(raw) / 3))


def test_hand_built_reference_parts():
    ev = tiny({"a": detectable(seed=1), "b": detectable(seed=2)})
    res = Udml(**FAST).compute(ev)
    train, test = row_split(40, 0.3, 0)
    assert res.details["n_train_rows"] == len(train) and res.details["n_test_rows"] == len(test) == 12
    for m in ev.modalities:
        # dependency by loops over the m-only logits
        z = ev.subsets[mask_of([m], ev.modalities)]
        dep = sum(sum(abs(float(z[i, k])) for i in range(z.shape[0])) / z.shape[0] for k in range(z.shape[1]))
        assert res.details["dependency"][m] == pytest.approx(dep, rel=1e-9)
        cal = res.details["calibration"][m]
        assert [c["level"] for c in cal] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        assert res.per_modality[m] == pytest.approx(cal[0]["mean_pred"])  # sigma = clean held-out mean
        assert res.details["spearman"][m] > 0.9  # noise is obvious in these features
        assert all(c["std_pred"] >= 0 for c in cal)
    sigma = np.array([res.per_modality[m] for m in ev.modalities])
    dep = np.array([res.details["dependency"][m] for m in ev.modalities])
    t, w = udml_weights(sigma, dep)
    assert [res.details["weights"][m] for m in ev.modalities] == pytest.approx(list(w))
    assert [res.details["uncertainty_weights"][m] for m in ev.modalities] == pytest.approx(list(t))
    assert res.value == pytest.approx(float(sigma.max() - sigma.min()))
    assert res.details["estimator"].startswith("MLP probe fitted by mmdiag")


def test_constant_modality_spearman_is_documented_value():
    const = np.full((6, 40, 3), 0.7)
    ev = tiny({"a": detectable(), "b": const})
    res = Udml(**FAST).compute(ev)
    assert res.details["spearman"]["b"] == UNDEFINED_SPEARMAN
    assert res.details["spearman_undefined"] == ["b"]
    assert all(math.isfinite(v) for v in res.per_modality.values())
    json.dumps(res.to_dict())


def test_absent_class_and_clean_level_not_one():
    ev = tiny({"a": detectable(), "b": detectable(seed=5)}, n_classes=4)
    ev.labels[ev.labels == 3] = 0
    ev.noise_levels = torch.arange(2, 8)  # no level 1 in the grid: the lowest level is "clean"
    res = Udml(**FAST).compute(ev)
    assert res.details["clean_level"] == 2.0
    json.dumps(res.to_dict())


@pytest.mark.parametrize("strength", [(3.0, 0.8, 0.8), (3.0, 0.8, 0.8, 0.8, 0.8)])
def test_more_modalities(strength):
    ev = toy_evidence(strength, 0, kinds=("noise_features", "subsets"))
    res = Udml(**FAST).compute(ev)
    assert set(res.per_modality) == set(ev.modalities) == set(res.details["spearman"]) == set(res.ci)
    assert np.mean(list(res.details["weights"].values())) == pytest.approx(1.0)
    json.dumps(res.to_dict())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_detectable_and_direction(seed):
    # measured (200 noise rows, 60 held out, 11 levels): Spearman 0.76-0.77 (audio) and 0.57-0.63
    # (visual) on DOMINANT, 0.61-0.71 on BALANCED; with no detectable noise it would be ~0.
    # The clean-level sigma of the dominant (better trained) audio encoder is lower (3.5-3.9 vs
    # 4.5-4.6) and UDML's weights boost visual (1.3-1.5 vs 0.5-0.7).
    dom = Udml(bootstrap=100).compute(toy_evidence(DOMINANT, seed, kinds=("noise_features", "subsets")))
    bal = Udml(bootstrap=100).compute(toy_evidence(BALANCED, seed, kinds=("noise_features", "subsets")))
    for res in (dom, bal):
        assert min(res.details["spearman"].values()) > 0.45
    assert dom.per_modality["audio"] < dom.per_modality["visual"]
    assert dom.details["weights"]["visual"] > dom.details["weights"]["audio"]
    assert abs(bal.per_modality["audio"] - bal.per_modality["visual"]) < 0.6


def test_deterministic_json_and_not_mutated():
    ev = toy_evidence(DOMINANT, 0, kinds=("noise_features", "subsets"))
    before = {m: f.clone() for m, f in ev.noise_features.items()}
    state = torch.random.get_rng_state()
    a = Udml(**FAST, seed=4).compute(ev)
    b = Udml(**FAST, seed=4).compute(ev)
    assert a.to_dict() == b.to_dict()
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    assert all(torch.equal(before[m], ev.noise_features[m]) for m in before)
    json.dumps(a.to_dict())


def test_flat_adam_matches_torch_adam_bit_for_bit():
    """The regressors' hand-rolled Adam is torch.optim.Adam (defaults) to the last bit."""
    from mmdiag.diagnostics._probes import FlatAdam

    g = torch.Generator().manual_seed(3)
    ours, theirs = torch.randn(257, generator=g), None
    theirs = ours.clone().requires_grad_(True)
    ref = torch.optim.Adam([theirs], lr=1e-2)
    opt = FlatAdam(ours, 1e-2)
    for _ in range(40):
        grad = torch.randn(257, generator=g) * 3.0
        theirs.grad = grad.clone()
        ref.step()
        opt.step(grad)
        assert torch.equal(ours, theirs.detach())


def test_noise_regressor_fit_matches_autograd_reference():
    """The written-out gradients and Adam give the weights of an autograd + torch.optim.Adam fit
    of the same loss (mean (sigma - t)^2 / var t) from the same start."""
    from mmdiag.diagnostics._probes import NoiseRegressor, fit_noise_regressors

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    x[:, 2] = 0.0  # a dead column keeps its initial first-layer weights
    target = np.repeat(np.arange(1.0, 7.0), 20)
    (fitted,) = fit_noise_regressors([x], target, hidden=8, steps=50, lr=1e-2, seeds=[4])

    torch.manual_seed(4)
    ref = NoiseRegressor(5, 8)
    with torch.no_grad():
        ref.body[2].bias.fill_(2.0 * math.log(target.mean()))
    t = torch.as_tensor(target, dtype=torch.float32)
    xt = torch.as_tensor(x)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for _ in range(50):
        loss = ((ref(xt) - t) ** 2).mean() / t.var()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for ours, theirs in zip(fitted.parameters(), ref.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)


def test_seeded_regressor_is_the_global_seed_construction_without_touching_it():
    from mmdiag.diagnostics._probes import NoiseRegressor

    state = torch.random.get_rng_state()
    ours = NoiseRegressor.seeded(7, 5, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(11)
    theirs = NoiseRegressor(7, 5)
    torch.random.set_rng_state(state)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    from mmdiag.diagnostics._probes import spearman

    rng = np.random.default_rng(2)
    for _ in range(5):
        a, b = rng.integers(0, 6, size=40).astype(float), rng.normal(size=40)
        b[:10] = b[10:20]
        assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert math.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_regressors_fitted_side_by_side_equal_each_fitted_alone():
    """The batched fit of several regressors (inputs of different widths, a dead column) gives each
    the weights of its own fit, to float32 rounding over a short fit, and leaves the dead column's
    first-layer weights at their initial values."""
    from mmdiag.diagnostics._probes import NoiseRegressor, fit_noise_regressors

    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(90, d)).astype(np.float32) for d in (6, 3, 9)]
    xs[2][:, 4] = 0.0
    target = np.repeat(np.arange(1.0, 12.0, 2.0), 15)
    together = fit_noise_regressors(xs, target, hidden=8, steps=20, lr=1e-2, seeds=[3, 4, 5])
    for j, x in enumerate(xs):
        (alone,) = fit_noise_regressors([x], target, hidden=8, steps=20, lr=1e-2, seeds=[3 + j])
        assert together[j].body[0].weight.shape == (8, x.shape[1])
        for ours, theirs in zip(together[j].parameters(), alone.parameters()):
            assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-5)
    start = NoiseRegressor.seeded(9, 8, seed=5)
    assert torch.equal(together[2].body[0].weight[:, 4], start.body[0].weight[:, 4])
    assert not torch.equal(together[2].body[0].weight[:, 3], start.body[0].weight[:, 3])
