"""`mmdiag rebalance` through typer's runner, and the rebalance API's fix choice and comparison."""

from __future__ import annotations

import csv
import json
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmdiag.cli.app import app
from mmdiag.compare import COMPARISON_COLUMNS, compare_runs
from mmdiag.fixes import FIXES
from mmdiag.loading import load_checkpoint
from mmdiag.rebalance import FALLBACK_FIX, choose_fix, make_fix
from mmdiag.report import Report, Result, Verdict
from mmdiag.examples_data.synthetic import ToyNet
from tests.helpers.toys import DOMINANT, toy_split, trained_toy

runner = CliRunner()

MODEL_PY = textwrap.dedent('''
    from mmdiag.examples_data.synthetic import ToyNet

    def build(feat_dim=16):
        return ToyNet(["audio", "visual"], feat_dim=feat_dim)
''')
#: keeps each run small: few diagnostics, few bootstrap resamples, no plots
QUICK = ["--epochs", "2", "--lr", "0.05", "--device", "cpu", "--bootstrap", "50",
         "--only", "unimodal,shapley,reliance,combinations,probe", "--format", "json,csv", "--quiet"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rebalance")
    (d / "toy_model.py").write_text(MODEL_PY)
    train, val = toy_split(DOMINANT, 0)
    np.savez(d / "train.npz", **train)
    np.savez(d / "val.npz", **val)
    torch.save(trained_toy(DOMINANT, 0).state_dict(), d / "toy.pt")
    return d


def run(args: list[str], cwd: Path) -> Any:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, args, catch_exceptions=False)
    finally:
        os.chdir(old)


def base_args(out: str) -> list[str]:
    return ["rebalance", "--model", "toy_model.py:build", "--checkpoint", "toy.pt", "--data", "train.npz",
            "--val-data", "val.npz", "--out", out, *QUICK]


@pytest.fixture(scope="module")
def named_run(ws: Path) -> Path:
    res = run([*base_args("named"), "--fix", "ogm_ge", "--fix-param", "alpha=0.8", "--baseline"], ws)
    assert res.exit_code == 0, res.output
    return ws / "named"


def test_outputs_exist(named_run: Path) -> None:
    for name in ("model.safetensors", "history.csv", "checkpoint.pt", "fix.json", "comparison.json",
                 "comparison.csv", "run.json", "before/report.json", "after/report.json", "baseline/report.json",
                 "baseline/model.safetensors", "baseline/history.csv", "baseline/checkpoint.pt"):
        assert (named_run / name).is_file(), name
    assert not (named_run / "aux.pt").exists()  # ogm_ge adds no auxiliary module
    fix = json.loads((named_run / "fix.json").read_text())
    assert fix["fix"] == "ogm_ge" and fix["params"]["alpha"] == 0.8 and fix["requested"] == "ogm_ge"


def test_weights_are_the_users_own_keys(named_run: Path) -> None:
    model = ToyNet(["audio", "visual"])
    info = load_checkpoint(model, named_run / "model.safetensors")
    assert info.format == "safetensors" and not info.missing and not info.unexpected


def test_comparison_csv_columns_and_rows(named_run: Path) -> None:
    with open(named_run / "comparison.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == COMPARISON_COLUMNS
    keys = {r["key"] for r in rows}
    assert {"accuracy", "unimodal", "unimodal.audio", "unimodal.visual", "shapley.visual"} <= keys
    row = next(r for r in rows if r["key"] == "unimodal.visual")
    for col in ("before", "after", "baseline", "after_minus_before", "after_minus_baseline"):
        assert row[col] != ""
    assert float(row["after_minus_baseline"]) == pytest.approx(float(row["after"]) - float(row["baseline"]))
    assert row["separated_after_baseline"] in ("True", "False")
    data = json.loads((named_run / "comparison.json").read_text())
    assert data["fix"] == "ogm_ge" and data["columns"] == list(COMPARISON_COLUMNS)
    assert set(data["verdicts"]) == {"before", "after", "baseline"}


def test_history_has_signals(named_run: Path) -> None:
    with open(named_run / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    assert {"epoch", "loss", "val_accuracy", "unimodal_acc.visual", "signal.ratio.audio"} <= set(rows[0])


def test_fix_auto_records_the_recommendation(ws: Path) -> None:
    res = run([*base_args("auto"), "--fix", "auto"], ws)
    assert res.exit_code == 0, res.output
    fix = json.loads((ws / "auto" / "fix.json").read_text())
    before = Report.load(ws / "auto" / "before" / "report.json")
    assert fix["requested"] == "auto"
    assert fix["recommended"] == before.verdict.recommended_fix
    assert fix["reasons"] == before.verdict.reasons and fix["reasons"]
    expected = fix["recommended"] if fix["recommended"] in FIXES else FALLBACK_FIX
    assert fix["used"] == expected == fix["fix"]
    assert json.loads((ws / "auto" / "comparison.json").read_text())["choice"]["used"] == expected
    assert [line for line in res.stdout.splitlines() if line.strip()] == [res.stdout.strip()]  # --quiet: one line


def test_the_choice_is_said_before_training_and_the_after_verdict_after(ws: Path) -> None:
    loud = [a for a in base_args("auto_loud") if a != "--quiet"]
    res = run([*loud, "--fix", "auto", "--baseline"], ws)
    assert res.exit_code == 0, res.output
    text = res.output
    assert text.index("fix auto ->") < text.index("train after")
    assert "verdict after" in text and "better" in text and "lower: more even" in text


def test_resume_continues_with_the_saved_settings(ws: Path, named_run: Path) -> None:
    res = run(["rebalance", "--resume", "named", "--quiet"], ws)
    assert res.exit_code == 0, res.output
    assert "resumed" in json.dumps(json.loads((ws / "named" / "comparison.json").read_text())["notes"])
    res = run(["rebalance", "--resume", "named", "--lr", "0.5"], ws)
    assert res.exit_code == 2 and "--lr" in res.output


def test_config_table(ws: Path) -> None:
    (ws / "rb.toml").write_text(textwrap.dedent('''
        model = "toy_model.py:build"
        data = "train.npz"
        only = "unimodal"

        [model_kwargs]
        feat_dim = 8

        [rebalance]
        fix = "modality_dropout"
        epochs = 1
        val_data = "val.npz"

        [rebalance.fix_params]
        beta = 0.5
        ogm_ge = { alpha = 0.9 }

        [collect]
        permutations = 2
    '''))
    res = run(["rebalance", "--config", "rb.toml", "--out", "cfg", "--device", "cpu", "--bootstrap", "20",
               "--format", "json", "--quiet"], ws)
    assert res.exit_code == 0, res.output
    fix = json.loads((ws / "cfg" / "fix.json").read_text())
    assert fix["fix"] == "modality_dropout" and fix["params"]["beta"] == 0.5
    with open(ws / "cfg" / "history.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 1
    assert not (ws / "cfg" / "before").exists()  # no checkpoint, no before analysis
    after = json.loads((ws / "cfg" / "after" / "report.json").read_text())
    assert after["settings"]["collect"]["permutations"] == 2 and after["settings"]["collect"]["device"] == "cpu"
    model = ToyNet(["audio", "visual"], feat_dim=8)
    load_checkpoint(model, ws / "cfg" / "model.safetensors")


@pytest.mark.parametrize("extra, message", [
    (["--fix", "ogm_gee"], "ogm_ge"),
    (["--fix", "ogm_ge", "--fix-param", "alpah=1"], "alpha"),
    (["--fix", "ogm_ge", "--fix-param", "alpha"], "KEY=VALUE"),
    (["--fix", "ogm_ge", "--fix-param", "mode=ogm3"], "mode"),
    (["--optimizer", "rmsprop"], "optimizer"),
    (["--init", "warm"], "init"),
    (["--epochs", "0"], "epochs"),
])
def test_config_errors_exit_2(ws: Path, extra: list[str], message: str) -> None:
    res = run([*base_args("bad"), *extra], ws)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not (ws / "bad" / "checkpoint.pt").exists()


def test_load_errors_exit_2(ws: Path) -> None:
    res = run(["rebalance", "--model", "toy_model.py:build", "--data", "train.npz", "--init", "checkpoint",
               "--out", "bad2", *QUICK], ws)
    assert res.exit_code == 2 and "--checkpoint" in res.output
    res = run(["rebalance", "--model", "toy_model.py:nope", "--data", "train.npz", "--out", "bad3", *QUICK], ws)
    assert res.exit_code == 2 and "nope" in res.output
    res = run(["rebalance", "--model", "toy_model.py:build", "--data", "missing.npz", "--out", "bad4", *QUICK], ws)
    assert res.exit_code == 2 and "missing.npz" in res.output
    (ws / "bad.toml").write_text('[rebalance]\nepoks = 3\n')
    res = run(["rebalance", "--config", "bad.toml", "--out", "bad5", *QUICK], ws)
    assert res.exit_code == 2 and "epochs" in res.output
    res = run(["rebalance", "--resume", "nowhere"], ws)
    assert res.exit_code == 2 and "run.json" in res.output


def test_an_earlier_run_is_not_overwritten_silently(ws: Path, named_run: Path) -> None:
    res = run([*base_args("named"), "--fix", "ogm_ge"], ws)
    assert res.exit_code == 2 and "--resume" in res.output and "--overwrite" in res.output


# ------------------------------------------------------------------------------------- API
def _report(recommended: str | None) -> Report:
    res = Result("unimodal", 0.3, {"a": 0.9, "b": 0.6}, ci={"a": [0.85, 0.95], "b": [0.5, 0.7]})
    verdict = Verdict("a" if recommended else None, ["b"] if recommended else [], "strong" if recommended else "none",
                      recommended, ["a dominates"])
    return Report(["a", "b"], 100, 0.95, {}, {"unimodal": res}, [], verdict)


def test_choose_fix_falls_back_when_unregistered_or_none() -> None:
    assert choose_fix(_report("ogm_ge"))["used"] == "ogm_ge"
    unknown = choose_fix(_report("reconboost"))
    assert unknown["used"] == FALLBACK_FIX and unknown["recommended"] == "reconboost"
    assert "not a registered fix" in unknown["note"]
    none = choose_fix(_report(None))
    assert none["used"] == FALLBACK_FIX and none["recommended"] is None and "recommends no fix" in none["note"]


def test_compare_runs_differences_and_separation() -> None:
    before, after = _report("ogm_ge"), _report("ogm_ge")
    after.diagnostics["unimodal"] = Result("unimodal", 0.1, {"a": 0.9, "b": 0.8}, ci={"a": [0.85, 0.95], "b": [0.75, 0.85]})
    rows = {r["key"]: r for r in compare_runs(after, before, None, {"after": [0.9, 1.0], "before": [0.9, 1.0]})}
    assert rows["unimodal.b"]["after_minus_before"] == pytest.approx(0.2)
    assert rows["unimodal.b"]["separated_after_before"] is True
    assert rows["unimodal.a"]["separated_after_before"] is False
    assert rows["unimodal"]["separated_after_before"] is None  # no interval on the headline
    assert rows["accuracy"]["baseline"] is None and rows["accuracy"]["after_minus_baseline"] is None


def test_make_fix_parses_text_values() -> None:
    fix = make_fix("ogm_ge", {"alpha": "1", "end_epoch": "none", "agm": {"alpha": 5.0}, "agm.cap": 3})
    assert fix.alpha == 1.0 and isinstance(fix.alpha, float) and fix.end_epoch is None
    assert make_fix("agm", {"agm": {"alpha": 5.0}, "agm.cap": 3}).params()["cap"] == 3


@pytest.mark.parametrize("name", ["mmanet", "dmrnet", "restore"])
def test_missing_modality_fixes_keep_the_uniform_mix_and_say_so(name: str) -> None:
    from mmdiag.rebalance.choice import deployment_training_note

    dep = {"missing": {"audio": 0.4}}
    note = deployment_training_note(name, {"dmrnet.beta": "0.3"}, dep)
    assert note is not None and note.startswith(f"{name} trains on the uniform mix over the non-empty combinations")
    assert "deployment distribution of `missing` (independent missing rates audio=0.4)" in note
    assert "`fix_params` missing=audio=0.4 trains it on that distribution instead" in note
    # the parameters are the user's: the fix keeps its uniform default
    fix = make_fix(name, {"dmrnet.beta": "0.3"})
    assert fix.missing is None and fix.combinations is None
    combos = {"combinations": {"audio+visual": 0.7, "visual": 0.3}}
    said = deployment_training_note(name, None, combos)
    assert said is not None and "`combinations` (combinations audio+visual=0.7, visual=0.3)" in said
    assert "`fix_params` combinations=audio+visual=0.7,visual=0.3" in said
    # the value the note offers is one the fix takes, and it draws the deployment distribution
    from mmdiag.fixes._combinations import mask_distribution

    offered = make_fix(name, {"missing": "audio=0.4"})
    mods = ["audio", "visual"]
    assert (mask_distribution(mods, offered.missing, offered.combinations)
            == pytest.approx(mask_distribution(mods, **dep)))
    assert mask_distribution(mods, fix.missing, fix.combinations) != pytest.approx(mask_distribution(mods, **dep))
    # a setting of the fix's own (an explicit uniform none included, or one for this fix only): no note
    for own in ({"missing": "visual=0.2"}, {"missing": "none"}, {f"{name}.combinations": "visual=1"},
                {name: {"missing": "audio=0.1"}}):
        assert deployment_training_note(name, own, dep) is None
    assert make_fix(name, {"missing": "none"}).missing is None
    assert deployment_training_note(name, None, None) is None
    assert deployment_training_note(name, None, {"missing": None, "combinations": None}) is None


def test_fixes_without_a_training_distribution_get_no_note() -> None:
    from mmdiag.rebalance.choice import deployment_training_note

    for name in ("ogm_ge", "modality_dropout", "none"):
        assert deployment_training_note(name, {"x": 1}, {"missing": {"audio": 0.4}}) is None


def test_gradient_scaling_fix_under_adam_says_so(ws: Path) -> None:
    args = ["rebalance", "--model", "toy_model.py:build", "--data", "train.npz", "--out", "adam", "--fix", "ogm_ge",
            "--optimizer", "adam", "--epochs", "1", "--device", "cpu", "--only", "unimodal", "--bootstrap", "0",
            "--format", "json"]
    res = run(args, ws)
    assert res.exit_code == 0, res.output
    notes = json.loads((ws / "adam" / "comparison.json").read_text())["notes"]  # the library's words
    assert any("ogm_ge acts by rescaling gradients" in n and "`optimizer='sgd'`" in n for n in notes), notes
    printed = " ".join(res.stdout.split())  # the command line's words: the flag
    assert "ogm_ge acts by rescaling gradients" in printed and "(try --optimizer sgd)" in printed, res.stdout
    assert FIXES.get("ogm_ge").scales_gradients and FIXES.get("agm").scales_gradients
    assert not FIXES.get("modality_dropout").scales_gradients
