"""relearn: purity of known clusters, k-means against brute force, the re-initialisation blend by hand,
and direction: neutral on the toy, where no encoder over-fits.

The contract every fix meets (hooks, teardown, state, parameters, distributed) is in test_conformance.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES
from mmdiag.fixes.relearn import Relearn, kmeans, min_max_scale, purity, relearn_weight
from mmdiag.adapter import ModelAdapter
from tests.helpers.fixkit import BUDGET, MODS, SHORT, fit_run, train, unimodal_accuracy
from tests.helpers.toys import DOMINANT, toy_split


def test_registered_with_the_scripts_defaults() -> None:
    assert FIXES.get("relearn") is Relearn and Relearn.needs_encoders
    assert Relearn().params() == {"every": 20, "max_relearns": 3, "lam": 3.0, "holdout_fraction": 0.1,
                                  "max_rows": None, "kmeans_iterations": 100, "seed": 0}


@pytest.mark.parametrize("bad", [{"every": 0}, {"holdout_fraction": 1.0}, {"max_rows": 0}, {"lam": "3"}])
def test_bad_parameters(bad: dict) -> None:
    with pytest.raises(ConfigError, match="relearn: "):
        Relearn(**bad)


def test_purity_of_known_clusters() -> None:
    clusters = torch.tensor([0, 0, 0, 1, 1, 2])
    labels = torch.tensor([1, 1, 0, 2, 2, 0])
    assert purity(clusters, labels) == pytest.approx(5 / 6)  # majorities 1 (2 rows), 2 (2), 0 (1)
    g = torch.Generator().manual_seed(0)
    c, y = torch.randint(5, (200,), generator=g), torch.randint(3, (200,), generator=g)
    brute = sum(max(int(((c == k) & (y == j)).sum()) for j in range(3)) for k in range(5)) / 200
    assert purity(c, y) == pytest.approx(brute)


def test_min_max_scale_by_hand() -> None:
    x = torch.tensor([[0.0, 5.0, 1.0], [2.0, 5.0, 3.0], [1.0, 5.0, 2.0]])
    want = torch.tensor([[-1.0, -1.0, -1.0], [1.0, -1.0, 1.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(min_max_scale(x), want)


def test_kmeans_finds_the_optimal_partition_of_separated_points() -> None:
    """Eight points in two far groups: the brute-force minimum of the within-cluster sum of squares
    over all 2^8 assignments is the partition k-means returns."""
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g) + 8.0]).double()

    def inertia(assign: tuple[int, ...]) -> float:
        a = torch.tensor(assign)
        return sum(float(((x[a == k] - x[a == k].mean(0)) ** 2).sum()) for k in (0, 1) if bool((a == k).any()))

    best = min(itertools.product((0, 1), repeat=8), key=inertia)
    got = tuple(kmeans(x, 2, seed=0).tolist())
    assert inertia(got) == pytest.approx(inertia(best))
    assert torch.equal(kmeans(x, 2, seed=0), kmeans(x, 2, seed=0))


def test_weight_formula() -> None:
    assert relearn_weight(0.9, 0.5, 3.0) == pytest.approx(math.tanh(1.2))
    assert relearn_weight(0.5, 0.9, 3.0) == pytest.approx(math.tanh(1.2))
    assert relearn_weight(0.7, 0.7, 3.0) == 0.0


def test_relearning_blends_toward_the_initial_weights() -> None:
    """theta_after = w theta_init + (1 - w) theta_before for every encoder parameter, w from the signals'
    purities (row-hash held-out rows, relearning after epoch 1)."""
    before: list[dict[str, torch.Tensor]] = []

    def record(run, _step) -> None:
        before.append({n: p.detach().clone() for n, p in run.model.named_parameters()})

    run = train(Relearn(every=1), epochs=2, rows=SHORT, on_step=record)
    state, sig = run.fix.state_dict(), run.fix.signals()
    assert sig["relearns"] == 1.0 and sig["held_out"] == "row hash"
    for m in ("audio", "visual"):
        w = relearn_weight(sig[f"purity_train.{m}"], sig[f"purity_held.{m}"], 3.0)
        assert sig[f"w.{m}"] == pytest.approx(w)
        names = [n for n, _ in run.model.named_parameters() if n.startswith(f"encoders.{m}.")]
        for n, p0 in zip(names, state["initial"][m]):
            want = w * p0 + (1 - w) * before[-1][n]
            torch.testing.assert_close(dict(run.model.named_parameters())[n].detach(), want, rtol=1e-6, atol=1e-7)
    # the head is never re-initialised
    assert torch.equal(run.model.head.weight.detach(), before[-1]["head.weight"])


@pytest.mark.parametrize("fusion,strength", [("gated", (3.0, 0.8)), ("film", (3.0, 0.8)), ("concat", (3.0, 0.8, 0.8))])
def test_other_fusions_and_three_modalities(fusion: str, strength: tuple) -> None:
    run = train(Relearn(every=1), strength, 0, fusion=fusion, epochs=2, rows=SHORT)
    sig = run.history[-1]
    assert len([k for k in sig if k.startswith("w.")]) == len(strength)
    assert all(0.0 <= sig[k] <= 1.0 for k in sig if k.startswith(("w.", "purity")))


@pytest.mark.slow
def test_direction_neutral_where_nothing_over_fits() -> None:
    """The DOMINANT toy has no encoder that over-fits (its purity gaps are k-means noise on the reserved
    rows), so re-learning must leave the model where plain training has it: per seed, in the
    reference loop (reserved rows), fused and weak-modality accuracy within 0.06 of plain training's,
    after three relearning steps."""
    from mmdiag.fixes.base import PlainTraining

    for seed in BUDGET.seeds:
        acc, relearn = {}, Relearn(every=4)
        for key, fix in (("fix", relearn), ("plain", PlainTraining())):
            model, _ = fit_run(fix, seed, validate=False)
            acc[key] = unimodal_accuracy(ModelAdapter(model, MODS), toy_split(DOMINANT, seed)[1])
        assert relearn.signals()["relearns"] == 3.0 and relearn.signals()["held_out"] == "training rows"
        assert abs(acc["fix"]["fused"] - acc["plain"]["fused"]) <= 0.06, acc
        assert acc["fix"]["visual"] >= acc["plain"]["visual"] - 0.06, acc
