import itertools
import json
import math

import numpy as np
import pytest
import torch

from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.diagnostics.evidential import fuse, opinion
from mmdiag.errors import ConfigError
from mmdiag.evidence import mask_of
from tests.helpers.fake import fake_evidence
from tests.helpers.toys import BALANCED, DOMINANT, toy_evidence

Evidential = DIAGNOSTICS.get("evidential")


def ref_opinion(z, fn="softplus", clamp=10.0):
    """b, u of one sample's logits by plain Python."""
    if fn == "softplus":
        e = [math.log1p(math.exp(v)) for v in z]
    else:
        e = [math.exp(min(max(v, -clamp), clamp)) for v in z]
    s = sum(e) + len(e)
    return [v / s for v in e], len(e) / s


def ref_combine(b1, u1, b2, u2):
    k = len(b1)
    c = sum(b1[i] * b2[j] for i in range(k) for j in range(k) if i != j)
    b = [(b1[i] * b2[i] + b1[i] * u2 + b2[i] * u1) / (1 - c) for i in range(k)]
    return b, u1 * u2 / (1 - c), c


def ref_sample(zs, fn="softplus"):
    """Fused u and total conflict of one sample from its per-modality logits, folding left."""
    ops = [ref_opinion(z, fn) for z in zs]
    b, u = ops[0]
    kept = 1.0
    for b2, u2 in ops[1:]:
        b, u, c = ref_combine(b, u, b2, u2)
        kept *= 1 - c
    return u, 1 - kept, [o[1] for o in ops]


def brute_auroc(scores, pos):
    p = [s for s, f in zip(scores, pos) if f]
    n = [s for s, f in zip(scores, pos) if not f]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in p for b in n) / (len(p) * len(n))


@pytest.mark.parametrize("m_count,fn", [(2, "softplus"), (3, "softplus"), (3, "exp"), (5, "softplus")])
def test_matches_loop_reference(m_count, fn):
    ev = fake_evidence(m_count, n=30, c=3, seed=m_count)
    ev.subsets[mask_of([ev.modalities[0]], ev.modalities), 0] = torch.tensor([40.0, -30.0, 0.0])  # exp clamp
    res = Evidential(bootstrap=50, evidence_fn=fn).compute(ev)
    names = ev.modalities
    u_f, conf, drivers, u_m = [], [], [], {m: [] for m in names}
    for i in range(ev.n_samples):
        zs = [ev.subsets[mask_of([m], names), i].tolist() for m in names]
        u, c, us = ref_sample(zs, fn)
        u_f.append(u)
        conf.append(c)
        drivers.append(names[max(range(m_count), key=lambda j: (us[j], -j))])
        for m, v in zip(names, us):
            u_m[m].append(v)
    assert res.per_sample["u_fused"] == pytest.approx(u_f, rel=1e-9)
    assert res.per_sample["conflict"] == pytest.approx(conf, rel=1e-9, abs=1e-12)
    assert list(res.per_sample["driver"]) == drivers
    for m in names:
        assert res.per_modality[m] == pytest.approx(sum(u_m[m]) / len(u_m[m]), rel=1e-9)
        assert res.details["driver_share"][m] == pytest.approx(drivers.count(m) / len(drivers))
    assert res.value == pytest.approx(sum(u_f) / len(u_f), rel=1e-9)
    assert res.details["mean_conflict"] == pytest.approx(sum(conf) / len(conf), rel=1e-9)
    err = (ev.logits.argmax(1) != ev.labels).tolist()
    assert res.details["error_auroc"] == pytest.approx(brute_auroc(u_f, err), abs=1e-12)
    json.dumps(res.to_dict())


def test_fusion_is_order_free():
    rng = np.random.default_rng(0)
    ops = [opinion(rng.normal(size=(8, 4)) * 3) for _ in range(4)]
    _, u0, c0 = fuse([o[0] for o in ops], [o[1] for o in ops])
    for perm in itertools.permutations(range(4)):
        _, u, c = fuse([ops[j][0] for j in perm], [ops[j][1] for j in perm])
        assert np.allclose(u, u0, rtol=1e-10) and np.allclose(c, c0, rtol=1e-10, atol=1e-14)


def test_opinion_sums_to_one_and_bad_evidence_fn():
    b, u = opinion(np.array([[0.0, 0.0], [50.0, -50.0]]), "exp", 10.0)
    assert np.allclose(b.sum(1) + u, 1.0)
    assert u[0] == pytest.approx(2 / 4) and u[1] == pytest.approx(2 / (math.exp(10) + math.exp(-10) + 2))
    with pytest.raises(ConfigError):
        Evidential(evidence_fn="relu").compute(fake_evidence(2))


def test_constant_modality_and_absent_class():
    ev = fake_evidence(2, n=40, c=4, seed=3, absent_class=2)
    ev.subsets[mask_of(["visual"], ev.modalities)] = 0.0  # visual alone says nothing: u = K / (K + K log 2)
    res = Evidential(bootstrap=30).compute(ev)
    assert res.per_modality["visual"] == pytest.approx(4 / (4 + 4 * math.log(2)))
    assert len(res.per_sample["u_fused"]) == 40
    json.dumps(res.to_dict())


@pytest.mark.parametrize("strength", [(3.0, 0.8, 0.8), (3.0, 0.8, 0.8, 0.8, 0.8)])
def test_more_modalities(strength):
    ev = toy_evidence(strength, 0, kinds=("subsets",))
    res = Evidential(bootstrap=50).compute(ev)
    assert set(res.per_modality) == set(ev.modalities) == set(res.ci) == set(res.details["driver_share"])
    assert min(res.per_modality, key=res.per_modality.get) == "m0"
    assert sum(res.details["driver_share"].values()) == pytest.approx(1.0)
    assert set(res.per_sample) == {f"u_{m}" for m in ev.modalities} | {"u_fused", "conflict", "driver"}
    json.dumps(res.to_dict())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direction(seed):
    # measured (400 rows): DOMINANT U_audio 0.24-0.25 vs U_visual 0.47-0.56 and visual drives
    # 93-100% of samples; BALANCED |U_audio - U_visual| <= 0.04 with interval half-widths ~0.02.
    dom = Evidential(bootstrap=200).compute(toy_evidence(DOMINANT, seed, kinds=("subsets",)))
    assert dom.per_modality["audio"] < dom.per_modality["visual"] - 0.1
    assert dom.ci["audio"][1] < dom.ci["visual"][0]
    assert dom.details["driver_share"]["visual"] > 0.8
    bal = Evidential(bootstrap=200).compute(toy_evidence(BALANCED, seed, kinds=("subsets",)))
    assert abs(bal.per_modality["audio"] - bal.per_modality["visual"]) < 0.07


def test_deterministic_json_and_not_mutated():
    ev = toy_evidence(DOMINANT, 0, kinds=("subsets",))
    before = ev.subsets.clone()
    a = Evidential(bootstrap=100, seed=1).compute(ev)
    b = Evidential(bootstrap=100, seed=1).compute(ev)
    assert a.to_dict() == b.to_dict() and a.per_sample.keys() == b.per_sample.keys()
    assert all(np.array_equal(a.per_sample[k], b.per_sample[k]) for k in a.per_sample)
    assert torch.equal(before, ev.subsets)
    json.dumps(a.to_dict())
    assert "per_sample" not in a.to_dict()
