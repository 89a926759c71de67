"""attribution: share of absolute Integrated-Gradients attribution per modality."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmdiag.adapter import ModelAdapter
from mmdiag.collect import CollectSettings, collect
from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.errors import ConfigError, EvidenceError
from mmdiag.evidence import Evidence
from mmdiag.loading import dataset_from_arrays
from mmdiag.report import Result
from tests.helpers.toys import BALANCED, DOMINANT, names_for, toy_evidence, toy_split, trained_toy

ATTR = DIAGNOSTICS.get("attribution")


def hand_evidence(mass: np.ndarray, delta: np.ndarray | None = None, n_rows: int | None = None,
                  subsets: np.ndarray | None = None, meta: dict | None = None, seed: int = 0) -> Evidence:
    """Evidence with attribution rows 0..n_a-1 of ``n_rows`` evaluated rows."""
    n_a, m_count = mass.shape
    n = n_rows or n_a
    rng = np.random.default_rng(seed)
    logits = torch.as_tensor(rng.normal(size=(n, 3)), dtype=torch.float32)
    return Evidence(
        modalities=tuple(names_for(m_count)),
        n_classes=3,
        labels=torch.as_tensor(rng.integers(0, 3, size=n)),
        logits=logits if subsets is None else torch.as_tensor(subsets[-1], dtype=torch.float32),
        index=torch.arange(n),
        subsets=None if subsets is None else torch.as_tensor(subsets, dtype=torch.float32),
        attribution=torch.as_tensor(mass, dtype=torch.float32),
        attribution_delta=None if delta is None else torch.as_tensor(delta, dtype=torch.float32),
        attribution_rows=torch.arange(n_a),
        meta=meta or {},
    )


def reference(ev: Evidence) -> tuple[dict[str, float], float, int]:
    """Loop version: mean per-sample share over samples with non-zero mass; spread; n used."""
    mods = ev.modalities
    sums = {m: 0.0 for m in mods}
    used = 0
    for row in ev.attribution.tolist():
        total = sum(abs(v) for v in row)
        if total == 0:
            continue
        used += 1
        for m, v in zip(mods, row):
            sums[m] += abs(v) / total
    shares = {m: s / used for m, s in sums.items()}
    return shares, max(shares.values()) - min(shares.values()), used


def check_against_reference(ev: Evidence, res: Result) -> None:
    shares, spread, used = reference(ev)
    assert res.per_modality == pytest.approx(shares, abs=1e-6)
    assert res.value == pytest.approx(spread, abs=1e-6)
    assert res.details["n_samples"] == used
    assert sum(res.per_modality.values()) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ (a) reference
@pytest.mark.parametrize("m_count", [2, 3, 5])
def test_matches_reference_on_hand_built_evidence(m_count: int) -> None:
    rng = np.random.default_rng(m_count)
    mass = rng.exponential(size=(40, m_count)) * rng.uniform(0.1, 5, size=m_count)
    mass[3] = 0.0  # a sample with no attribution at all is left out
    mass[7, 0] = 0.0
    ev = hand_evidence(mass, delta=rng.uniform(0, 0.01, size=40))
    res = ATTR(bootstrap=200).compute(ev)
    check_against_reference(ev, res)
    assert res.details["n_zero_attribution"] == 1
    for m in ev.modalities:
        lo, hi = res.ci[m]
        assert 0.0 <= lo <= res.per_modality[m] <= hi <= 1.0
    assert res.value_ci[0] <= res.value <= res.value_ci[1]
    assert res.details["delta_relative"]["relative_to"] == "attribution_mass"


def test_matches_reference_on_toy() -> None:
    ev = toy_evidence(DOMINANT, 0)
    res = ATTR(bootstrap=200).compute(ev)
    check_against_reference(ev, res)
    assert res.details["n_samples"] == ev.attribution.shape[0]


def test_delta_relative_to_logit_gap_when_the_baseline_logits_are_known() -> None:
    rng = np.random.default_rng(1)
    n = 12
    subsets = rng.normal(size=(4, n, 3))
    mass = rng.uniform(0.5, 2.0, size=(8, 2))
    delta = rng.uniform(0.0, 0.02, size=8)
    ev = hand_evidence(mass, delta, n_rows=n, subsets=subsets, meta={"mask_at": "input", "mask": "zero"})
    res = ATTR(bootstrap=0).compute(ev)
    y = ev.labels.numpy()
    gap = [abs(subsets[3, i, y[i]] - subsets[0, i, y[i]]) for i in range(8)]
    rel = res.details["delta_relative"]
    assert rel["relative_to"] == "logit_gap"
    assert rel["pooled"] == pytest.approx(sum(delta) / sum(gap), rel=1e-5)
    assert rel["max"] == pytest.approx(max(d / g for d, g in zip(delta, gap)), rel=1e-5)
    # feature-level or noise masking: the IG baseline's logits are not in the evidence
    for meta in ({"mask_at": "feature", "mask": "zero"}, {"mask_at": "input", "mask": "noise"}):
        other = hand_evidence(mass, delta, n_rows=n, subsets=subsets, meta=meta)
        assert ATTR(bootstrap=0).compute(other).details["delta_relative"]["relative_to"] == "attribution_mass"


def test_convergence_delta_small_and_attribution_matches_a_plain_riemann_sum() -> None:
    """Completeness on the toy: captum's delta is small against the logit gap, and an independent
    400-step midpoint Riemann sum of the path integral reproduces the collected mass."""
    ev = toy_evidence(DOMINANT, 0, mask_at="input")
    res = ATTR(bootstrap=0).compute(ev)
    rel = res.details["delta_relative"]
    assert rel["relative_to"] == "logit_gap"
    assert rel["pooled"] < 0.02 and rel["max"] < 0.1
    assert "convergence_note" not in res.details

    model = trained_toy(DOMINANT, 0, "concat")
    test = toy_split(DOMINANT, 0)[1]
    rows = ev.attribution_rows[:6]
    idx = ev.index[rows]
    names = list(ev.modalities)
    x = {m: torch.as_tensor(test[m])[idx] for m in names}
    y = ev.labels[rows]
    assert torch.equal(torch.as_tensor(test["label"])[idx], y)
    steps = 400
    avg = {m: torch.zeros_like(x[m]) for m in names}
    for k in range(steps):
        a = (k + 0.5) / steps
        xi = {m: (a * x[m]).requires_grad_(True) for m in names}  # zero baseline
        grads = torch.autograd.grad(model(xi).gather(1, y[:, None]).sum(), [xi[m] for m in names])
        for m, g in zip(names, grads):
            avg[m] += g / steps
    mass = torch.stack([(avg[m] * x[m]).abs().flatten(1).sum(1) for m in names], dim=1)
    assert torch.allclose(mass, ev.attribution[:6], rtol=0.05)
    per_modality = torch.stack([(avg[m] * x[m]).flatten(1).sum(1) for m in names], dim=1)
    assert torch.allclose(per_modality, ev.attribution_signed[:6], atol=0.02 * float(per_modality.abs().max()))
    signed = per_modality.sum(1)
    with torch.no_grad():
        gap = (model(x) - model({m: torch.zeros_like(v) for m, v in x.items()})).gather(1, y[:, None])[:, 0]
    assert torch.allclose(signed, gap, atol=0.02 * float(gap.abs().max()))


# ------------------------------------------------------------------------------------ signed share
def signed_reference(signed: list[list[float]], mods) -> dict[str, float]:
    """Loop version: positive parts of the per-modality mean signed attribution, normalised."""
    means = [sum(row[j] for row in signed) / len(signed) for j in range(len(mods))]
    pos = [max(v, 0.0) for v in means]
    total = sum(pos)
    return {m: (p / total if total > 0 else 1.0 / len(mods)) for m, p in zip(mods, pos)}


def test_signed_share_matches_reference_and_becomes_the_value_when_asked() -> None:
    ev = toy_evidence(DOMINANT, 0)
    ref = signed_reference(ev.attribution_signed.double().tolist(), ev.modalities)
    default = ATTR(bootstrap=100).compute(ev)
    assert default.details["share"] == "absolute"
    assert default.details["signed_share"] == pytest.approx(ref, abs=1e-9)
    signed = ATTR(bootstrap=100, share="signed").compute(ev)
    assert signed.per_modality == pytest.approx(ref, abs=1e-9)
    assert signed.value == pytest.approx(max(ref.values()) - min(ref.values()), abs=1e-9)
    assert signed.details["absolute_share"] == pytest.approx(default.per_modality)
    for m, (lo, hi) in signed.ci.items():
        assert lo <= signed.per_modality[m] <= hi
    # a modality whose mean signed attribution is negative gets share 0, not a negative share
    hand = hand_evidence(np.ones((4, 2)))
    hand.attribution_signed = torch.tensor([[2.0, -1.0], [1.0, -0.5], [3.0, 0.5], [2.0, -1.0]])
    assert ATTR(bootstrap=10, share="signed").compute(hand).per_modality == {"audio": 1.0, "visual": 0.0}
    assert "signed_note" not in ATTR(bootstrap=0).compute(hand).details
    hand.attribution_signed = -hand.attribution_signed.abs()
    res = ATTR(bootstrap=0, share="signed").compute(hand)
    assert res.per_modality == {"audio": 0.5, "visual": 0.5} and "undefined" in res.details["signed_note"]
    hand.attribution_signed = None
    with pytest.raises(EvidenceError, match="signed"):
        ATTR(share="signed").compute(hand)
    with pytest.raises(ConfigError):
        ATTR(share="relative")


def test_signed_share_is_not_inflated_by_extra_noise_elements() -> None:
    """Pad the weak modality with 400 pure-noise elements the model never reads (the trained head
    sees only the original columns): the absolute share jumps, the signed share barely moves."""
    model = trained_toy(BALANCED, 0, "concat")
    names = names_for(2)
    test = dict(toy_split(BALANCED, 0)[1])
    width = test["visual"].shape[1]

    class Padded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, inputs):
            return self.inner({"audio": inputs["audio"], "visual": inputs["visual"][:, :width]})

    rng = np.random.default_rng(0)
    padded = dict(test)
    padded["visual"] = np.concatenate(
        [test["visual"], rng.normal(size=(len(test["label"]), 400)).astype(test["visual"].dtype)], axis=1)
    settings = CollectSettings(device="cpu", seed=0, batch_size=128, max_attribution_samples=64,
                               attribution_fraction=1.0, ig_steps=16)

    def shares(net, data):
        ev = collect(ModelAdapter(net, tuple(names), mask_at="input"), dataset_from_arrays(data), {"attribution"}, settings)
        res = ATTR(bootstrap=0).compute(ev)
        return res.details["absolute_share"]["visual"], res.details["signed_share"]["visual"]

    abs_plain, signed_plain = shares(Padded(), test)
    abs_padded, signed_padded = shares(Padded(), padded)
    # the noise columns get zero gradient through the slice, so both stay put; now let them leak in
    assert abs_padded == pytest.approx(abs_plain, abs=1e-6)

    class Leaky(Padded):
        def forward(self, inputs):
            extra = inputs["visual"][:, width:].sum(1, keepdim=True) * 0.05  # small, zero-mean input
            return super().forward(inputs) + extra

    abs_leak, signed_leak = shares(Leaky(), padded)
    # measured: absolute visual share 0.50 -> 0.73; signed 0.432 -> 0.435
    assert abs_leak > abs_plain + 0.15
    assert signed_leak == pytest.approx(signed_plain, abs=0.05)


# ------------------------------------------------------------------------------------ rankings
def _prior(name: str, values: dict[str, float], ci: dict[str, list[float]] | None = None) -> Result:
    return Result(name=name, value=0.0, per_modality=values, ci=ci or {})


def test_rankings_side_by_side_and_disagreement_note() -> None:
    mass = np.array([[3.0, 1.0]] * 10 + [[2.0, 1.0]] * 10)
    ev = hand_evidence(mass)
    alone = ATTR(bootstrap=50).compute(ev).details["rankings"]
    assert alone["attribution"] == ["audio", "visual"] and alone["agree"] is True
    assert "no other ranking" in alone["note"]

    agree = ATTR(bootstrap=50).compute(ev, {"shapley": _prior("shapley", {"audio": 0.3, "visual": 0.1}),
                                            "reliance": _prior("reliance", {"audio": 0.2, "visual": 0.0})})
    r = agree.details["rankings"]
    assert r["agree"] is True and r["shapley"] == ["audio", "visual"] and r["compared"] == ["attribution", "shapley", "reliance"]
    assert r["values"]["reliance"] == {"audio": 0.2, "visual": 0.0}

    prior = {"shapley": _prior("shapley", {"audio": 0.1, "visual": 0.3},
                               {"audio": [0.05, 0.15], "visual": [0.25, 0.35]}),
             "reliance": _prior("reliance", {"audio": 0.2, "visual": 0.2})}  # a tie contradicts nothing
    r = ATTR(bootstrap=200).compute(ev, prior).details["rankings"]
    assert r["agree"] is False
    assert r["shapley"] == ["visual", "audio"] and r["reliance"] == ["audio", "visual"]
    assert r["note"].startswith("the methods disagree: modalities interact; read them side by side")
    assert len(r["disagreements"]) == 1
    d = r["disagreements"][0]
    assert d["methods"] == ["attribution", "shapley"] and d["first_says"] == ["audio", "visual"]
    assert d["both_separated"] is True  # attribution's intervals separate too (shares 0.71 vs 0.29)
    json.dumps(r)


# ------------------------------------------------------------------------------------ (b) edge cases
def test_constant_modality_has_zero_share_and_no_nan() -> None:
    """A modality equal to the (zero) masking baseline gets exactly zero IG attribution."""
    test = dict(toy_split(DOMINANT, 0)[1])
    test["visual"] = np.zeros_like(test["visual"])
    ev = collect(ModelAdapter(trained_toy(DOMINANT, 0), ("audio", "visual")), dataset_from_arrays(test),
                 {"attribution"}, CollectSettings(device="cpu", seed=0, max_attribution_samples=32, ig_steps=8))
    assert float(ev.attribution[:, 1].abs().max()) == 0.0
    res = ATTR(bootstrap=100).compute(ev)
    assert res.per_modality == {"audio": 1.0, "visual": 0.0}
    assert res.ci["visual"] == [0.0, 0.0]
    assert res.value == 1.0
    assert "NaN" not in json.dumps(res.to_dict())


def test_all_zero_attribution_is_an_evidence_error() -> None:
    with pytest.raises(EvidenceError, match="zero Integrated-Gradients"):
        ATTR().compute(hand_evidence(np.zeros((5, 2))))
    ev = hand_evidence(np.ones((5, 2)))
    ev.attribution = None
    with pytest.raises(EvidenceError, match="attribution"):
        ATTR().compute(ev)


def test_one_class_absent() -> None:
    ev = toy_evidence(DOMINANT, 0)
    sub = ev.select_rows(torch.nonzero(ev.labels != 0)[:, 0])
    assert 0 not in sub.labels.tolist() and 0 < sub.attribution.shape[0] < ev.attribution.shape[0]
    res = ATTR(bootstrap=100).compute(sub)
    check_against_reference(sub, res)


@pytest.mark.parametrize("strength", [(3.0, 0.8, 0.8), (3.0, 0.8, 0.8, 0.8, 0.8)])
def test_more_modalities_on_toy(strength: tuple[float, ...]) -> None:
    ev = toy_evidence(strength, 0, kinds=("attribution",))
    res = ATTR(bootstrap=100).compute(ev)
    check_against_reference(ev, res)
    assert list(res.per_modality) == names_for(len(strength))
    assert max(res.per_modality, key=res.per_modality.get) == "m0"  # the strong modality


# ------------------------------------------------------------------------------------ (c) direction
def test_direction_over_seeds() -> None:
    measured = {}
    for seed in (0, 1, 2):
        dom = ATTR(bootstrap=200).compute(toy_evidence(DOMINANT, seed)).per_modality
        bal = ATTR(bootstrap=200).compute(toy_evidence(BALANCED, seed)).per_modality
        measured[seed] = (dom["audio"], bal["audio"])
        assert dom["audio"] > 0.7 > dom["visual"]
        assert abs(bal["audio"] - bal["visual"]) < 0.15
    # measured audio shares (DOMINANT, BALANCED): seed 0 (0.82, 0.50), 1 (0.82, 0.52), 2 (0.81, 0.50)
    assert all(d > b for d, b in measured.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_signed_share_direction(seed: int) -> None:
    dom = ATTR(bootstrap=200, share="signed").compute(toy_evidence(DOMINANT, seed))
    bal = ATTR(bootstrap=200, share="signed").compute(toy_evidence(BALANCED, seed))
    assert dom.per_modality["audio"] > 0.7 and dom.ci["audio"][0] > 0.5
    assert abs(bal.per_modality["audio"] - 0.5) < 0.12


# ------------------------------------------------------------------------------------ (e) determinism
def test_deterministic_json_safe_and_evidence_untouched() -> None:
    ev = toy_evidence(DOMINANT, 1)
    before = ev.attribution.clone(), ev.attribution_delta.clone(), ev.attribution_rows.clone()
    prior = {"shapley": _prior("shapley", {"audio": 0.5, "visual": 0.1})}
    a = ATTR(bootstrap=300, seed=2).compute(ev, prior)
    b = ATTR(bootstrap=300, seed=2).compute(ev, prior)
    assert a.to_dict() == b.to_dict()
    assert torch.equal(before[0], ev.attribution) and torch.equal(before[1], ev.attribution_delta)
    assert torch.equal(before[2], ev.attribution_rows)
    assert "NaN" not in json.dumps(a.to_dict())
    assert ATTR.uses == ("shapley", "reliance") and ATTR.needs == frozenset({"attribution"})
    assert not math.isnan(a.value_ci[0])
