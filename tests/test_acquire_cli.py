"""``mmdiag acquire``: rank a pool (files, columns, the policy round trip, errors exit 2) and a tiny
simulation through the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from mmdiag.acquire.curves import area
from tests.helpers.cli_run import run
from tests.helpers.toys import DOMINANT, toy_split, trained_toy

FACTORY = "from mmdiag.examples_data.synthetic import ToyNet\n\ndef build():\n    return ToyNet(['audio', 'visual'])\n"


@pytest.fixture()
def folder(tmp_path):
    train, val = toy_split(DOMINANT)
    np.savez(tmp_path / "labelled.npz", **train)
    np.savez(tmp_path / "val.npz", **val)
    np.savez(tmp_path / "pool.npz", **{k: v for k, v in val.items() if k != "label"})  # unlabelled
    torch.save(trained_toy(DOMINANT).state_dict(), tmp_path / "model.pt")
    (tmp_path / "model.py").write_text(FACTORY)
    return tmp_path


def rank(folder, out: str, *extra: str):
    return run(["acquire", "--model", "model.py:build", "--checkpoint", "model.pt", "--labelled", "labelled.npz",
                "--pool", "pool.npz", "--budget", "7", "--out", out, "-q", *extra], cwd=folder)


def read_csv(path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_rank_a_pool_writes_the_selection_report_and_policy(folder) -> None:
    res = rank(folder, "r1", "--val-data", "val.npz")
    assert res.exit_code == 0, res.output
    rows = read_csv(folder / "r1" / "selection.csv")
    assert [int(r["rank"]) for r in rows] == list(range(1, 8))
    assert len({r["pool_index"] for r in rows}) == 7
    assert {"score", "diversity", "difficulty", "u_fused", "conflict", "u.audio", "u.visual", "weight.audio",
            "weight.visual"} <= set(rows[0])
    report = json.loads((folder / "r1" / "report.json").read_text())
    assert report["target"] == "visual" and "visual" in res.output
    policy = json.loads((folder / "r1" / "policy.json").read_text())
    assert policy["evaluation"]["accuracy"] > 0.5  # kept so the next round can be rewarded
    res2 = rank(folder, "r2", "--val-data", "val.npz", "--policy", "r1/policy.json")
    assert res2.exit_code == 0, res2.output
    assert "AMCB reward of the last round: +0.0000" in res2.output  # the same model: no gain
    assert len(json.loads((folder / "r2" / "policy.json").read_text())["history"]) == 2


def test_rank_errors_exit_2_with_what_to_try(folder) -> None:
    cases = [
        (["--budget", "9999"], "between 1 and the pool size 400"),
        (["--strategy", "coreset"], "--strategy must be rlmba"),
        (["--policy", "missing.json"], "does not exist"),
    ]
    for k, (extra, words) in enumerate(cases):
        res = rank(folder, f"e{k}", *extra)
        assert res.exit_code == 2, res.output
        assert words in res.output
    res = run(["acquire", "--model", "model.py:build", "--pool", "val.npz", "--modalities", "audio,video",
               "--out", "e9", "-q"], cwd=folder)
    assert res.exit_code == 2 and "no array for modality video" in res.output


def test_simulate_through_the_cli(folder) -> None:
    args = ["acquire", "--simulate", "--model", "model.py:build", "--data", "labelled.npz", "--val-data", "val.npz",
            "--initial", "40", "--budget", "20", "--rounds", "1", "--seeds", "2", "--epochs", "2",
            "--strategies", "rlmba,random", "--out", "sim", "-q"]
    res = run(args, cwd=folder)
    assert res.exit_code == 0, res.output
    curves = read_csv(folder / "sim" / "curves.csv")
    assert list(curves[0]) == ["strategy", "seed", "round", "labels", "accuracy", "unimodal.audio",
                               "unimodal.visual", "balance"]
    assert len(curves) == 2 * 2 * 2
    assert (folder / "sim" / "curves.png").stat().st_size > 1000
    summary = read_csv(folder / "sim" / "summary.csv")
    row = next(r for r in summary if r["strategy"] == "rlmba" and r["curve"] == "weakest")
    per_seed = []
    for seed in ("0", "1"):
        pts = [r for r in curves if r["strategy"] == "rlmba" and r["seed"] == seed]
        per_seed.append(area([int(p["labels"]) for p in pts],
                             [min(float(p["unimodal.audio"]), float(p["unimodal.visual"])) for p in pts]))
    assert float(row["area"]) == pytest.approx(np.mean(per_seed))
    again = run(args, cwd=folder)
    assert again.exit_code == 2 and "--resume" in again.output
    assert run(args + ["--resume"], cwd=folder).exit_code == 0
