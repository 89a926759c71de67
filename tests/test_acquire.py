"""mmdiag.acquire: the strategies, the AMCB policy, the evidence maths and a short simulation,
each checked against an independent reference (hand computation or brute force)."""

from __future__ import annotations

import functools
import importlib
import itertools
import json
import math
from collections.abc import Mapping

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmdiag.acquire import STRATEGIES, SimulationSpec, rank_pool, simulate, summary
from mmdiag.acquire import policy as amcb
from mmdiag.acquire.curves import area, curve_row, interval
from mmdiag.acquire.diversity import kmeanspp
from mmdiag.acquire.embeddings import FEATURE_GRADIENT, HEAD_SPLIT, READOUT_GRADIENT
from scipy.special import softmax

from mmdiag.acquire.evidence import contributions, difficulty
from mmdiag.acquire.pool import pool_pass
from mmdiag.adapter import ModelAdapter
from mmdiag.errors import ConfigError
from mmdiag.examples_data.synthetic import ToyNet
from mmdiag.loading import dataset_from_arrays
from mmdiag.specs import AdapterSpec, TrainSpec
from tests.helpers.toys import DOMINANT, names_for, toy_split, trained_toy

THREE = (3.0, 1.0, 0.8)


def pool_of(strength=DOMINANT) -> dict:
    """The held-out half of the toy, labels included (the strategies must not read them)."""
    return toy_split(tuple(strength))[1]


def adapter_for(strength=DOMINANT, fusion: str = "concat", **kw) -> ModelAdapter:
    return ModelAdapter(trained_toy(tuple(strength), fusion=fusion), tuple(names_for(len(strength))), **kw)


class LabelTrap(Mapping):
    """A pool whose modality arrays read normally and whose labels raise when touched."""

    def __init__(self, arrays: dict) -> None:
        self.arrays = arrays

    def __getitem__(self, key):
        if key in ("label", "labels"):
            raise AssertionError("a strategy read the pool's labels")
        return self.arrays[key]

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self):
        return len(self.arrays)


# ----------------------------------------------------------------------------- AMCB policy
def test_policy_update_matches_hand_computation() -> None:
    s = amcb.new_state(("a", "v"), amcb.PolicySettings(eta=0.5, sigma=0.5))
    s = amcb.update(amcb.PolicyState(s.modalities, s.theta, last_noise=(0.4, -0.2), settings=s.settings), 0.1)
    # θ = 0 + 0.5 * (0.1 - 0) * (0.4, -0.2) / 0.5 = (0.04, -0.02); b = 0.1 after one reward
    assert s.theta == pytest.approx((0.04, -0.02))
    assert (s.baseline, s.n_rewards, s.last_noise) == (pytest.approx(0.1), 1, None)
    s = amcb.update(amcb.PolicyState(s.modalities, s.theta, s.baseline, s.n_rewards, (-1.0, 1.0), settings=s.settings), 0.05)
    # advantage 0.05 - 0.1 = -0.05: θ += 0.5 * -0.05 * (-1, 1) / 0.5 = (+0.05, -0.05); b = mean(0.1, 0.05)
    assert s.theta == pytest.approx((0.09, -0.07))
    assert s.baseline == pytest.approx(0.075)


def test_policy_action_is_the_softmax_of_the_share_prior_plus_noise() -> None:
    settings = amcb.PolicySettings(sigma=0.5, gamma=2.0)
    state = amcb.PolicyState(("a", "v", "t"), (0.1, -0.2, 0.0), settings=settings)
    shares = np.array([0.6, 0.3, 0.1])
    w, after = amcb.act(state, shares, np.random.default_rng(7))
    xi = np.random.default_rng(7).standard_normal(3)
    x = np.array([0.1, -0.2, 0.0]) + 2.0 * (1 / 3 - shares) + 0.5 * xi
    assert w == pytest.approx(np.exp(x) / np.exp(x).sum())
    assert after.last_noise == pytest.approx(tuple(xi))


def test_policy_reward_and_observe() -> None:
    before = {"accuracy": 0.5, "unimodal": {"a": 0.6, "v": 0.3}}
    after = {"accuracy": 0.6, "unimodal": {"a": 0.55, "v": 0.4}}
    # Δacc 0.1 + ρ·Δmin (0.4 - 0.3) with ρ = 0.5
    assert amcb.reward(before, after, rho=0.5) == pytest.approx(0.15)
    state = amcb.PolicyState(("a", "v"), (0.0, 0.0), last_noise=(1.0, 0.0), evaluation=before)
    state, r = amcb.observe(state, after)
    assert r == pytest.approx(0.2)
    assert state.theta == pytest.approx((0.5 * 0.2 / 0.5, 0.0)) and state.evaluation == after
    fresh, r0 = amcb.observe(amcb.new_state(("a", "v")), after)  # nothing to reward yet
    assert r0 is None and fresh.theta == (0.0, 0.0)


def test_policy_json_round_trip_and_refusals() -> None:
    state = amcb.record(amcb.PolicyState(("a", "v"), (0.3, -0.1), 0.2, 3, (0.5, 1.0), {"accuracy": 0.7}), {"r": 1})
    assert amcb.from_json(amcb.to_json(state)) == state
    with pytest.raises(ConfigError, match="not an mmdiag acquisition policy"):
        amcb.from_json('{"theta": [1]}')
    with pytest.raises(ConfigError, match="sigma"):
        amcb.PolicySettings(sigma=0.0)


# ----------------------------------------------------------------------------- evidence maths
def test_difficulty_matches_a_two_view_ds_combination_by_hand() -> None:
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(5, 3)) * 2, rng.normal(size=(5, 3)) * 2
    d = difficulty([z1, z2])
    for i in range(5):
        e1, e2 = np.log1p(np.exp(z1[i])), np.log1p(np.exp(z2[i]))
        s1, s2 = e1.sum() + 3, e2.sum() + 3
        b1, b2, u1, u2 = e1 / s1, e2 / s2, 3 / s1, 3 / s2
        c = sum(b1[p] * b2[q] for p in range(3) for q in range(3) if p != q)
        assert d.u[i] == pytest.approx([u1, u2])
        assert d.conflict[i] == pytest.approx(c)
        assert d.u_fused[i] == pytest.approx(u1 * u2 / (1 - c))
        assert d.fused[i] == pytest.approx(u1 * u2 / (1 - c) + c)


def test_contributions_are_bmmal_two_player_shapley() -> None:
    z = np.random.default_rng(1).normal(size=(4, 6, 5))  # subsets none, m1, m2, both
    c = contributions(z)
    p = softmax(z, axis=-1)
    for i in range(6):
        y = p[3, i].argmax()
        d1 = 0.5 * ((p[3, i, y] - p[2, i, y]) + (p[1, i, y] - p[0, i, y]))
        d2 = 0.5 * ((p[3, i, y] - p[1, i, y]) + (p[2, i, y] - p[0, i, y]))
        assert c[i] == pytest.approx(np.abs([d1, d2]) / (abs(d1) + abs(d2)))


def test_contributions_for_three_modalities_match_permutation_shapley() -> None:
    z = np.random.default_rng(2).normal(size=(8, 4, 3))
    c = contributions(z)
    p = softmax(z, axis=-1)
    for i in range(4):
        y = p[7, i].argmax()
        phi = np.zeros(3)
        for order in itertools.permutations(range(3)):
            mask = 0
            for m in order:
                phi[m] += p[mask | (1 << m), i, y] - p[mask, i, y]
                mask |= 1 << m
        phi = np.abs(phi / 6)
        assert c[i] == pytest.approx(phi / phi.sum())


def test_kmeanspp_against_brute_force_distances() -> None:
    e = np.random.default_rng(3).normal(size=(40, 4))
    w = np.random.default_rng(4).random(40)
    s = kmeanspp(e, 10, np.random.default_rng(5), weight=w)
    assert s.order[0] == np.argmax(w * (e * e).sum(1))
    assert len(set(s.order.tolist())) == 10
    for k in range(1, 10):
        nearest = min(((e[s.order[k]] - e[j]) ** 2).sum() for j in s.order[:k])
        assert s.d2[k] == pytest.approx(nearest)
    dup = kmeanspp(np.zeros((5, 2)), 5, np.random.default_rng(0))  # all D² = 0: still 5 distinct rows
    assert sorted(dup.order.tolist()) == [0, 1, 2, 3, 4]


def test_area_and_interval_by_hand() -> None:
    assert area([100, 150, 250], [0.5, 0.7, 0.6]) == pytest.approx((0.6 * 50 + 0.65 * 100) / 150)
    lo, hi = interval([0.6, 0.7, 0.8])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2}
    assert (lo, hi) == pytest.approx((0.7 - half, 0.7 + half))
    assert curve_row("x", 0, 1, 10, {"accuracy": 0.9, "unimodal": {"a": 0.8, "v": 0.4}})["balance"] == 0.5


# ----------------------------------------------------------------------------- embeddings
def test_head_split_embedding_is_the_head_weight_gradient() -> None:
    a = adapter_for()
    pool = {m: pool_of()[m][:20] for m in a.modalities}
    passed = pool_pass(a, pool, device="cpu")
    assert passed.method == HEAD_SPLIT and not passed.warnings
    model = a.model
    x = {m: torch.as_tensor(pool[m]) for m in a.modalities}
    for i in (0, 7):
        model.zero_grad()
        z = model({m: t[i:i + 1] for m, t in x.items()})
        F.cross_entropy(z, z.argmax(1)).backward()
        grad = model.head.weight.grad  # [K, 2 * 16]: columns 0-15 audio, 16-31 visual
        for j in range(2):
            block = grad[:, 16 * j:16 * (j + 1)].flatten().double().numpy()
            assert passed.embeddings[j][i] == pytest.approx(block, abs=1e-5)


def test_other_fusions_and_black_boxes_say_how_they_embed() -> None:
    a = adapter_for(fusion="sum")
    pool = {m: pool_of()[m][:8] for m in a.modalities}
    passed = pool_pass(a, pool, device="cpu")
    assert passed.method == FEATURE_GRADIENT and any("not BADGE's exact" in w for w in passed.warnings)
    feats = {m: a.model.encoders[m](torch.as_tensor(pool[m])).detach().requires_grad_(True) for m in a.modalities}
    z = a.model.head(feats["audio"] + feats["visual"])
    F.cross_entropy(z, z.argmax(1), reduction="sum").backward()
    assert passed.embeddings[1] == pytest.approx(feats["visual"].grad.double().numpy(), abs=1e-5)
    black = pool_pass(_black_box(), pool, device="cpu")
    assert black.method == READOUT_GRADIENT and any("black box" in w for w in black.warnings)
    assert black.embeddings[0].shape == (8, 4)


def _black_box() -> ModelAdapter:
    """The concat toy behind a wrapper whose submodule names hide the encoders."""
    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = trained_toy(DOMINANT)

        def forward(self, inputs):
            return self.net(inputs)

    a = ModelAdapter(Wrapped(), ("audio", "visual"), call="dict", encoders=None)
    if a.has_encoders:  # found by name after all: hide them explicitly
        a._give_up_encoders("test")
    return a


# ----------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("strength", [DOMINANT, THREE], ids=["M2", "M3"])
def test_every_strategy_is_shaped_deterministic_and_label_blind(strength) -> None:
    a = adapter_for(strength)
    arrays = pool_of(strength)
    trap = LabelTrap(dict(arrays))
    permuted = dict(arrays, label=np.random.default_rng(0).permutation(arrays["label"]))
    passed = pool_pass(a, trap, device="cpu")
    assert passed.subsets.shape == (1 << len(strength), 400, 4)
    for name in STRATEGIES:
        sel = rank_pool(a, trap, 12, strategy=name, seed=3, passed=passed)
        assert sel.indices.shape == (12,) and len(set(sel.indices.tolist())) == 12
        assert 0 <= sel.indices.min() and sel.indices.max() < 400
        assert [r["rank"] for r in sel.rows] == list(range(1, 13))
        assert {f"u.{m}" for m in a.modalities} | {f"weight.{m}" for m in a.modalities} <= set(sel.rows[0])
        again = rank_pool(a, trap, 12, strategy=name, seed=3)  # a fresh pass: the same choice
        assert again.indices.tolist() == sel.indices.tolist()
        relabelled = rank_pool(a, permuted, 12, strategy=name, seed=3)
        assert relabelled.indices.tolist() == sel.indices.tolist()
    other = rank_pool(a, trap, 12, strategy="random", seed=4, passed=passed)
    assert other.indices.tolist() != rank_pool(a, trap, 12, strategy="random", seed=3, passed=passed).indices.tolist()


def test_rlmba_weights_the_under_contributing_modality_and_keeps_its_policy() -> None:
    a = adapter_for()
    sel = rank_pool(a, pool_of(), 10, strategy="rlmba", seed=0, device="cpu")
    shares = sel.report["pool_shares"]
    assert shares["audio"] > shares["visual"]  # the toy's first modality dominates
    assert sel.report["target"] == "visual" and sel.report["weights"]["visual"] > 0.5
    assert sel.policy is not None and len(sel.policy.history) == 1 and sel.policy.last_noise is not None
    d = sel.rows[0]
    w = np.array([d["weight.audio"], d["weight.visual"]])
    assert d["score"] == pytest.approx((w @ [d["u.audio"], d["u.visual"]] + d["difficulty"]) * d["diversity"])


def test_rank_pool_refuses_bad_requests() -> None:
    a = adapter_for()
    with pytest.raises(ConfigError, match="budget"):
        rank_pool(a, pool_of(), 401, strategy="entropy", device="cpu")
    with pytest.raises(ConfigError, match="Did you mean 'badge'"):
        rank_pool(a, pool_of(), 5, strategy="badg", device="cpu")
    with pytest.raises(ConfigError, match="no array for modality"):
        rank_pool(a, {"audio": pool_of()["audio"]}, 5, device="cpu")


# ----------------------------------------------------------------------------- simulation
def test_short_simulation_all_strategies_resumes(tmp_path) -> None:
    train, val = toy_split(DOMINANT)
    spec = SimulationSpec(initial=40, budget=20, rounds=2, seeds=1,
                          train=TrainSpec(epochs=3, optimizer="adam", lr=1e-2, device="cpu"))
    run = functools.partial(simulate, functools.partial(ToyNet, ["audio", "visual"]), dataset_from_arrays(train),
                            dataset_from_arrays(val), spec, AdapterSpec(modalities=("audio", "visual")), tmp_path)
    result = run()
    rows = result.rows
    assert len(rows) == len(STRATEGIES) * 3
    assert [r["labels"] for r in rows if r["strategy"] == "rlmba"] == [40, 60, 80]
    first = {tuple(v for k, v in r.items() if k != "strategy") for r in rows if r["round"] == 0}
    assert len(first) == 1  # every strategy starts from the same round-0 model and labels
    saved = json.loads((tmp_path / "chains" / "rlmba-seed0.json").read_text())["policy"]
    history = saved["history"]
    assert len(history) == 2 and history[0]["reward"] is None  # round 2 rewarded round 1's action:
    assert history[1]["reward"] == pytest.approx(amcb.reward(*[
        {"accuracy": r["accuracy"], "unimodal": {m: r[f"unimodal.{m}"] for m in ("audio", "visual")}}
        for r in rows if r["strategy"] == "rlmba" and r["round"] < 2], rho=1.0))
    with pytest.raises(ConfigError, match="`resume`"):
        run()
    assert run(resume=True).rows == rows  # everything finished: read back, nothing retrained
    table = summary(rows)
    acc = next(r for r in table if r["strategy"] == "random" and r["curve"] == "accuracy")
    mine = [r for r in rows if r["strategy"] == "random"]
    assert acc["area"] == pytest.approx(area([r["labels"] for r in mine], [r["accuracy"] for r in mine]))
    with pytest.raises(ConfigError, match="more than the 600 rows"):
        simulate(ToyNet, dataset_from_arrays(train), dataset_from_arrays(val),
                 SimulationSpec(initial=500, budget=100, rounds=2), AdapterSpec(modalities=("audio", "visual")),
                 tmp_path / "other")


def toy_simulation(rounds: int, strategies: tuple[str, ...]) -> tuple:
    """simulate()'s positional arguments (all but the folder) for a tiny run on the toy."""
    train, val = toy_split(DOMINANT)
    spec = SimulationSpec(initial=40, budget=20, rounds=rounds, seeds=1, strategies=strategies,
                          train=TrainSpec(epochs=2, optimizer="adam", lr=1e-2, device="cpu"))
    return (functools.partial(ToyNet, ["audio", "visual"]), dataset_from_arrays(train), dataset_from_arrays(val), spec,
            AdapterSpec(modalities=("audio", "visual")))


@pytest.mark.slow
def test_parallel_strategies_give_the_serial_curves(tmp_path) -> None:
    args = toy_simulation(rounds=1, strategies=("rlmba", "badge"))
    serial = simulate(*args, tmp_path / "serial").rows
    assert simulate(*args, tmp_path / "parallel", jobs=2).rows == serial


def test_mean_mask_evaluation_fills_with_the_data_mean() -> None:
    from mmdiag.acquire.simulate import evaluation_of

    _, val = toy_split(DOMINANT)
    model = trained_toy(DOMINANT)
    ev = evaluation_of(ModelAdapter(model, ("audio", "visual"), mask="mean"), dataset_from_arrays(val), device="cpu")
    with torch.no_grad():  # reference: the visual encoder's output replaced by its mean over the data
        h = {m: model.encoders[m](torch.as_tensor(val[m])) for m in ("audio", "visual")}
        z = model.head(torch.cat([h["audio"], h["visual"].mean(0, keepdim=True).expand_as(h["visual"])], 1))
    assert ev["unimodal"]["audio"] == pytest.approx((z.argmax(1).numpy() == val["label"]).mean())


def test_an_interrupted_simulation_resumes_at_the_last_finished_round(tmp_path, monkeypatch) -> None:
    sim = importlib.import_module("mmdiag.acquire.simulate")  # the package exports a function of that name

    args = toy_simulation(rounds=2, strategies=("rlmba", "random"))
    whole = simulate(*args, tmp_path / "whole").rows
    real_round = sim._one_round

    def crash_in_round_2(task, adapter, state, round_):
        if round_ == 2:
            raise KeyboardInterrupt
        return real_round(task, adapter, state, round_)

    monkeypatch.setattr(sim, "_one_round", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        simulate(*args, tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "chains" / "rlmba-seed0.json").read_text())["round"] == 1
    monkeypatch.setattr(sim, "_one_round", real_round)
    assert simulate(*args, tmp_path / "cut", resume=True).rows == whole
