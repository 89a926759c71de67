import json

import numpy as np
import pytest
import torch

from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.diagnostics._probes import Standardiser, fit_logistic, stratified_split
from mmdiag.evidence import Evidence
from tests.helpers.toys import BALANCED, DOMINANT, toy_evidence

Probe = DIAGNOSTICS.get("probe")


def tiny(features: dict, labels, n_classes: int, **kw) -> Evidence:
    labels = torch.as_tensor(labels)
    n = labels.shape[0]
    return Evidence(modalities=tuple(features), n_classes=n_classes, labels=labels,
                    logits=torch.zeros(n, n_classes), index=torch.arange(n),
                    features={m: torch.as_tensor(f, dtype=torch.float32) for m, f in features.items()},
                    feature_rows=torch.arange(n), **kw)


def majority_accuracy(train_y, test_y, n_classes):
    counts = [0] * n_classes
    for y in train_y:
        counts[int(y)] += 1
    top = max(range(n_classes), key=lambda k: (counts[k], -k))
    return sum(int(y) == top for y in test_y) / len(test_y)


def test_separable_gives_one_and_constant_gives_majority():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [30, 12, 18])
    sep = np.eye(3)[y] * 5 + rng.normal(scale=0.1, size=(60, 3))
    const = np.full((60, 4), 2.5)
    ev = tiny({"a": sep, "b": const}, y, 3)
    res = Probe(bootstrap=50).compute(ev)
    assert res.per_modality["a"] == 1.0 and res.details["train_accuracy"]["a"] == 1.0
    train, test = stratified_split(y, 0.3, 0)
    assert res.details["n_train"] == len(train) and res.details["n_test"] == len(test) == 18
    maj = majority_accuracy(y[train], y[test], 3)
    assert res.per_modality["b"] == pytest.approx(maj) and res.details["majority"] == pytest.approx(maj)
    assert res.value == pytest.approx(1.0 - maj)
    assert res.details["split"] == {"a": "split", "b": "split"}


def test_stratified_split_by_loops():
    y = np.array([0] * 10 + [1] * 7 + [2] * 1 + [3] * 2)
    train, test = stratified_split(y, 0.3, 5)
    assert sorted(list(train) + list(test)) == list(range(len(y)))
    for k, n_k in [(0, 10), (1, 7), (2, 1), (3, 2)]:
        in_test = sum(1 for i in test if y[i] == k)
        expected = 0 if n_k < 2 else min(max(round(n_k * 0.3), 1), n_k - 1)
        assert in_test == expected


def test_logistic_fit_is_the_penalised_optimum():
    # strictly convex objective: check the stationarity condition with a plain numpy gradient
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 5))
    y = rng.integers(0, 3, size=80)
    xs = Standardiser.fit(x)(x)
    lam = 1e-2
    w, b = fit_logistic(xs, y, 3, lam)
    z = xs @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.zeros_like(p)
    for i, k in enumerate(y):
        onehot[i, k] = 1.0
    grad_w = xs.T @ (p - onehot) / len(y) + 2 * lam * w
    grad_b = (p - onehot).mean(0)
    assert np.abs(grad_w).max() < 1e-6 and np.abs(grad_b).max() < 1e-6


def test_probe_data_is_used_for_training():
    rng = np.random.default_rng(2)
    y_test = rng.integers(0, 2, size=30)
    y_train = rng.integers(0, 2, size=50)
    f = lambda yy: np.stack([yy * 4.0 - 2.0, rng.normal(size=len(yy))], 1)
    ev = tiny({"a": f(y_test), "b": rng.normal(size=(30, 3))}, y_test, 2,
              probe_features={"a": torch.tensor(f(y_train)), "b": torch.tensor(rng.normal(size=(50, 3)))},
              probe_labels=torch.tensor(y_train))
    res = Probe(bootstrap=20).compute(ev)
    assert res.details["split"] == {"a": "probe_data", "b": "probe_data"}
    assert res.details["n_train"] == 50 and res.details["n_test"] == 30
    assert res.per_modality["a"] == 1.0


def test_absent_class():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=40)  # class 2 of 3 never occurs
    ev = tiny({"a": np.eye(3)[y] * 3 + rng.normal(scale=0.2, size=(40, 3)), "b": rng.normal(size=(40, 2))}, y, 3)
    res = Probe(bootstrap=20).compute(ev)
    assert res.per_modality["a"] == 1.0
    assert 0.0 <= res.per_modality["b"] <= 1.0
    json.dumps(res.to_dict())


@pytest.mark.parametrize("strength", [(3.0, 0.8, 0.8), (3.0, 0.8, 0.8, 0.8, 0.8)])
def test_more_modalities(strength):
    ev = toy_evidence(strength, 0, kinds=("features",))
    res = Probe(bootstrap=50).compute(ev)
    assert set(res.per_modality) == set(ev.modalities) == set(res.ci)
    assert max(res.per_modality, key=res.per_modality.get) == "m0"
    json.dumps(res.to_dict())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direction(seed):
    # measured held-out accuracy (120 rows): DOMINANT audio 0.99-1.00 vs visual 0.62-0.70;
    # BALANCED |audio - visual| <= 0.09. The SE of an accuracy difference at 120 rows and ~0.9
    # accuracy is ~0.04, so 0.15 leaves ~4 SE.
    dom = Probe(bootstrap=200).compute(toy_evidence(DOMINANT, seed, kinds=("features",)))
    assert dom.per_modality["audio"] > dom.per_modality["visual"] + 0.2
    assert dom.ci["audio"][0] > dom.ci["visual"][1]
    bal = Probe(bootstrap=200).compute(toy_evidence(BALANCED, seed, kinds=("features",)))
    assert abs(bal.per_modality["audio"] - bal.per_modality["visual"]) < 0.15


def test_deterministic_json_and_not_mutated():
    ev = toy_evidence(DOMINANT, 0, kinds=("features",))
    before = {m: f.clone() for m, f in ev.features.items()}
    a = Probe(bootstrap=100, seed=3).compute(ev)
    b = Probe(bootstrap=100, seed=3).compute(ev)
    assert a.to_dict() == b.to_dict()
    assert all(torch.equal(before[m], ev.features[m]) for m in before)
    json.dumps(a.to_dict())
    assert a.per_modality["audio"] >= a.ci["audio"][0] - 1e-12


def test_hessian_vector_product_matches_autograd():
    """The written-out loss, gradient and Hessian-vector product of the penalised cross-entropy
    equal autograd's (the Hessian built column by column) at the latest loss_grad point."""
    import torch

    from mmdiag.diagnostics._probes import LogisticObjective

    rng = np.random.default_rng(3)
    n, d, c, lam = 50, 4, 3, 1e-2
    x = torch.as_tensor(rng.normal(size=(n, d)))
    y = rng.integers(0, c, size=n)
    onehot = torch.zeros(n, c, dtype=torch.float64)
    onehot[torch.arange(n), torch.as_tensor(y)] = 1.0
    theta = torch.as_tensor(rng.normal(size=d * c + c))

    def f(t):
        w, b = t[:d * c].view(d, c), t[d * c:]
        z = x @ w + b
        return (torch.logsumexp(z, 1) - (z * onehot).sum(1)).mean() + lam * (w * w).sum()

    objective = LogisticObjective(x, onehot, lam)
    for point in (theta, theta + 0.5):  # the second point: the softmax is recomputed
        hess = torch.autograd.functional.hessian(f, point).numpy()
        grad = torch.autograd.functional.jacobian(f, point).numpy()
        loss, g = objective.loss_grad(point)
        assert np.isclose(loss, float(f(point)), rtol=1e-12)
        np.testing.assert_allclose(g.numpy(), grad, rtol=1e-10, atol=1e-12)
        for _ in range(3):  # the later calls reuse the softmax at the point
            v = torch.as_tensor(rng.normal(size=theta.shape[0]))
            np.testing.assert_allclose(objective.hessp(v).numpy(), hess @ v.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_newton_fit_reaches_scipys_optimum(seed):
    """fit_logistic's Newton-CG and an independent SciPy BFGS fit of the same objective (written
    with autograd) reach the same weights, and the Newton fit's gradient is below its tolerance."""
    import torch
    from scipy.optimize import minimize

    from mmdiag.diagnostics._probes import GTOL, LogisticObjective, fit_logistic

    rng = np.random.default_rng(seed)
    n, d, c, lam = 400, 12, 5, 1e-3
    y = rng.integers(0, c, size=n)
    x = rng.normal(size=(n, d)) + rng.normal(size=(c, d))[y]  # separable-ish classes
    w, b = fit_logistic(x, y, c, lam)
    xt = torch.as_tensor(x)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(y), c).double()

    def f(t_np):
        t = torch.as_tensor(t_np).requires_grad_(True)
        z = xt @ t[:d * c].view(d, c) + t[d * c:]
        loss = (torch.logsumexp(z, 1) - (z * onehot).sum(1)).mean() + lam * (t[:d * c] ** 2).sum()
        loss.backward()
        return float(loss.detach()), t.grad.numpy().copy()

    ref = minimize(f, np.zeros(d * c + c), jac=True, method="BFGS", options={"gtol": 1e-10, "maxiter": 2000})
    # the class biases are defined up to a common shift: compare them centred
    np.testing.assert_allclose(w, ref.x[:d * c].reshape(d, c), atol=1e-6)
    np.testing.assert_allclose(b - b.mean(), ref.x[d * c:] - ref.x[d * c:].mean(), atol=1e-6)
    _, grad = LogisticObjective(xt, onehot, lam).loss_grad(torch.as_tensor(np.concatenate([w.ravel(), b])))
    assert float(grad.norm()) <= GTOL
