"""mmanet: combination distributions, MAD against a hand computation, the weak-combination choice,
held-out rows, the teacher, direction under a missing dominant modality.

The contract every fix meets (hooks, teardown, state, parameters, distributed) is in test_conformance.py.
"""

from __future__ import annotations

import copy
import math
import signal
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F

from mmdiag.adapter import ModelAdapter
from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES, Fix, FixContext, fix_step
from mmdiag.fixes._combinations import all_masks, combination_distribution, draw, histogram_kl, mask_distribution
from mmdiag.fixes.mmanet import MMANet, gram, mad_loss, margin_weights, untrained
from mmdiag.train import load_training_checkpoint
from tests.helpers.fixkit import (batch, check_hooks_fire, check_teardown, direction, fit_run, make_run, mean,
                                  roundtrip, toy_model, train)
from tests.helpers.toys import toy_split, trained_toy

ROWS = slice(0, 128)


def test_registered_with_metadata() -> None:
    cls = FIXES.get("mmanet")
    assert cls is MMANet and cls.needs_encoders and cls.targets == ("missing_modality",)
    p = cls().params()
    assert (p["lambda_mad"], p["lambda_mar"], p["begin_epoch"], p["teacher"]) == (30.0, 0.5, None, "auto")


# ------------------------------------------------------------------------- combination distributions
def test_missing_rates_give_independent_missingness_without_the_empty_case() -> None:
    mods = ("rgb", "depth")
    dist = mask_distribution(mods, missing="rgb=0.3,depth=0.5")
    z = 1 - 0.3 * 0.5
    assert dist == pytest.approx({(True, False): 0.7 * 0.5 / z, (False, True): 0.3 * 0.5 / z,
                                  (True, True): 0.7 * 0.5 / z})
    assert mask_distribution(mods, missing={"depth": 1.0}) == {(True, False): 1.0}  # depth always missing
    three = mask_distribution(("m0", "m1", "m2"), missing="m0=0.5")
    assert three == pytest.approx({(False, True, True): 0.5, (True, True, True): 0.5})


def test_explicit_combinations_and_the_uniform_default() -> None:
    mods = ("rgb", "depth", "ir")
    dist = mask_distribution(mods, combinations="rgb+depth=0.6, depth=0.4")
    assert dist == pytest.approx({(True, True, False): 0.6, (False, True, False): 0.4})
    assert mask_distribution(mods, combinations={"depth+rgb": 1}) == {(True, True, False): 1.0}
    probs = combination_distribution("mmanet", mods)
    assert len(probs) == 7 and probs == pytest.approx([1 / 7] * 7)
    masks = all_masks(mods)
    probs = combination_distribution("mmanet", mods, combinations="ir=0.25,rgb+depth+ir=0.75")
    torch.manual_seed(0)
    index, keep = draw(probs, masks, 4000, torch.device("cpu"))
    assert set(index.tolist()) == {masks.index((False, False, True)), 6}
    assert float(keep[:, 2].float().mean()) == 1.0 and float(keep[:, 0].float().mean()) == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize("call, match", [
    (lambda: MMANet(missing="rgb:0.3"), "mmanet: .*missing"),
    (lambda: MMANet(missing="rgb=1.5"), "between 0 and 1"),
    (lambda: MMANet(combinations="rgb=0.5,depth=0.4"), "sum to 1"),
    (lambda: MMANet(combinations="rgb+rgb=1"), "twice"),
    (lambda: MMANet(missing="a=0.1", combinations="a=1"), "not both"),
    (lambda: MMANet(teacher="best"), "teacher"),
    (lambda: MMANet(holdout_fraction=1.0), "holdout_fraction"),
    (lambda: MMANet(smoothing=0), "smoothing"),
    (lambda: combination_distribution("mmanet", ("rgb", "depth"), missing="audio=0.3"), "audio"),
    (lambda: combination_distribution("mmanet", ("rgb", "depth"), missing="rgb=1,depth=1"), "always missing"),
])
def test_bad_specs_and_parameters_are_config_errors(call: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()


def test_unknown_modality_is_refused_at_setup() -> None:
    fix = MMANet(missing="rgb=0.5")
    run = make_run(fix)
    with pytest.raises(ConfigError, match="rgb"):
        fix.setup(run.ctx)
    fix.teardown(run.ctx)


# ------------------------------------------------------------------------- MAD
def test_mad_matches_a_hand_computation() -> None:
    fs = [[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]
    ft = [[0.5, 1.0], [2.0, 0.0], [1.0, 1.0]]
    zt = [[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]]

    def norm_gram(f: list[list[float]]) -> list[list[float]]:
        g = [[sum(a * b for a, b in zip(r, s)) for s in f] for r in f]
        return [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in g]

    def entropy(z: list[float]) -> float:
        e = [math.exp(v) for v in z]
        p = [v / sum(e) for v in e]
        return -sum(q * math.log(q) for q in p)

    gs, gt = norm_gram(fs), norm_gram(ft)
    h = [entropy(z) for z in zt]
    w = [x / sum(h) for x in h]
    want = sum((gs[i][j] - gt[i][j]) ** 2 * w[j] for i in range(3) for j in range(3))
    got = mad_loss(torch.tensor(fs), torch.tensor(ft), torch.tensor(zt))
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert torch.allclose(gram(torch.tensor(fs)), torch.tensor(gs))
    assert torch.allclose(margin_weights(torch.tensor(zt)), torch.tensor(w))
    assert torch.allclose(margin_weights(torch.tensor([[50.0, -50.0], [50.0, -50.0]])), torch.tensor([0.5, 0.5]))


def test_mad_pulls_the_student_toward_the_teachers_relations() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(8, 5)
    student = torch.randn(8, 5, requires_grad=True)
    logits = torch.randn(8, 3)
    opt = torch.optim.SGD([student], lr=0.5)
    start = float(mad_loss(student, teacher, logits).detach())
    for _ in range(50):
        opt.zero_grad()
        mad_loss(student, teacher, logits).backward()
        opt.step()
    assert float(mad_loss(student, teacher, logits).detach()) < 0.2 * start


# ------------------------------------------------------------------------- MAR: the weak combination
def _set_up(fix: MMANet, m_count: int = 2) -> FixContext:
    run = make_run(fix, strength=(3.0,) * m_count if m_count != 2 else (3.0, 0.8))
    fix.setup(run.ctx)
    return run.ctx


def test_weak_combination_is_the_one_whose_label_histogram_drifts_most() -> None:
    """audio's predictions follow the full input's; visual's collapse onto one class."""
    fix = MMANet(begin_epoch=1)
    ctx = _set_up(fix)
    full = torch.tensor([25.0, 25.0, 25.0, 25.0])
    hist = torch.tensor([[24.0, 26.0, 25.0, 25.0], [90.0, 5.0, 5.0, 0.0], [25.0, 25.0, 25.0, 25.0]])
    stats = {"hist": hist, "full_hist": full, "correct": torch.tensor([90.0, 80.0, 95.0]),
             "seen": torch.tensor([100.0, 100.0, 100.0])}
    fix._score(stats, replace=True)
    assert fix.signals()["weak"] == "visual"
    assert fix.signals()["score.visual"] == pytest.approx(histogram_kl(hist[1], full, 0.01))
    assert histogram_kl(hist[1], full, 0.01) > 10 * histogram_kl(hist[0], full, 0.01)
    by_acc = MMANet(begin_epoch=1, weak_by="accuracy")
    _set_up(by_acc)
    by_acc._score({**stats, "correct": torch.tensor([60.0, 80.0, 95.0])}, replace=True)
    assert by_acc.signals()["weak"] == "audio"
    fix.teardown(ctx)


def test_weak_set_adds_single_constituents_and_respects_the_support() -> None:
    fix = MMANet(begin_epoch=1, combinations="m0+m1=0.5,m0+m1+m2=0.5")
    _set_up(fix, 3)
    masks = fix._ctx_bits["masks"]
    k = masks.index((True, True, False))
    assert fix._candidates() == [k]  # the full set is the reference, the others are never drawn
    hist = torch.full((7, 4), 25.0)
    fix._score({"hist": hist, "full_hist": hist[6], "correct": torch.ones(7), "seen": torch.ones(7)}, replace=True)
    assert [fix._s["names"][j] for j in fix._s["weak"]] == ["m0+m1", "m0", "m1"]
    alone = MMANet(begin_epoch=1, combinations="m0+m1=0.5,m0+m1+m2=0.5", constituents=False)
    _set_up(alone, 3)
    alone._score({"hist": hist, "full_hist": hist[6], "correct": torch.ones(7), "seen": torch.ones(7)}, replace=True)
    assert alone._s["weak"] == [k]


def test_scores_accumulate_before_begin_epoch_and_the_choice_comes_at_its_eve() -> None:
    run = train(MMANet(begin_epoch=2), epochs=3, rows=ROWS)
    rows = run.history
    assert "weak" not in rows[0] and rows[1]["weak"] in ("audio", "visual") and rows[2]["weak"] == rows[1]["weak"]
    assert rows[1]["score.visual"] >= rows[0]["score.visual"]  # summed over the mining epochs
    assert rows[0]["mined_on"] == "training batches" and rows[0]["teacher"] in ("begin", "start")


def test_mar_on_all_adds_the_weak_readouts_cross_entropy() -> None:
    model = toy_model(0)
    fix = MMANet(begin_epoch=0, lambda_mad=0.0, lambda_mar=2.0, mar_on="all", constituents=False)
    ctx = _set_up_model(fix, model)
    fix._s["weak"], fix._s["started"], fix._s["teacher_mode"] = [1], True, "start"  # visual only
    x, y = batch()
    step = fix_step(ctx, fix, x, y, epoch=0)
    with torch.no_grad():
        feats = {m: model.encoders[m](x[m]) for m in ("audio", "visual")}
        z = model.head(torch.cat([torch.zeros_like(feats["audio"]), feats["visual"]], 1))
    assert step.logs["mar"] == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-5)
    assert float(step.loss.detach()) == pytest.approx(float(F.cross_entropy(step.logits.detach(), y)) + 2.0 * step.logs["mar"], rel=1e-5)
    fix.teardown(ctx)


def _set_up_model(fix: Fix, model: torch.nn.Module) -> FixContext:
    ctx = make_run(fix, model=model).ctx
    fix.setup(ctx)
    return ctx


# ------------------------------------------------------------------------- held-out rows, teacher
@dataclass
class _RowProbe(Fix):
    """Holds out half the rows and records the rows the loop trains on (audio[:, 0] is the row number)."""

    name: ClassVar[str] = "_row_probe"
    summary: ClassVar[str] = "test probe"
    needs_encoders: ClassVar[bool] = False

    def setup(self, ctx: FixContext) -> None:
        self.__dict__["held"] = ctx.hold_out(0.5, seed=3)
        self.__dict__["seen"] = set()

    def loss(self, ctx: FixContext, step: Any) -> torch.Tensor:
        self.__dict__["seen"].update(int(v) for v in step.inputs["audio"][:, 0].tolist())
        return step.loss


def test_the_reference_loop_leaves_held_out_rows_out_of_training() -> None:
    data = {k: v.copy() for k, v in toy_split()[0].items()}
    data["audio"][:, 0] = range(len(data["label"]))
    probe = _RowProbe()
    from mmdiag.train import fit

    fit(ModelAdapter(toy_model(0), ("audio", "visual")), data, fix=probe, epochs=2, batch_size=128, device="cpu")
    held, seen = set(probe.__dict__["held"]), probe.__dict__["seen"]
    assert len(held) == 300 and not held & seen and held | seen == set(range(600))
    ctx = FixContext(adapter=ModelAdapter(toy_model(0), ("audio", "visual")), optimizer=None, epochs=1, n_classes=4)
    assert ctx.hold_out(0.5) == ()  # no training data in the context: nothing held out


def test_reference_loop_mines_on_held_out_rows_and_a_trained_start_is_the_teacher(tmp_path: Any) -> None:
    model = copy.deepcopy(trained_toy((3.0, 0.8), 0))  # trained_toy is cached: train a copy
    start = {k: v.clone() for k, v in model.state_dict().items()}
    fix = MMANet(begin_epoch=1)
    _, hist = fit_run(fix, model=model, epochs=2, batch_size=128, validate=False, out_dir=tmp_path)
    last = hist.last
    assert last["signal.mined_on"] == "holdout" and last["signal.teacher"] == "start"
    assert last["signal.weak"] == "visual"
    assert fix.state_dict()["teacher_weights"] is None  # freed at teardown
    teacher = load_training_checkpoint(tmp_path)["fix"]["teacher_weights"]
    assert all(torch.equal(teacher[k], v) for k, v in start.items())  # the frozen copy of the starting model
    assert not all(torch.equal(model.state_dict()[k], v) for k, v in start.items())


@pytest.mark.parametrize("name, params", [("mmanet", {"begin_epoch": 1}), ("dmrnet", {"detect_epochs": 1})])
def test_ctrl_c_mid_epoch_resumes_exactly_with_held_out_rows(tmp_path: Any, name: str, params: dict) -> None:
    """The reference loop, Ctrl-C at a batch boundary of epoch 1, resume: the weights of an
    uninterrupted run (held-out rows, teacher, mining state and the auxiliary head all restored)."""
    from mmdiag.train import Interrupted, fit

    def run(model: torch.nn.Module, **kw: Any) -> None:
        fit(ModelAdapter(model, ("audio", "visual")), toy_split()[0], fix=FIXES.get(name)(**params), epochs=3,
            batch_size=64, device="cpu", seed=0, **kw)

    def interrupt(p: Any) -> None:
        if p.stage == "batch" and p.epoch == 1 and p.batch == 4:
            signal.raise_signal(signal.SIGINT)

    straight = toy_model(0)
    run(straight)
    with pytest.raises(Interrupted):
        run(toy_model(0), out_dir=tmp_path, progress=interrupt)
    resumed = toy_model(7)
    run(resumed, out_dir=tmp_path, resume=True)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_untrained_start_is_not_a_teacher() -> None:
    assert untrained(30, 100, 0.25) and not untrained(60, 100, 0.25) and untrained(0, 0, 0.5)
    run = train(MMANet(begin_epoch=1), epochs=2, rows=ROWS)
    assert run.history[-1]["teacher"] == "begin"
    run = train(MMANet(begin_epoch=0), epochs=1, rows=ROWS)
    assert run.history[-1]["teacher"] == "none"


def test_without_a_known_head_the_pooled_encoder_outputs_are_the_representation() -> None:
    fix = MMANet(begin_epoch=0, teacher="start")
    run = make_run(fix)
    run.adapter.head = None
    train(fix, run=run, epochs=1, rows=ROWS)
    assert run.history[-1]["teacher"] == "start" and math.isfinite(run.history[-1]["weak_score"])


# ------------------------------------------------------------------------- contract (short), direction
def test_hooks_fire_teardown_is_clean_and_state_round_trips() -> None:
    run = check_hooks_fire(MMANet(begin_epoch=0, mar_on="all"), rows=ROWS)
    check_teardown(lambda: MMANet(begin_epoch=0), rows=ROWS, fusion="gated")
    roundtrip(run.fix)
    live = train(MMANet(begin_epoch=0), epochs=1, rows=ROWS, keep_open=True)
    try:
        new = roundtrip(live.fix)  # during training the state holds the teacher's weights
        assert set(new.state_dict()["teacher_weights"]) == set(live.model.state_dict())
    finally:
        live.fix.teardown(live.ctx)


def test_three_modalities_train() -> None:
    run = train(MMANet(begin_epoch=1, missing="m0=0.5,m1=0.2"), strength=(3.0, 1.0, 0.5), epochs=2, rows=ROWS)
    assert run.history[-1]["weak"] in {"m2", "m0+m2", "m1+m2"}  # m2 is never missing: the support


@pytest.mark.slow
def test_direction_accuracy_with_the_dominant_modality_missing_rises() -> None:
    """Fused accuracy with audio (the dominant modality) masked at deployment, over 3 seeds."""
    res = direction(MMANet)
    fixed, plain = res[0], res[1]
    assert mean(fixed) > mean(plain) + 0.1, (fixed, plain)
    assert all(f > p for f, p in zip(fixed, plain)), (fixed, plain)
