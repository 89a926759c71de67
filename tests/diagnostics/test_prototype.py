import json
import math

import numpy as np
import pytest
import torch

from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.diagnostics._probes import auroc, stratified_split
from mmdiag.evidence import Evidence
from mmdiag.stats import bootstrap_rows
from tests.helpers.toys import BALANCED, DOMINANT, toy_evidence

Prototype = DIAGNOSTICS.get("prototype")


def tiny(features: dict, labels, n_classes: int, **kw) -> Evidence:
    labels = torch.as_tensor(labels)
    n = labels.shape[0]
    return Evidence(modalities=tuple(features), n_classes=n_classes, labels=labels,
                    logits=torch.zeros(n, n_classes), index=torch.arange(n),
                    features={m: torch.as_tensor(f, dtype=torch.float64) for m, f in features.items()},
                    feature_rows=torch.arange(n), **kw)


def ref_scores(x_build, y_build, x_eval, y_eval, n_classes):
    """Prototypes, q and nearest-prototype distance by plain loops."""
    protos = {}
    for k in range(n_classes):
        rows = [i for i in range(len(y_build)) if y_build[i] == k]
        if rows:
            protos[k] = [sum(x_build[i][j] for i in rows) / len(rows) for j in range(len(x_build[0]))]
    q, near = [], []
    for i in range(len(y_eval)):
        d = {k: math.sqrt(sum((x_eval[i][j] - c[j]) ** 2 for j in range(len(c)))) for k, c in protos.items()}
        den = sum(math.exp(-v) for v in d.values())
        q.append(math.exp(-d[int(y_eval[i])]) / den if int(y_eval[i]) in d else 0.0)
        near.append(min(d.values()))
    return q, near


def brute_auroc(scores, pos):
    p = [s for s, f in zip(scores, pos) if f]
    n = [s for s, f in zip(scores, pos) if not f]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in p for b in n)
    return wins / (len(p) * len(n))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auroc_matches_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    pos = rng.random(40) < 0.3
    assert auroc(scores, pos) == pytest.approx(brute_auroc(scores, pos), abs=1e-12)
    assert math.isnan(auroc(scores, np.zeros(40, bool)))


def test_split_path_matches_loops():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=30)
    xa, xb = rng.normal(size=(30, 4)) + y[:, None], rng.normal(size=(30, 2))
    res = Prototype(bootstrap=50).compute(tiny({"a": xa, "b": xb}, y, 3))
    build, evaluate = stratified_split(y, 0.5, 0)
    sums = {}
    for m, x in (("a", xa), ("b", xb)):
        q, near = ref_scores(x[build].tolist(), y[build], x[evaluate].tolist(), y[evaluate], 3)
        assert res.per_modality[m] == pytest.approx(sum(q) / len(q), abs=1e-12)
        assert res.details["mean_distance"][m] == pytest.approx(sum(near) / len(near), abs=1e-12)
        sums[m] = sum(q)
    for m in sums:
        assert res.details["ratio"][m] == pytest.approx(sums[m] / min(sums.values()))
    assert res.value == pytest.approx(max(sums.values()) / min(sums.values()))
    assert res.details["ood"] == "no ood flags" and res.details["build_source"] == "split"
    # intervals: the percentile interval over resamples of the evaluated rows, drawn one at a time
    q = np.stack([ref_scores(x[build].tolist(), y[build], x[evaluate].tolist(), y[evaluate], 3)[0]
                  for x in (xa, xb)], axis=1)
    means, ratios = [], []
    for row in bootstrap_rows(len(q), 50, 0):
        sums_b = q[row].sum(axis=0)
        means.append(sums_b / len(row))
        ratios.append(sums_b.max() / sums_b.min())
    for j, m in enumerate(("a", "b")):
        assert res.ci[m] == pytest.approx(list(np.quantile(np.array(means)[:, j], [0.025, 0.975])), abs=1e-12)
    assert res.value_ci == pytest.approx(list(np.quantile(ratios, [0.025, 0.975])), rel=1e-9)


def test_probe_data_builds_and_missing_class_prototype_is_skipped():
    rng = np.random.default_rng(1)
    y_eval = rng.integers(0, 3, size=20)
    y_build = rng.integers(0, 2, size=25)  # class 2 has no prototype
    x_eval, x_build = rng.normal(size=(20, 3)), rng.normal(size=(25, 3))
    ev = tiny({"a": x_eval, "b": x_eval * 2}, y_eval, 3,
              probe_features={"a": torch.tensor(x_build), "b": torch.tensor(x_build * 2)},
              probe_labels=torch.tensor(y_build))
    res = Prototype(bootstrap=20).compute(ev)
    assert res.details["classes_with_prototype"] == [0, 1] and res.details["build_source"] == "probe_data"
    q, _ = ref_scores(x_build.tolist(), y_build, x_eval.tolist(), y_eval, 3)
    assert res.per_modality["a"] == pytest.approx(sum(q) / len(q), abs=1e-12)
    json.dumps(res.to_dict())


def test_ood_auroc_and_in_distribution_prototypes():
    rng = np.random.default_rng(2)
    n = 60
    y = rng.integers(0, 2, size=n)
    ood = np.zeros(n, bool)
    ood[::5] = True
    xa = rng.normal(size=(n, 3)) + 3 * y[:, None]
    xa[ood] += 25.0  # far from every prototype in modality a only
    xb = rng.normal(size=(n, 3)) + 3 * y[:, None]
    res = Prototype(bootstrap=20).compute(tiny({"a": xa, "b": xb}, y, 2, ood=torch.tensor(ood)))
    assert res.details["ood_auroc"]["a"] == 1.0
    assert 0.2 < res.details["ood_auroc"]["b"] < 0.8
    # reference: prototypes from in-distribution build rows, AUROC over all evaluated rows
    idd = np.flatnonzero(~ood)
    tr, te = stratified_split(y[idd], 0.5, 0)
    build, evaluate = idd[tr], np.sort(np.concatenate([idd[te], np.flatnonzero(ood)]))
    for m, x in (("a", xa), ("b", xb)):
        q, near = ref_scores(x[build].tolist(), y[build], x[evaluate].tolist(), y[evaluate], 2)
        assert res.details["ood_auroc"][m] == pytest.approx(brute_auroc(near, ood[evaluate]), abs=1e-12)
        q_id = [v for v, f in zip(q, ood[evaluate]) if not f]
        assert res.per_modality[m] == pytest.approx(sum(q_id) / len(q_id), abs=1e-12)
    assert res.details["n_ood"] == int(ood.sum())


def test_constant_modality_and_absent_class():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, size=40)  # class 3 of 4 never occurs
    res = Prototype(bootstrap=20).compute(tiny({"a": rng.normal(size=(40, 2)), "b": np.ones((40, 5))}, y, 4))
    assert res.details["classes_with_prototype"] == [0, 1, 2]
    assert res.per_modality["b"] == pytest.approx(1 / 3)  # all prototypes coincide: uniform over 3
    json.dumps(res.to_dict())


@pytest.mark.parametrize("strength", [(3.0, 0.8, 0.8), (3.0, 0.8, 0.8, 0.8, 0.8)])
def test_more_modalities(strength):
    ev = toy_evidence(strength, 0, kinds=("features",))
    res = Prototype(bootstrap=50).compute(ev)
    assert set(res.per_modality) == set(ev.modalities) == set(res.details["ratio"])
    assert max(res.per_modality, key=res.per_modality.get) == "m0"
    assert min(res.details["ratio"].values()) == pytest.approx(1.0)
    json.dumps(res.to_dict())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direction(seed):
    # measured (200 evaluated rows): DOMINANT Q_audio ~1.00 vs Q_visual 0.45-0.48 (ratio 2.1-2.2);
    # BALANCED |Q_audio - Q_visual| <= 0.03 (ratio <= 1.03). The bootstrap interval of each Q is
    # about +-0.03 wide at 200 rows, so 0.08 allows the BALANCED gap and its noise.
    dom = Prototype(bootstrap=200).compute(toy_evidence(DOMINANT, seed, kinds=("features",)))
    assert dom.per_modality["audio"] > dom.per_modality["visual"] + 0.3
    assert dom.ci["audio"][0] > dom.ci["visual"][1]
    assert dom.value > 1.5
    bal = Prototype(bootstrap=200).compute(toy_evidence(BALANCED, seed, kinds=("features",)))
    assert abs(bal.per_modality["audio"] - bal.per_modality["visual"]) < 0.08
    assert bal.value < 1.15


def test_deterministic_json_and_not_mutated():
    ev = toy_evidence(DOMINANT, 0, kinds=("features",))
    before = {m: f.clone() for m, f in ev.features.items()}
    a = Prototype(bootstrap=100, seed=2).compute(ev)
    b = Prototype(bootstrap=100, seed=2).compute(ev)
    assert a.to_dict() == b.to_dict()
    assert all(torch.equal(before[m], ev.features[m]) for m in before)
    json.dumps(a.to_dict())
