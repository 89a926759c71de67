"""mdi: Modality Dominance Index (mmdiag's proposed definition, methods.md §17.1)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmdiag.diagnostics.mdi import MDI
from mmdiag.errors import ConfigError, EvidenceError
from mmdiag.evidence import Evidence
from mmdiag.stats import bootstrap_indices
from tests.helpers.toys import BALANCED, DOMINANT, toy_evidence

KINDS = ("features", "grad_x_act")


# ---------------------------------------------------------------------------- slow reference
def ref_entropy(rows: list[list[float]]) -> float:
    """Spectral entropy via an SVD of the explicitly centred matrix (loops for the centring)."""
    n, d = len(rows), len(rows[0])
    if min(n, d) < 2:
        return 0.0
    mean = [sum(r[j] for r in rows) / n for j in range(d)]
    centred = np.array([[r[j] - mean[j] for j in range(d)] for r in rows])
    sv = np.linalg.svd(centred, compute_uv=False)
    lam = [s * s for s in sv]
    total = sum(lam)
    if total <= 0:
        return 0.0
    h = 0.0
    for v in lam:
        q = v / total
        if q > 0:
            h -= q * math.log(q)
    return h / math.log(min(n, d))


def _share(values: list[float]) -> list[float]:
    total = sum(values)
    return [v / total for v in values] if total > 0 else [1.0 / len(values)] * len(values)


def reference(ev: Evidence, lam: float = 0.5, grad_rows=None, feat_rows=None) -> dict:
    mods = ev.modalities
    gxa = ev.grad_x_act.tolist()
    grad_rows = range(len(gxa)) if grad_rows is None else grad_rows
    h = []
    for m in mods:
        f = ev.features[m].tolist()
        h.append(ref_entropy(f if feat_rows is None else [f[i] for i in feat_rows]))
    g = []
    for j in range(len(mods)):
        total = 0.0
        for i in grad_rows:
            total += gxa[i][j]
        g.append(total / len(grad_rows))
    gs, hs = _share(g), _share(h)
    raw = [gs[j] ** lam * hs[j] ** (1 - lam) for j in range(len(mods))]
    mdi = _share(raw)
    fl = [max(x, 1e-6) for x in mdi]
    head = math.log(fl[0] / fl[1]) if len(mods) == 2 else math.log(max(fl) / min(fl))
    return {"H": h, "G": g, "Gs": gs, "Hs": hs, "mdi": mdi, "head": head}


def check_against_reference(ev: Evidence, diag: MDI | None = None) -> None:
    diag = diag or MDI(bootstrap=0)
    res = diag.compute(ev)
    ref = reference(ev, diag.lam)
    mods = ev.modalities
    np.testing.assert_allclose([res.details["entropy"][m] for m in mods], ref["H"], atol=1e-9)
    np.testing.assert_allclose([res.details["gradient"][m] for m in mods], ref["G"], rtol=1e-6)
    np.testing.assert_allclose([res.details["gradient_share"][m] for m in mods], ref["Gs"], atol=1e-9)
    np.testing.assert_allclose([res.per_modality[m] for m in mods], ref["mdi"], atol=1e-9)
    assert res.value == pytest.approx(ref["head"], abs=1e-8)
    assert res.details["dominance_flag"] == (abs(ref["head"]) > math.log(diag.threshold))


def tiny_evidence() -> Evidence:
    # audio: rows +-e1, +-e2 in R^4 -> two equal eigenvalues -> H = log 2 / log 4 = 0.5
    # visual: rows e1..e4 -> centred I - J/4 has eigenvalues 1, 1, 1, 0 -> H = log 3 / log 4
    eye = torch.eye(4)
    audio = torch.stack([eye[0], -eye[0], eye[1], -eye[1]]) * 3.0
    visual = eye.clone()
    gxa = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.5, 3.5], [0.5, 3.5]])  # G = (1, 3)
    return Evidence(
        modalities=("audio", "visual"), n_classes=2, labels=torch.tensor([0, 1, 0, 1]),
        logits=torch.zeros(4, 2), index=torch.arange(4),
        features={"audio": audio, "visual": visual}, feature_rows=torch.arange(4),
        grad_x_act=gxa, grad_rows=torch.arange(4),
    )


# ---------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_on_toy(seed):
    check_against_reference(toy_evidence(DOMINANT, seed, kinds=KINDS))
    check_against_reference(toy_evidence(DOMINANT, seed, kinds=KINDS), MDI(bootstrap=0, lam=0.8, threshold=1.1))


def test_hand_built_evidence_has_closed_form():
    ev = tiny_evidence()
    check_against_reference(ev)
    res = MDI(bootstrap=0).compute(ev)
    h_a, h_v = 0.5, math.log(3) / math.log(4)
    assert res.details["entropy"]["audio"] == pytest.approx(h_a)
    assert res.details["entropy"]["visual"] == pytest.approx(h_v)
    assert res.details["gradient_share"] == pytest.approx({"audio": 0.25, "visual": 0.75})
    raw = [math.sqrt(0.25 * h_a / (h_a + h_v)), math.sqrt(0.75 * h_v / (h_a + h_v))]
    assert res.per_modality["audio"] == pytest.approx(raw[0] / sum(raw))
    assert res.value == pytest.approx(math.log(raw[0] / raw[1]))
    assert res.value < -math.log(1.5)  # visual dominates: flagged, sign says "second modality"
    assert res.details["dominance_flag"] and res.details["dominant"] == "visual"
    # lam = 1: gradient share alone; lam = 0: entropy share alone
    assert MDI(bootstrap=0, lam=1.0).compute(ev).per_modality["audio"] == pytest.approx(0.25)
    assert MDI(bootstrap=0, lam=0.0).compute(ev).per_modality["audio"] == pytest.approx(h_a / (h_a + h_v))


def test_bootstrap_interval_matches_slow_resampling():
    ev = toy_evidence(DOMINANT, 0, kinds=KINDS)
    n_boot, n_ent, seed = 12, 5, 4
    res = MDI(bootstrap=n_boot, entropy_interval="exact", entropy_bootstrap=n_ent, seed=seed, level=0.8).compute(ev)
    g_rows = [row for idx in bootstrap_indices(ev.grad_x_act.shape[0], n_boot, seed + 1) for row in idx]
    h_rows = [row for idx in bootstrap_indices(ev.feature_rows.shape[0], n_ent, seed) for row in idx]
    draws, heads = [], []
    for b in range(n_boot):
        g = reference(ev, grad_rows=[int(i) for i in g_rows[b]])["Gs"]
        hs = reference(ev, feat_rows=[int(i) for i in h_rows[b % n_ent]])["Hs"]
        raw = [math.sqrt(g[j] * hs[j]) for j in range(2)]
        mdi = [x / sum(raw) for x in raw]
        draws.append(mdi)
        heads.append(math.log(mdi[0] / mdi[1]))
    draws = np.asarray(draws)
    for j, m in enumerate(ev.modalities):
        assert res.ci[m] == pytest.approx(list(np.quantile(draws[:, j], [0.1, 0.9])), abs=1e-8)
    assert res.value_ci == pytest.approx(list(np.quantile(heads, [0.1, 0.9])), abs=1e-7)
    assert res.details["entropy_resamples"] == n_ent
    assert res.details["entropy_interval"] == "exact"


def weighted_entropy(x: np.ndarray, w: np.ndarray) -> float:
    """Spectral entropy of the rows of x weighted by w: the weighted mean, then the singular values
    of the weighted, centred rows (no re-centring)."""
    mu = (w[:, None] * x).sum(0) / w.sum()
    sv = np.linalg.svd((x - mu) * np.sqrt(w)[:, None], compute_uv=False)
    q = sv[sv > 0] ** 2 / (sv ** 2).sum()
    return float(-(q * np.log(q)).sum() / math.log(min(x.shape)))


@pytest.mark.parametrize("n,d", [(300, 8), (12, 20)])
def test_entropy_influence_is_the_derivative_of_a_row_weight(n, d):
    from mmdiag.diagnostics.mdi import entropy_influence

    rng = np.random.default_rng(n)
    x = np.maximum(rng.normal(size=(n, d)) * np.linspace(0.3, 2.0, d) + rng.normal(size=(n, 1)), 0.0)
    h, ell = entropy_influence(x)
    assert h == pytest.approx(ref_entropy(x.tolist()), abs=1e-10)
    assert h == pytest.approx(weighted_entropy(x, np.ones(n)), abs=1e-10)
    assert ell.sum() == pytest.approx(0.0, abs=1e-12)
    eps = 1e-5
    for i in (0, 5, n - 1):
        up, down = np.ones(n), np.ones(n)
        up[i] += eps
        down[i] -= eps
        fd = (weighted_entropy(x, up) - weighted_entropy(x, down)) / (2 * eps)
        assert ell[i] == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_linear_entropy_interval_uses_every_resample_and_tracks_the_exact_bootstrap():
    ev = toy_evidence(DOMINANT, 0, kinds=KINDS)
    n_boot, seed = 400, 3
    lin = MDI(bootstrap=n_boot, seed=seed, lam=0.0).compute(ev)  # lam = 0: the index is the entropy share
    assert lin.details["entropy_interval"] == "linear" and lin.details["entropy_resamples"] == n_boot
    # the first-order draws by hand: H + sum_i (c_i - 1) l_i from the resample counts
    from mmdiag.diagnostics.mdi import entropy_influence

    feats = {m: ev.features[m].double().numpy() for m in ev.modalities}
    n = ev.feature_rows.shape[0]
    hand = []
    for idx in bootstrap_indices(n, n_boot, seed):
        for row in idx:
            c = np.bincount(row, minlength=n)
            hs = [min(max(h + ((c - 1) * ell).sum(), 0.0), 1.0) for h, ell in map(entropy_influence, feats.values())]
            hand.append(hs[0] / sum(hs))
    assert lin.ci["audio"] == pytest.approx(list(np.quantile(hand, [0.025, 0.975])), abs=1e-9)
    # and the interval is close to that of recomputing every resample's entropy
    exact = MDI(bootstrap=n_boot, seed=seed, lam=0.0, entropy_interval="exact", entropy_bootstrap=n_boot).compute(ev)
    width = exact.ci["audio"][1] - exact.ci["audio"][0]
    assert width > 0
    assert lin.ci["audio"] == pytest.approx(exact.ci["audio"], abs=0.25 * width)
    held = MDI(bootstrap=n_boot, seed=seed, lam=0.0, entropy_interval="none").compute(ev)
    assert held.ci["audio"][0] == held.ci["audio"][1] == pytest.approx(held.per_modality["audio"])
    assert held.details["entropy_resamples"] == 0


def test_without_bootstrap_no_intervals():
    res = MDI(bootstrap=0).compute(tiny_evidence())
    assert res.ci == {} and res.value_ci is None


# ---------------------------------------------------------------------------- edge cases
def test_class_absent_from_labels():
    ev = toy_evidence(DOMINANT, 0, kinds=KINDS)
    ev = ev.select_rows(torch.nonzero(ev.labels != 3)[:, 0])
    assert 3 not in set(ev.labels.tolist())
    assert ev.features["audio"].shape[0] == ev.n_samples
    check_against_reference(ev)


def test_constant_modality():
    ev = toy_evidence(DOMINANT, 0, kinds=KINDS)
    feats = {m: f.clone() for m, f in ev.features.items()}
    feats["visual"] = torch.zeros_like(feats["visual"])  # all-zero features: |<g, h>| = 0 too
    gxa = ev.grad_x_act.clone()
    gxa[:, 1] = 0.0
    dead = Evidence(modalities=ev.modalities, n_classes=ev.n_classes, labels=ev.labels, logits=ev.logits,
                    index=ev.index, features=feats, feature_rows=ev.feature_rows, grad_x_act=gxa,
                    grad_rows=ev.grad_rows)
    res = MDI(bootstrap=50, entropy_bootstrap=10).compute(dead)
    check_against_reference(dead)
    assert res.details["entropy"]["visual"] == 0.0
    assert res.per_modality == {"audio": 1.0, "visual": 0.0}
    assert res.value == pytest.approx(math.log(1e6))  # floored, finite
    assert res.details["dominance_flag"] and res.details["dominant"] == "audio"
    json.dumps(res.to_dict())
    # every modality constant: shares fall back to uniform, nothing is flagged
    both = Evidence(modalities=ev.modalities, n_classes=ev.n_classes, labels=ev.labels, logits=ev.logits,
                    index=ev.index, features={m: torch.ones_like(f) for m, f in feats.items()},
                    feature_rows=ev.feature_rows, grad_x_act=torch.zeros_like(gxa), grad_rows=ev.grad_rows)
    res = MDI(bootstrap=20, entropy_bootstrap=5).compute(both)
    assert res.per_modality == {"audio": 0.5, "visual": 0.5}
    assert res.value == 0.0 and not res.details["dominance_flag"]


@pytest.mark.parametrize("strength", [(3.0, 0.8, 0.8), (3.0, 0.8, 0.8, 0.8, 0.8)])
def test_more_modalities(strength):
    ev = toy_evidence(strength, 0, kinds=KINDS)
    check_against_reference(ev)
    res = MDI(bootstrap=50, entropy_bootstrap=10).compute(ev)
    assert res.details["headline"] == "log(max MDI / min MDI)"
    assert res.value >= 0.0
    assert sum(res.per_modality.values()) == pytest.approx(1.0)
    assert set(res.ci) == set(ev.modalities)


def test_param_grad_shares_when_present():
    ev = tiny_evidence()
    ev.param_grad_norm = torch.tensor([3.0, 1.0])
    res = MDI(bootstrap=0).compute(ev)
    assert res.details["param_grad_share"] == pytest.approx({"audio": 0.75, "visual": 0.25})
    assert "param_grad_share" not in MDI(bootstrap=0).compute(tiny_evidence()).details


# ---------------------------------------------------------------------------- direction
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direction_on_dominance_knob(seed):
    # measured (seeds 0, 1, 2), default target "margin": DOMINANT headline +0.63, +0.89, +0.91, all
    # flagged (gradient share of audio 0.84, 0.88, 0.87 outweighs the entropy share 0.39-0.49);
    # BALANCED headline -0.17, -0.13, -0.09, none flagged.
    dom = MDI(bootstrap=200).compute(toy_evidence(DOMINANT, seed, kinds=KINDS))
    assert dom.details["dominance_flag"] and dom.details["dominant"] == "audio"
    assert dom.value_ci[0] > 0.0  # the interval excludes balance
    assert dom.details["gradient_share"]["audio"] > 0.75
    bal = MDI(bootstrap=200).compute(toy_evidence(BALANCED, seed, kinds=KINDS))
    assert not bal.details["dominance_flag"]
    assert abs(bal.value) < math.log(1.5)
    assert 0.4 < bal.details["gradient_share"]["audio"] < 0.6


@pytest.mark.parametrize("strength", [(3.0, 0.8, 0.8), (3.0, 0.8, 0.8, 0.8, 0.8)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direction_names_the_carrier_beyond_two_modalities(strength, seed):
    # measured: the carrier m0 has the largest MDI in every case (gradient share 0.73-0.79 at M = 3,
    # 0.54-0.66 at M = 5), all flagged; target "loss" ranks another modality first in 3 of the 6
    res = MDI(bootstrap=0).compute(toy_evidence(strength, seed, kinds=KINDS))
    assert res.details["dominant"] == "m0"
    shares = res.details["gradient_share"]
    assert shares["m0"] == max(shares.values()) and shares["m0"] > 0.5


def test_loss_target_reads_the_cross_entropy_column():
    ev = toy_evidence(DOMINANT, 0, kinds=KINDS)
    res = MDI(bootstrap=0, target="loss").compute(ev)
    expected = ev.grad_x_loss.double().mean(0)
    assert [res.details["gradient"][m] for m in ev.modalities] == pytest.approx(expected.tolist())
    assert res.details["target"] == "loss"
    swapped = Evidence(**{**ev.to_dict(), "grad_x_act": ev.grad_x_loss, "modalities": ev.modalities})
    assert MDI(bootstrap=0).compute(swapped).per_modality == pytest.approx(res.per_modality)
    ev_old = Evidence(**{**ev.to_dict(), "grad_x_loss": None, "modalities": ev.modalities})
    with pytest.raises(EvidenceError, match="loss"):
        MDI(target="loss").compute(ev_old)


# ---------------------------------------------------------------------------- contract
def test_deterministic_json_safe_and_does_not_mutate():
    ev = toy_evidence(DOMINANT, 1, kinds=KINDS)
    before = ({m: f.clone() for m, f in ev.features.items()}, ev.grad_x_act.clone())
    a = MDI(bootstrap=100, entropy_bootstrap=20).compute(ev)
    b = MDI(bootstrap=100, entropy_bootstrap=20).compute(ev)
    assert a == b
    assert json.loads(json.dumps(a.to_dict()))["name"] == "mdi"
    assert all(torch.equal(ev.features[m], before[0][m]) for m in ev.modalities)
    assert torch.equal(ev.grad_x_act, before[1])
    for lo, hi in a.ci.values():
        assert 0.0 <= lo <= hi <= 1.0


def test_rejects_bad_parameters_and_evidence():
    with pytest.raises(ConfigError):
        MDI(lam=-0.1)
    with pytest.raises(ConfigError):
        MDI(threshold=0.5)
    with pytest.raises(ConfigError):
        MDI(entropy_bootstrap=-1)
    with pytest.raises(ConfigError, match="linear"):
        MDI(entropy_interval="delta")
    with pytest.raises(ConfigError, match="margin"):
        MDI(target="logits")
    ev = tiny_evidence()
    ev.features = None
    with pytest.raises(EvidenceError):
        MDI().compute(ev)
