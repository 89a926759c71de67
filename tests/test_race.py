"""The race: the successive-halving schedule and selection against hand computations with fake scores
(no training), the held-out split, a race on the toy (never reading the validation data to choose,
continuing exactly), and ``mmdiag rebalance --fix race`` end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmdiag.rebalance import halving as race_mod
from mmdiag.rebalance import race_run
from mmdiag.rebalance.candidate import TrainedCandidate
from mmdiag.rebalance.halving import Rung, halve, holdout_split, race_cost, race_schedule, run_rungs
from mmdiag.rebalance.race_run import race
from mmdiag.rebalance.scoring import Scores
from mmdiag.specs import AdapterSpec, AnalysisSpec, TrainSpec
from mmdiag.examples_data.synthetic import ToyNet
from tests.helpers.cli_run import run
from tests.helpers.dist import as_rank, free_port
from tests.helpers.toys import DOMINANT, toy_split

MODS = ("audio", "visual")


def build() -> ToyNet:
    return ToyNet(list(MODS))


@pytest.mark.parametrize("epochs, k, expected", [
    # R = ceil(log2 K) rungs at E // 2^(R-1-r) epochs (at least one more than the rung before, at most
    # E), keeping ceil(k/2) each time
    (20, 13, [Rung(2, 7), Rung(5, 4), Rung(10, 2), Rung(20, 1)]),
    (20, 17, [Rung(1, 9), Rung(2, 5), Rung(5, 3), Rung(10, 2), Rung(20, 1)]),
    (8, 17, [Rung(1, 9), Rung(2, 5), Rung(3, 3), Rung(4, 2), Rung(8, 1)]),   # 8//16 = 0, 8//8 = 1, 8//4 = 2: raised
    (3, 16, [Rung(1, 8), Rung(2, 4), Rung(3, 2), Rung(3, 1)]),               # capped at E
    (16, 4, [Rung(8, 2), Rung(16, 1)]),
    (5, 3, [Rung(2, 2), Rung(5, 1)]),
    (10, 1, []),
])
def test_the_schedule_by_hand(epochs: int, k: int, expected: list[Rung]) -> None:
    assert race_schedule(epochs, k) == expected


def _score(acc: float, audio: float = 0.5, visual: float = 0.5) -> Scores:
    return Scores(acc, None, {"audio": audio, "visual": visual}, 0.5, None, np.zeros(1))


def test_halving_keeps_the_better_half_ties_by_weakest() -> None:
    scores = {"a": _score(0.9), "b": _score(0.95, 0.9, 0.2), "c": _score(0.95, 0.9, 0.4), "d": _score(0.7)}
    assert halve(scores, 2, "fused", MODS) == ["c", "b"]
    assert halve(scores, 1, "weakest", MODS) == ["a"]  # 0.5 beats 0.4; a ties with d and wins on fused


def test_rungs_with_fake_scores_against_a_hand_computation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five candidates, E = 8: rungs at 2, 4, 8 epochs keeping 3, 2, 1 (no training: fake scores)."""
    table = {  # held-out fused accuracy by (fix, epochs)
        ("a", 2): 0.50, ("b", 2): 0.80, ("c", 2): 0.70, ("d", 2): 0.60, ("e", 2): 0.40,
        ("b", 4): 0.81, ("c", 4): 0.90, ("d", 4): 0.85,
        ("c", 8): 0.91, ("d", 8): 0.95,
    }
    trained: list[tuple[str, int]] = []

    def fake_train_all(jobs, processes, progress):  # type: ignore[no-untyped-def]
        trained.extend((j.fix, j.stop_after) for j in jobs)
        return [TrainedCandidate(j.fix, j.folder, j.stop_after, 1.0 * j.stop_after, 3, True) for j in jobs]

    monkeypatch.setattr(race_mod, "train_all", fake_train_all)
    scored: list[tuple[str, int]] = []

    def fake_score(s, job, held):  # type: ignore[no-untyped-def]
        scored.append((job.fix, job.stop_after))
        return _score(table[(job.fix, job.stop_after)])

    monkeypatch.setattr(race_mod, "held_score", fake_score)
    s = SimpleNamespace(adapter=AdapterSpec(modalities=MODS), train=TrainSpec(epochs=8), factory=build,
                        train_ds=None, init="scratch", checkpoint=None, load={}, out=tmp_path, extra={},
                        phase=lambda *a: None)
    out = run_rungs(s, {f: {} for f in "abcde"}, train_part=None, held=None, objective="fused", jobs=1)
    assert out.winner == "d"
    assert trained == [(f, 2) for f in "abcde"] + [(f, 4) for f in "bcd"] + [(f, 8) for f in "cd"]
    decided = [(r.fix, r.rung, r.epochs, r.decision) for r in out.rows]
    assert decided == [("a", 0, 2, "dropped"), ("b", 0, 2, "kept"), ("c", 0, 2, "kept"), ("d", 0, 2, "kept"),
                       ("e", 0, 2, "dropped"), ("b", 1, 4, "dropped"), ("c", 1, 4, "kept"), ("d", 1, 4, "kept"),
                       ("c", 2, 8, "dropped"), ("d", 2, 8, "winner")]
    # resumed, the race decides with the scores measured at each rung, not with the weights now on disk
    scored.clear()
    table.update({(f, e): 0.0 for f, e in table})
    again = run_rungs(s, {f: {} for f in "abcde"}, train_part=None, held=None, objective="fused", jobs=1)
    assert scored == [] and again.rows == out.rows
    cost = race_cost(out.trained, 8)
    # the last state of each: a, e at 2 epochs, b at 4, c, d at 8 = 24 candidate-epochs against 5 x 8
    assert (cost.epochs, cost.all_epochs) == (24, 40)
    assert cost.all_seconds == pytest.approx(40.0)  # 1 s per epoch each, measured


def test_the_holdout_split() -> None:
    train, held = holdout_split(100, 0.2, seed=3)
    assert len(held) == 20 and sorted(train + held) == list(range(100)) and not set(train) & set(held)
    assert holdout_split(100, 0.2, seed=3) == (train, held) and holdout_split(100, 0.2, seed=4)[1] != held
    assert len(holdout_split(3, 0.01, 0)[1]) == 1


class _Watched(torch.utils.data.Dataset):
    """The validation rows, counting every read."""

    def __init__(self, arrays: dict) -> None:
        self.arrays, self.reads = arrays, 0

    def __len__(self) -> int:
        return len(self.arrays["label"])

    def __getitem__(self, i: int) -> dict:
        self.reads += 1
        return {k: torch.as_tensor(v[i]) for k, v in self.arrays.items()}


def test_a_race_never_reads_the_validation_data_to_choose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = toy_split(DOMINANT, 0)
    watched = _Watched(val)
    seen: dict = {}

    def final(factory, train_part, *, val_data, fix, **kw):  # type: ignore[no-untyped-def]
        seen.update(reads=watched.reads, rows=list(train_part.rows), fix=fix.name, val=val_data)
        return "the rebalance result"

    monkeypatch.setattr(race_run, "rebalance", final)
    spec = TrainSpec(epochs=4, lr=0.05, device="cpu")
    out = race(build, train, val_data=watched, candidates="ogm_ge,arl,mmpareto", train=spec,
               analysis=AnalysisSpec(bootstrap=0), out_dir=tmp_path)
    assert seen["reads"] == 0 and seen["val"] is watched  # the report's data goes on to the analyses only
    held = set(range(600)) - set(seen["rows"])
    assert len(held) == out.held_out == 120
    assert out.winner == seen["fix"] and out.rebalance == "the rebalance result"
    with open(tmp_path / "race.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["fix", "rung", "epochs", "score", "decision"]
    assert [r["decision"] for r in rows].count("winner") == 1 and len(rows) == 3 + 2
    # rung by rung ends exactly where one run of the full budget ends (same rows, same seed)
    from mmdiag.adapter import ModelAdapter
    from mmdiag.rebalance.choice import make_fix
    from mmdiag.rebalance.halving import RowSubset
    from mmdiag.runtime.batching import as_dataset
    from mmdiag.train import fit

    torch.manual_seed(spec.seed)
    ref = build()
    fit(ModelAdapter(ref, MODS), RowSubset(as_dataset(train), seen["rows"]), spec, fix=make_fix(out.winner))
    got = torch.load(tmp_path / "candidates" / out.winner / "checkpoint.pt")["model"]
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
    assert json.loads((tmp_path / "race.json").read_text())["cost"]["all_epochs"] == 12


def test_the_command_runs_a_race(tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, val = toy_split(DOMINANT, 0)
    (tmp_path / "toy_model.py").write_text("from mmdiag.examples_data.synthetic import ToyNet\n\n"
                                          "def build():\n    return ToyNet(['audio', 'visual'])\n")
    np.savez(tmp_path / "train.npz", **train)
    np.savez(tmp_path / "val.npz", **val)
    res = run(["rebalance", "--model", "toy_model.py:build", "--data", "train.npz", "--val-data", "val.npz",
               "--fix", "auto", "--race", "--candidates", "ogm_ge,arl", "--holdout", "0.25", "--baseline", "--epochs",
               "2", "--lr", "0.05",
               "--device", "cpu", "--bootstrap", "50", "--only", "unimodal", "--format", "json", "--out", "r"],
              tmp_path)
    assert res.exit_code == 0, res.output
    for name in ("race.csv", "race.json", "comparison.json", "fix.json", "after/report.json", "baseline/report.json"):
        assert (tmp_path / "r" / name).is_file(), name
    fix = json.loads((tmp_path / "r/fix.json").read_text())
    assert fix["requested"] == "race" and fix["fix"] in ("ogm_ge", "arl") and "race.csv" in fix["note"]
    assert "race cost: 4 candidate-epochs" in res.output and "would train 4 epochs" in res.output
    assert json.loads((tmp_path / "r/race.json").read_text())["held_out_rows"] == 150  # 25% of 600


def _rank(rank: int, world: int, port: int, out: str) -> None:
    """One torchrun-like rank: a leaderboard, then a race twice in one folder (the second starts over)."""
    as_rank(rank, world, port)
    from mmdiag.rebalance import leaderboard
    from mmdiag.runtime import join, leave

    join("cpu")
    try:
        train, val = toy_split(DOMINANT, 0)
        spec, quick = TrainSpec(epochs=2, lr=0.05, device="cpu"), AnalysisSpec(bootstrap=0, only=("unimodal",))
        board = leaderboard(build, train, val_data=val, fixes="ogm_ge,arl", train=spec, analysis=quick,
                            out_dir=Path(out) / "board")
        for _ in range(2):
            result = race(build, train, val_data=val, candidates="none,ogm_ge,arl", baseline=True, train=spec,
                          analysis=quick, out_dir=Path(out) / "race", report_formats=("json",))
        Path(out, f"rank{rank}.json").write_text(json.dumps({"best": board.best["fix"], "winner": result.winner}))
    finally:
        leave()


@pytest.mark.slow
def test_under_two_processes_every_rank_trains_each_candidate(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank saw the same leaderboard and the same race
    with open(tmp_path / "race/race.csv") as fh:
        assert [r["fix"] for r in csv.DictReader(fh) if r["decision"] == "winner"] == [ranks[0]["winner"]]
    assert json.loads((tmp_path / "board/candidates/arl/candidate.json").read_text())["epochs"] == 2
