"""deployment: expected accuracy under a distribution of missing modalities, its parsing, gate keys,
the missing-modality verdict rule and the command-line flags."""

from __future__ import annotations

import itertools
import json
import textwrap

import numpy as np
import pytest
import torch

from mmdiag import verdict as verdict_mod
from mmdiag.api import analyze_evidence, build_diagnostics
from mmdiag.cli.gate_cmd import deployed
from mmdiag.deployment import distribution, parse_combinations, parse_missing
from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.errors import ConfigError
from mmdiag.evidence import Evidence, mask_of
from mmdiag.gate import evaluate
from mmdiag.verdict import VerdictThresholds, judge
from tests.helpers.cli_run import run
from tests.helpers.fake import fake_evidence
from tests.helpers.toys import DOMINANT, toy_evidence, toy_split, trained_toy

Deployment = DIAGNOSTICS.get("deployment")

# ------------------------------------------------------------------------------------------ known answer

#: 0/1 correctness of the four rows, by subset: a alone 2 of 4, b alone 1 of 4, both 4 of 4
CORRECT = {1: [1, 1, 0, 0], 2: [1, 0, 0, 0], 3: [1, 1, 1, 1], 0: [0, 0, 0, 0]}


def hand_evidence() -> Evidence:
    """Two modalities a, b; labels all 0; the subset logits say class 0 exactly where CORRECT has 1."""
    subsets = torch.zeros(4, 4, 2)
    for mask, ok in CORRECT.items():
        subsets[mask, :, 0] = torch.tensor(ok, dtype=torch.float32)
        subsets[mask, :, 1] = 0.5
    return Evidence(modalities=("a", "b"), n_classes=2, labels=torch.zeros(4, dtype=torch.long),
                    logits=subsets[3].clone(), index=torch.arange(4), subsets=subsets)


def test_independent_rates_known_answer():
    # P(a+b) = .5*.8 = .4, P(a) = .5*.2 = .1, P(b) = .5*.8 = .4, P(none) = .1, excluded: Q = P / .9
    res = Deployment(bootstrap=0, missing="a=0.5,b=0.2").compute(hand_evidence())
    expected = (0.4 * 1.0 + 0.1 * 0.5 + 0.4 * 0.25) / 0.9
    assert res.value == pytest.approx(expected)
    d = res.details
    assert d["p_empty"] == pytest.approx(0.1) and "excluded" in d["empty"]
    assert d["probability"] == pytest.approx({"a": 0.1 / 0.9, "b": 0.4 / 0.9, "a+b": 0.4 / 0.9})
    assert d["accuracy"] == pytest.approx({"a": 0.5, "b": 0.25, "a+b": 1.0})
    assert sum(d["weighted"].values()) == pytest.approx(expected)
    # cost Q(S) (A(all) - A(S)): a 1/9 * .5, b 4/9 * .75: b costs most
    assert d["cost"] == pytest.approx({"a": 0.5 / 9, "b": 3.0 / 9, "a+b": 0.0})
    assert d["worst"] == "b" and d["worst_accuracy"] == pytest.approx(0.25)
    # a never missing (the served requests): b alone becomes a+b -> 8/9 * 1 + 1/9 * .5;
    # b never missing: a alone becomes a+b -> 5/9 * 1 + 4/9 * .25
    assert res.per_modality == pytest.approx({"a": 8.5 / 9 - expected, "b": 6.0 / 9 - expected})
    assert d["expected_empty_at_chance"] == pytest.approx(0.9 * expected + 0.1 * 0.5)
    assert d["distribution"] == "missing" and d["missing_rates"] == {"a": 0.5, "b": 0.2}
    assert d["full_accuracy"] == 1.0 and d["drop"] == pytest.approx(1.0 - expected)


def test_combinations_known_answer_and_a_modality_never_missing():
    res = Deployment(bootstrap=0, combinations={"a+b": 0.6, "b": 0.4}).compute(hand_evidence())
    assert res.value == pytest.approx(0.6 + 0.4 * 0.25)
    assert res.details["worst"] == "b" and res.details["p_empty"] == 0.0
    assert res.per_modality == pytest.approx({"a": 1.0 - 0.7, "b": 0.0})  # b is always there


def test_uniform_without_a_distribution_says_so():
    res = Deployment(bootstrap=0).compute(hand_evidence())
    assert res.value == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    assert res.details["distribution"] == "uniform"
    assert "uniform" in res.details["note"] and "uniform" in res.headline


def reference(ev: Evidence, rates: dict[str, float]) -> tuple[float, dict[str, float]]:
    """Slow and plain: loop over the present/missing patterns; the all-missing one is left out and
    the rest renormalised; for L_m the same patterns with m present."""
    def accuracy(members: list[str]) -> float:
        z = ev.subsets[mask_of(members, ev.modalities)]
        return float((z.argmax(-1) == ev.labels).double().mean())

    def expected(add: str | None) -> float:
        total, mass = 0.0, 0.0
        for present in itertools.product([0, 1], repeat=ev.n_modalities):
            members = [m for m, on in zip(ev.modalities, present) if on]
            if not members:
                continue
            p = float(np.prod([(1 - rates[m]) if on else rates[m] for m, on in zip(ev.modalities, present)]))
            total += p * accuracy(sorted(set(members) | ({add} if add else set()), key=ev.modalities.index))
            mass += p
        return total / mass

    e = expected(None)
    return e, {m: expected(m) - e for m in ev.modalities}


@pytest.mark.parametrize("m_count", [2, 3])
def test_matches_a_plain_reference(m_count):
    ev = fake_evidence(m_count, n=120, seed=5 + m_count)
    rates = {m: 0.1 + 0.2 * j for j, m in enumerate(ev.modalities)}
    res = Deployment(bootstrap=50, missing=rates).compute(ev)
    e, losses = reference(ev, rates)
    assert res.value == pytest.approx(e)
    assert res.per_modality == pytest.approx(losses)
    lo, hi = res.value_ci
    assert lo <= res.value <= hi


def test_direction_on_the_dominance_toy():
    ev = toy_evidence(DOMINANT, 0, kinds=("subsets",))
    res = Deployment(bootstrap=50, missing="audio=0.5,visual=0.5").compute(ev)
    assert res.per_modality["audio"] > res.per_modality["visual"] + 0.1  # losing audio hurts: it carries the signal
    assert res.details["worst"] == "visual"  # visual alone is the costly combination


# ---------------------------------------------------------------------------------------------- parsing


def test_both_forms_parse_and_agree():
    assert parse_missing("rgb=0.3, depth=0.5") == parse_missing(["rgb=0.3", "depth=0.5"]) == \
        parse_missing({"rgb": 0.3, "depth": 0.5}) == {"rgb": 0.3, "depth": 0.5}
    assert parse_combinations({"rgb+depth": 0.6, "depth": 0.4}) == {"depth+rgb": 0.6, "depth": 0.4}
    p = distribution(combinations={"depth+rgb": 0.6, "depth": 0.4, "none": 0.0}).probabilities(["rgb", "depth"])
    assert p.tolist() == pytest.approx([0.0, 0.0, 0.4, 0.6])
    q = distribution("rgb=0.3,depth=0.5").probabilities(["rgb", "depth"])
    assert q.tolist() == pytest.approx([0.15, 0.35, 0.15, 0.35]) and q.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("missing, combinations, match", [
    ("rgb=1.5", None, "between 0 and 1"),
    ("rgb=x", None, "must be a number"),
    ("rgb", None, "NAME=VALUE"),
    ("rgb=0.1,rgb=0.2", None, "twice"),
    (None, {"rgb": 0.5, "depth": 0.4}, "sum to 1"),
    (None, {"rgb+depth": 0.5, "depth+rgb": 0.5}, "twice"),
    (None, {"rgb++depth": 1.0}, "empty part"),
    ("rgb=0.1", {"rgb": 1.0}, "not both"),
])
def test_refusals(missing, combinations, match):
    with pytest.raises(ConfigError, match=match):
        distribution(missing, combinations)


def test_unknown_modalities_and_an_all_missing_distribution_are_refused():
    with pytest.raises(ConfigError, match="not a modality of this model.*Did you mean 'depth'"):
        distribution("dept=0.3").probabilities(["rgb", "depth"])
    with pytest.raises(ConfigError, match="names modality 'ir'"):
        distribution(combinations={"rgb+ir": 1.0}).probabilities(["rgb", "depth"])
    with pytest.raises(ConfigError, match="always missing"):
        distribution("rgb=1,depth=1").probabilities(["rgb", "depth"])
    with pytest.raises(ConfigError, match="rate of 'rgb'"):  # when the diagnostic is built
        build_diagnostics(["deployment"], {"deployment": {"missing": "rgb=2"}})
    with pytest.raises(ConfigError, match="not a modality"):  # before anything is computed
        analyze_evidence(hand_evidence(), only=["deployment"], params={"deployment": {"missing": "c=0.1"}}, bootstrap=0)


def test_the_empty_combination_listed_explicitly_is_reported_and_excluded():
    res = Deployment(bootstrap=0, combinations={"none": 0.2, "a+b": 0.8}).compute(hand_evidence())
    assert res.details["p_empty"] == pytest.approx(0.2) and res.value == pytest.approx(1.0)
    assert "probability 0.2" in res.details["note"]


# ---------------------------------------------------------------------------------- gate keys and gate

def test_gate_keys_and_the_gate_reweighting():
    report = analyze_evidence(hand_evidence(), only=["deployment"], bootstrap=200,
                              params={"deployment": {"missing": "a=0.5,b=0.2"}})
    res = report.diagnostics["deployment"]
    out = evaluate(report, ["deployment >= 0.5", "deployment.worst <= 0.3", "deployment.a >= 0.2"], bound="point")
    assert [o.status for o in out.outcomes] == ["PASS", "PASS", "PASS"]
    worst = evaluate(report, ["deployment.worst <= 0.9"]).outcomes[0]
    assert worst.value == pytest.approx(0.25) and worst.interval == sorted(res.details["worst_ci"])
    assert evaluate(report, ["deployment.wrost >= 0"]).outcomes[0].suggestion == "deployment.worst"
    # the gate re-weights the report to another distribution: exact point values, no interval
    same = deployed(report, {"missing": {"a": 0.5, "b": 0.2}})
    assert same.diagnostics["deployment"] is res
    other = deployed(report, {"combinations": {"a+b": 0.6, "b": 0.4}})
    assert other.diagnostics["deployment"].value == pytest.approx(0.7)
    assert other.diagnostics["deployment"].details["worst"] == "b"
    point = evaluate(other, ["deployment >= 0.69"], bound="point").outcomes[0]
    assert point.status == "PASS"
    ci = evaluate(other, ["deployment >= 0.69"]).outcomes[0]
    assert ci.status == "ERROR" and "recomputed by the gate" in ci.message and "point" in ci.message


# --------------------------------------------------------------------------------------------- verdict

def result_with(value: float, full: float, source: str):
    ev = hand_evidence()
    res = Deployment(bootstrap=0, missing="a=0.5,b=0.2").compute(ev)
    details = {**res.details, "distribution": source, "full_accuracy": full}
    return {"deployment": type(res)(**{**res.__dict__, "value": value, "details": details})}


def test_the_missing_modality_rule(monkeypatch):
    t = VerdictThresholds()
    found = list(verdict_mod._missing_modality(result_with(0.80, 0.90, "missing"), None, [], t))
    assert [f.problem for f in found] == ["missing_modality"] and "0.10 below" in found[0].reason
    assert not list(verdict_mod._missing_modality(result_with(0.87, 0.90, "missing"), None, [], t))
    assert not list(verdict_mod._missing_modality(result_with(0.50, 0.90, "uniform"), None, [], t))
    # no dominance claim (no contribution measure ran), and still the fix that targets it
    monkeypatch.setattr(verdict_mod, "fixes_for", lambda problem, has_encoders=None:
                        ["mmanet"] if problem == "missing_modality" else [])
    v = judge(result_with(0.80, 0.90, "missing"), ["a", "b"], t)
    assert v.recommended_fix == "mmanet" and v.severity == "none"
    assert any("deployment:" in r for r in v.reasons) and "recommended fix: mmanet" in v.headline()
    assert judge(result_with(0.80, 0.90, "missing"), ["a", "b"], VerdictThresholds(deployment_drop=0.2)
                 ).recommended_fix is None


# ------------------------------------------------------------------------------------------ command line

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy")
    (d / "models.py").write_text(textwrap.dedent('''
        def toy():
            from mmdiag.examples_data.synthetic import ToyNet
            return ToyNet(["audio", "visual"])
    '''))
    np.savez(d / "test.npz", **toy_split(DOMINANT, 0)[1])
    torch.save(trained_toy(DOMINANT, 0).state_dict(), d / "toy.pt")
    return d


def analyze_args(ws, out):
    return ["analyze", "--model", f"{ws}/models.py:toy", "--checkpoint", f"{ws}/toy.pt", "--data",
            f"{ws}/test.npz", "--out", str(out), "--bootstrap", "50", "--only", "deployment", "--device", "cpu"]


def test_cli_missing_flag_config_table_and_gate(workspace, tmp_path):
    res = run([*analyze_args(workspace, tmp_path / "r"), "--missing", "audio=0.5,visual=0.1"])
    assert res.exit_code == 0, res.output
    dep = json.loads((tmp_path / "r" / "report.json").read_text())["diagnostics"]["deployment"]
    assert dep["params"]["missing"] == {"audio": 0.5, "visual": 0.1} and "expected (given)" in res.output
    # [deployment] combinations in the config; the uniform default says so in the summary
    (tmp_path / "mmdiag.toml").write_text('[deployment]\ncombinations = {"audio+visual" = 0.6, "visual" = 0.4}\n')
    res = run([*analyze_args(workspace, tmp_path / "c"), "--config", str(tmp_path / "mmdiag.toml")])
    assert res.exit_code == 0, res.output
    dep = json.loads((tmp_path / "c" / "report.json").read_text())["diagnostics"]["deployment"]
    assert dep["details"]["probability"]["visual"] == pytest.approx(0.4)
    res = run(analyze_args(workspace, tmp_path / "u"))
    assert res.exit_code == 0 and "expected (uniform)" in res.output
    # refusals exit 2 before the model runs
    bad = run([*analyze_args(workspace, tmp_path / "b"), "--missing", "audio=0.5,vision=0.1"])
    assert bad.exit_code == 2 and "vision" in bad.output and "--missing" in bad.output
    # the gate reads deployment and deployment.worst, and re-weights under --missing
    report = tmp_path / "r" / "report.json"
    ok = run(["gate", str(report), "--rule", "deployment >= 0.3", "--rule", "deployment.worst >= 0.2"])
    assert ok.exit_code == 0, ok.output
    again = run(["gate", str(report), "--missing", "audio=0.9", "--bound", "point", "--json",
                 "--rule", "deployment >= 0"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["outcomes"][0]["value"] < dep["value"]


def test_cli_rebalance_passes_the_distribution_to_its_analyses(workspace, tmp_path):
    np.savez(tmp_path / "train.npz", **toy_split(DOMINANT, 0)[0])
    res = run(["rebalance", "--model", f"{workspace}/models.py:toy", "--checkpoint", f"{workspace}/toy.pt",
               "--data", str(tmp_path / "train.npz"), "--val-data", f"{workspace}/test.npz", "--fix", "ogm_ge",
               "--epochs", "1", "--device", "cpu", "--bootstrap", "20", "--only", "deployment", "--format", "json",
               "--quiet", "--missing", "audio=0.4", "--out", str(tmp_path / "rb")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "rb" / "run.json").read_text())
    assert saved["tables"]["params"]["deployment"] == {"missing": {"audio": 0.4}}  # kept for --resume
    for stage in ("before", "after"):
        dep = json.loads((tmp_path / "rb" / stage / "report.json").read_text())["diagnostics"]["deployment"]
        assert dep["params"]["missing"] == {"audio": 0.4} and dep["details"]["distribution"] == "missing"


def test_cli_rebalance_keeps_a_missing_modality_fix_on_the_uniform_mix(workspace, tmp_path):
    np.savez(tmp_path / "train.npz", **toy_split(DOMINANT, 0)[0])
    args = ["rebalance", "--model", f"{workspace}/models.py:toy", "--data", str(tmp_path / "train.npz"),
            "--val-data", f"{workspace}/test.npz", "--epochs", "1", "--device", "cpu", "--bootstrap", "0",
            "--only", "deployment", "--format", "json", "--missing", "audio=0.4"]
    res = run([*args, "--fix", "dmrnet", "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    fix = json.loads((tmp_path / "d" / "fix.json").read_text())
    assert fix["params"]["missing"] is None and fix["params"]["combinations"] is None  # --missing: not the fix's
    printed = " ".join(res.output.split())
    assert ("note: dmrnet trains on the uniform mix over the non-empty combinations, not on the deployment "
            "distribution of --missing (independent missing rates audio=0.4); --fix-param missing=audio=0.4 "
            "trains it on that distribution instead (see docs/deployment.md)") in printed, res.output
    notes = json.loads((tmp_path / "d" / "comparison.json").read_text())["notes"]
    assert any("uniform mix" in n and "`fix_params` missing=audio=0.4" in n for n in notes), notes
    # the flag the note offers trains the fix on the deployment distribution, and silences the note
    res = run([*args, "--fix", "dmrnet", "--fix-param", "missing=audio=0.4", "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    fix = json.loads((tmp_path / "m" / "fix.json").read_text())
    assert fix["params"]["missing"] == "audio=0.4" and fix["params"]["combinations"] is None
    assert "uniform mix" not in res.output
    res = run([*args, "--fix", "dmrnet", "--fix-param", "combinations=visual=1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    fix = json.loads((tmp_path / "o" / "fix.json").read_text())
    assert fix["params"]["missing"] is None and fix["params"]["combinations"] == "visual=1"
    assert "uniform mix" not in res.output
