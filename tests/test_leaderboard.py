"""The leaderboard: the fix list and its parameters, the rows and the ranking against hand computations,
resuming without retraining, the process pool, and ``mmdiag rebalance --fix a,b`` end to end."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

from mmdiag import validation
from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES, Fix
from mmdiag.rebalance import candidate
from mmdiag.rebalance.board_run import candidate_job, leaderboard, session_of
from mmdiag.rebalance.candidate import train_candidate
from mmdiag.rebalance.candidates import candidate_params, parse_fix_list
from mmdiag.rebalance.board_table import Entry, leaderboard_columns, leaderboard_rows, rank_rows
from mmdiag.rebalance.scoring import OBJECTIVES, Scores, paired_separation
from mmdiag.specs import AnalysisSpec, TrainSpec
from mmdiag.stats import bootstrap_indices
from mmdiag.examples_data.synthetic import ToyNet
from tests.helpers.cli_run import run
from tests.helpers.toys import DOMINANT, toy_split

MODS = ("audio", "visual")
TRAIN = TrainSpec(epochs=2, lr=0.05, device="cpu")
QUICK = AnalysisSpec(bootstrap=50)


def build() -> ToyNet:
    return ToyNet(list(MODS))


# ---------------------------------------------------------------------------------------- the fix list


@dataclass
class _ToyFixA(Fix):
    name: ClassVar[str] = "toy_fix_a"
    summary: ClassVar[str] = "test fix"
    alpha: float = 1.0
    beta: float = 0.0


@dataclass
class _ToyFixB(Fix):
    name: ClassVar[str] = "toy_fix_b"
    summary: ClassVar[str] = "test fix"
    alpha: float = 1.0


@pytest.fixture
def toy_fixes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fixes registered for one test only (the registry is restored afterwards)."""
    monkeypatch.setitem(FIXES._items, "toy_fix_a", _ToyFixA)
    monkeypatch.setitem(FIXES._items, "toy_fix_b", _ToyFixB)


def test_all_is_every_registered_fix_read_from_the_registry(toy_fixes: None) -> None:
    names = parse_fix_list("all")
    assert names == [n for n in FIXES.names() if n != "none"]
    assert {"toy_fix_a", "toy_fix_b", "ogm_ge"} <= set(names) and "none" not in names
    assert parse_fix_list("all", with_baseline=True) == ["none", *names]
    assert parse_fix_list(" arl, ogm_ge ,arl,none") == ["arl", "ogm_ge"]


def test_an_unknown_fix_in_the_list_names_the_closest() -> None:
    with pytest.raises(ConfigError, match="Unknown fix 'ogm_gee'.*Did you mean 'ogm_ge'"):
        parse_fix_list("arl,ogm_gee")
    with pytest.raises(ConfigError, match="no fix besides the baseline"):
        parse_fix_list("none")


def test_prefixed_parameters_go_to_their_fix_only(toy_fixes: None) -> None:
    got = candidate_params(["toy_fix_a", "toy_fix_b"], {"toy_fix_a.beta": "0.5", "toy_fix_b": {"alpha": 2}})
    assert got == {"toy_fix_a": {"beta": "0.5"}, "toy_fix_b": {"alpha": 2}}


def test_a_prefix_outside_the_list_is_refused(toy_fixes: None) -> None:
    with pytest.raises(ConfigError, match="'ogm_ge'.*not among the fixes trained"):
        candidate_params(["toy_fix_a", "toy_fix_b"], {"ogm_ge.alpha": 0.8})


def test_an_unprefixed_parameter_must_fit_every_fix(toy_fixes: None) -> None:
    both = candidate_params(["toy_fix_a", "toy_fix_b"], {"alpha": 3})
    assert both == {"toy_fix_a": {"alpha": 3}, "toy_fix_b": {"alpha": 3}}
    with pytest.raises(ConfigError, match="toy_fix_b has no parameter 'beta'"):
        candidate_params(["toy_fix_a", "toy_fix_b"], {"beta": 3})
    assert candidate_params(["toy_fix_a"], {"beta": 3}) == {"toy_fix_a": {"beta": 3}}  # one fix: its own rule


# ------------------------------------------------------------------------------ rows, against hand sums


def _scores(correct: list[int], audio: float, visual: float, balance: float) -> Scores:
    c = np.asarray(correct, dtype=np.float64)
    return Scores(float(c.mean()), (0.1, 0.9), {"audio": audio, "visual": visual}, balance, None, c)


def test_the_columns_are_those_of_the_issue() -> None:
    assert leaderboard_columns(MODS, deployment=False) == [
        "rank", "fix", "accuracy", "accuracy_low", "accuracy_high", "unimodal.audio", "unimodal.visual", "balance",
        "train_seconds", "step_overhead", "separated"]
    assert leaderboard_columns(MODS, deployment=True)[-4:] == ["deployment", "train_seconds", "step_overhead",
                                                               "separated"]


def test_rows_against_a_hand_computation() -> None:
    base = Entry("none", _scores([1, 0, 1, 0, 1, 0, 1, 0], 0.9, 0.3, 0.4), train_seconds=2.0, steps=10)
    good = Entry("arl", _scores([1, 1, 1, 1, 1, 1, 1, 0], 0.9, 0.6, 0.8), train_seconds=3.0, steps=10)
    rows = {r["fix"]: r for r in leaderboard_rows([good], base, MODS, False, n_boot=200, seed=3)}
    assert rows["arl"]["accuracy"] == 7 / 8 and rows["none"]["accuracy"] == 4 / 8
    assert rows["arl"]["step_overhead"] == pytest.approx((3.0 / 10) / (2.0 / 10))
    assert rows["none"]["step_overhead"] == 1.0
    assert rows["arl"]["difference"] == pytest.approx(3 / 8)
    assert rows["none"]["separated"] is None and "deployment" not in rows["arl"]
    # the paired bootstrap by brute force: the same resampled rows for both models
    d = good.scores.correct - base.scores.correct
    means = [d[row].mean() for idx in bootstrap_indices(8, 200, 3) for row in idx]
    low, high = np.percentile(means, [2.5, 97.5])
    assert (rows["arl"]["difference_low"], rows["arl"]["difference_high"]) == pytest.approx((low, high))
    assert rows["arl"]["separated"] == bool(low > 0 or high < 0)


def test_the_paired_test_sees_what_overlapping_intervals_miss() -> None:
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.8).astype(float)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:12]] = 1.0  # right on 12 more rows, wrong on none the baseline got
    diff, ci, sep = paired_separation(better, base, 500, 0)
    assert diff == pytest.approx(12 / 400) and sep is True and ci[0] > 0
    assert paired_separation(base, base, 500, 0) == (0.0, (0.0, 0.0), False)
    assert paired_separation(better, base, 0, 0)[1:] == (None, None)


def _row(fix: str, acc: float, audio: float, visual: float, balance: float, deployment: float | None = None) -> dict:
    return {"fix": fix, "accuracy": acc, "unimodal.audio": audio, "unimodal.visual": visual, "balance": balance,
            "deployment": deployment}


ROWS = [_row("none", 0.90, 0.9, 0.2, 0.3, 0.50), _row("a", 0.95, 0.9, 0.5, 0.6, 0.70),
        _row("b", 0.95, 0.9, 0.6, 0.9, 0.60), _row("c", 0.93, 0.8, 0.8, 0.9, 0.80)]


@pytest.mark.parametrize("objective, order", [
    ("fused", ["b", "a", "c", "none"]),       # a and b tie on fused: b has the better weakest (0.6)
    ("weakest", ["c", "b", "a", "none"]),
    ("balance", ["b", "c", "a", "none"]),     # b and c tie on balance: b has the better fused
    ("deployment", ["c", "a", "b", "none"]),
])
def test_ranking_by_each_objective(objective: str, order: list[str]) -> None:
    ranked = rank_rows(ROWS, objective, MODS)
    assert [r["fix"] for r in ranked] == order and [r["rank"] for r in ranked] == [1, 2, 3, 4]


def test_the_schema_knows_the_objectives() -> None:
    assert validation.SETTINGS["objective"].choices == OBJECTIVES


# ------------------------------------------------------------------------------------- training, resume


@pytest.fixture(scope="module")
def data() -> tuple[dict, dict]:
    return toy_split(DOMINANT, 0)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Every call of fit by the candidates: (fix, resumed)."""
    calls: list[tuple[str, bool]] = []
    real = candidate.fit

    def fit(adapter, train_data, spec, *, fix, resume, **kw):  # type: ignore[no-untyped-def]
        calls.append((fix.name, resume))
        return real(adapter, train_data, spec, fix=fix, resume=resume, **kw)

    monkeypatch.setattr(candidate, "fit", fit)
    return calls


def test_resume_trains_only_what_is_unfinished(tmp_path, data, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    train, val = data
    calls = _counting(monkeypatch)
    first = leaderboard(build, train, val_data=val, fixes="ogm_ge,arl", train=TRAIN, analysis=QUICK, out_dir=tmp_path)
    assert sorted(calls) == [("arl", False), ("none", False), ("ogm_ge", False)]
    calls.clear()
    # an interrupted run: arl stopped after its first epoch
    s = session_of(build, train, val_data=val, out_dir=tmp_path, train=TRAIN, analysis=QUICK, resume=True)
    final = {k: v.clone() for k, v in torch.load(tmp_path / "candidates/arl/checkpoint.pt")["model"].items()}
    for name in ("checkpoint.pt", "candidate.json"):
        (tmp_path / "candidates/arl" / name).unlink()
    train_candidate(candidate_job(s, "arl", {}, stop_after=1))
    calls.clear()
    again = leaderboard(build, train, val_data=val, fixes="ogm_ge,arl", train=TRAIN, analysis=QUICK,
                        out_dir=tmp_path, resume=True)
    assert calls == [("arl", True)]  # the finished ones are not trained again
    resumed = torch.load(tmp_path / "candidates/arl/checkpoint.pt")["model"]
    assert all(torch.equal(final[k], resumed[k]) for k in final)  # continuing is exact
    assert [r["fix"] for r in again.rows] == [r["fix"] for r in first.rows]
    assert again.row("arl")["accuracy"] == first.row("arl")["accuracy"]
    with open(tmp_path / "leaderboard.csv") as fh:
        assert [int(r["rank"]) for r in csv.DictReader(fh)] == [1, 2, 3]
    page = (tmp_path / "leaderboard.html").read_text()
    assert all(f"<td>{fix}</td>" in page for fix in ("none", "arl", "ogm_ge"))
    assert (tmp_path / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"


def test_a_candidate_is_trained_as_rebalance_trains_its_fix(tmp_path, data) -> None:  # type: ignore[no-untyped-def]
    from mmdiag.rebalance import rebalance

    train, val = data
    leaderboard(build, train, val_data=val, fixes="ogm_ge", train=TRAIN, analysis=QUICK, out_dir=tmp_path / "lb",
                formats=("csv",))
    single = rebalance(build, train, val_data=val, fix="ogm_ge", train=TRAIN,
                       analysis=AnalysisSpec(bootstrap=0, only=("unimodal",)))
    board = torch.load(tmp_path / "lb/candidates/ogm_ge/checkpoint.pt")["model"]
    assert all(torch.equal(board[k], v) for k, v in single.model.state_dict().items())


@pytest.mark.slow
def test_worker_processes_give_the_sequential_results(tmp_path, data) -> None:  # type: ignore[no-untyped-def]
    train, val = data
    # build is a module-level function, so it pickles for the worker processes
    one = leaderboard(build, train, val_data=val, fixes="ogm_ge,arl", train=TRAIN, analysis=QUICK,
                      out_dir=tmp_path / "one")
    two = leaderboard(build, train, val_data=val, fixes="ogm_ge,arl", train=TRAIN, analysis=QUICK,
                      out_dir=tmp_path / "two", jobs=2)
    keys = ("fix", "accuracy", "unimodal.audio", "unimodal.visual", "balance", "separated")
    assert [[r[k] for k in keys] for r in one.rows] == [[r[k] for k in keys] for r in two.rows]


def test_jobs_need_a_picklable_factory(tmp_path, data) -> None:  # type: ignore[no-untyped-def]
    train, val = data
    with pytest.raises(ConfigError, match="picklable"):
        leaderboard(lambda: build(), train, val_data=val, fixes="ogm_ge,arl", train=TRAIN, analysis=QUICK,
                    out_dir=tmp_path, jobs=2)


# ----------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, data) -> object:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("board")
    (d / "toy_model.py").write_text("from mmdiag.examples_data.synthetic import ToyNet\n\n"
                                    "def build():\n    return ToyNet(['audio', 'visual'])\n")
    np.savez(d / "train.npz", **data[0])
    np.savez(d / "val.npz", **data[1])
    return d


ARGS = ["rebalance", "--model", "toy_model.py:build", "--data", "train.npz", "--val-data", "val.npz", "--epochs", "1",
        "--lr", "0.05", "--device", "cpu", "--bootstrap", "50", "--format", "json,csv"]


def test_the_command_writes_the_leaderboard(ws) -> None:  # type: ignore[no-untyped-def]
    res = run([*ARGS, "--fix", "ogm_ge,arl", "--fix-param", "ogm_ge.alpha=0.3", "--objective", "weakest",
               "--missing", "visual=0.5", "--out", "lb"], ws)
    assert res.exit_code == 0, res.output
    with open(ws / "lb/leaderboard.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == leaderboard_columns(MODS, True)
    for r in rows:  # visual missing half the time, audio never: half fused, half audio alone
        expected = 0.5 * float(r["accuracy"]) + 0.5 * float(r["unimodal.audio"])
        assert float(r["deployment"]) == pytest.approx(expected)
    assert sorted(r["fix"] for r in rows) == ["arl", "none", "ogm_ge"]
    weakest = [min(float(r["unimodal.audio"]), float(r["unimodal.visual"])) for r in rows]
    assert weakest == sorted(weakest, reverse=True)
    saved = json.loads((ws / "lb/candidates/ogm_ge/candidate.json").read_text())
    assert saved["params"]["alpha"] == 0.3 and saved["epochs"] == 1
    assert "leaderboard by weakest" in res.output


@pytest.mark.parametrize("extra, message", [
    (["--fix", "ogm_ge,arll"], "Did you mean 'arl'"),
    (["--fix", "ogm_ge,arl", "--fix-param", "mmpareto.alpha=1"], "not among the fixes trained"),
    (["--fix", "ogm_ge,arl", "--fix-param", "alpha=0.5"], "no fix prefix"),
    (["--fix", "ogm_ge,arl", "--objective", "deployment"], "--missing"),
    (["--fix", "ogm_ge", "--candidates", "arl"], "--candidates"),
])
def test_bad_lists_exit_2_before_training(ws, extra: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    res = run([*ARGS, *extra, "--out", "bad"], ws)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (ws / "bad").exists()  # refused before anything is written
