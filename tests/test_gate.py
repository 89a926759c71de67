"""The gate: rule grammar, evaluation (bounds, baseline, missing keys), outputs and exit codes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mmdiag.cli.app import app
from mmdiag.errors import GateError
from mmdiag.gate import (Baseline, Rule, evaluate, format_rule, measure, parse_rule, to_junit, to_markdown)
from mmdiag.report import Failure, Report, Result, Verdict

from tests.test_render import synthetic_report


def small_report(**over) -> Report:
    """Two modalities, numbers chosen so that ci and point bounds disagree."""
    shapley = Result("shapley", 0.30, {"audio": 0.50, "visual": 0.20},
                     ci={"audio": [0.45, 0.55], "visual": [0.12, 0.26]}, value_ci=[0.22, 0.38],
                     details={"shares": {"audio": 0.7, "visual": 0.3}, "total": 0.7, "weakest": "visual",
                              "curve": [0.1, 0.2, 0.3], "missing": None})
    reliance = Result("reliance", 0.25, {"audio": 0.30, "visual": 0.05}, ci={"audio": [0.25, 0.35]})
    balance = Result("balance", 0.62, {"audio": 0.7, "visual": 0.3}, value_ci=[0.55, 0.70])
    empty = Result("unimodal", None, {"audio": 0.9, "visual": float("nan")})
    kw = dict(modalities=["audio", "visual"], n_samples=400, accuracy=0.93, settings={"seed": 0},
              diagnostics={"shapley": shapley, "reliance": reliance, "balance": balance, "unimodal": empty},
              failures=[Failure("probe", "needs encoder features; the model is a black box", "skipped"),
                        Failure("cal", "ValueError: boom", "error")],
              verdict=Verdict("audio", ["visual"], "mild", "ogm_ge", ["shapley says so"]), mmdiag_version="t")
    kw.update(over)
    return Report(**kw)  # type: ignore[arg-type]


def one(report: Report, text: str, **kw):
    return evaluate(report, [text], **kw).outcomes[0]


# ---------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, key, op, rhs", [
    ("balance >= 0.6", "balance", ">=", 0.6),
    ("shapley.visual>0.15", "shapley.visual", ">", 0.15),
    ("reliance.audio <= 0.3", "reliance.audio", "<=", 0.3),
    ("reliance.audio < -1e-3", "reliance.audio", "<", -0.001),
    ("n_samples == 400", "n_samples", "==", 400.0),
    ("verdict.severity != strong", "verdict.severity", "!=", "strong"),
    ("verdict.dominant == 'audio'", "verdict.dominant", "==", "audio"),
    ('combinations.details.weakest == "audio+visual"', "combinations.details.weakest", "==", "audio+visual"),
    ("reliance.audio <= baseline + 0.05", "reliance.audio", "<=", Baseline("+", 0.05)),
    ("shapley.visual >= baseline - 0.1", "shapley.visual", ">=", Baseline("-", 0.1)),
    ("reliance.audio <= baseline*1.1", "reliance.audio", "<=", Baseline("*", 1.1)),
    ("balance >= baseline", "balance", ">=", Baseline()),
    ("  accuracy   >=   .9  ", "accuracy", ">=", 0.9),
    ("verdict.dominant == 'baseline_v2'", "verdict.dominant", "==", "baseline_v2"),
    ("verdict.dominant != 'inf'", "verdict.dominant", "!=", "inf"),
])
def test_parse_golden(text: str, key: str, op: str, rhs) -> None:
    rule = parse_rule(text)
    assert (rule.key, rule.op, rule.rhs) == (key, op, rhs)
    assert parse_rule(format_rule(rule)) == rule


@pytest.mark.parametrize("text, needle", [
    ("", "Empty gate rule"),
    ("balance 0.6", "no comparison operator"),
    ("balance = 0.6", "did you mean '=='"),
    ("balance => 0.6", "did you mean '>='"),
    ("balance =< 0.6", "did you mean '<='"),
    ("balance <> 0.6", "did you mean '!='"),
    (">= 0.6", "nothing left of '>='"),
    ("balance >=", "nothing right of '>='"),
    ("my balance >= 0.6", "without spaces"),
    ("shapley..visual >= 0.1", "empty part"),
    ("0.1 <= balance <= 0.9", "more than one comparison operator"),
    ("balance >= baseline +", "baseline arithmetic is"),
    ("balance >= baseline ^ 2", "baseline arithmetic is"),
    ("balance >= baseline / 0", "divides the baseline by zero"),
    ("balance >= 'open", "unterminated"),
    ("verdict.severity < strong", "text supports only == and !="),
    ("balance >= 1,5", "cannot read the right side"),
])
def test_malformed_rules_say_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(GateError) as info:
        parse_rule(text)
    message = str(info.value)
    assert needle in message
    if "Valid rules" in message:
        assert "shapley.visual >= 0.15" in message


_ident = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
_keys = st.lists(_ident, min_size=1, max_size=4).map(".".join)
_numbers = st.floats(allow_nan=False, allow_infinity=False, width=64)
_words = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="'"), max_size=12)
_rhs = st.one_of(
    _numbers,
    _words,
    st.builds(Baseline, st.sampled_from([None]), st.just(0.0)),
    st.builds(Baseline, st.sampled_from(["+", "-", "*"]), _numbers),
)


@settings(max_examples=150, deadline=None)
@given(key=_keys, op=st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), rhs=_rhs, warn=st.booleans())
def test_parse_format_round_trip(key: str, op: str, rhs, warn: bool) -> None:
    if isinstance(rhs, str) and op not in ("==", "!="):
        op = "=="
    rule = Rule(key, op, rhs, warn=warn)
    assert parse_rule(format_rule(rule), warn=warn) == rule


@settings(max_examples=200, deadline=None)
@given(v=st.floats(-5, 5), lo_w=st.floats(0, 1), hi_w=st.floats(0, 1), t=st.floats(-5, 5), dt=st.floats(0, 3),
       op=st.sampled_from([">=", ">"]), bound=st.sampled_from(["ci", "point"]))
def test_gate_is_monotone_in_thresholds(v: float, lo_w: float, hi_w: float, t: float, dt: float, op: str,
                                        bound: str) -> None:
    res = Result("x", v, {"a": v}, ci={"a": [v - lo_w, v + hi_w]}, value_ci=[v - lo_w, v + hi_w])
    rep = small_report(diagnostics={"x": res})
    for key in ("x", "x.a"):
        hi = one(rep, f"{key} {op} {t!r}", bound=bound).status
        lo = one(rep, f"{key} {op} {t - dt!r}", bound=bound).status
        if hi == "PASS":
            assert lo == "PASS"
        # and the mirror image for upper bounds
        mirror = "<=" if op == ">=" else "<"
        if one(rep, f"{key} {mirror} {t - dt!r}", bound=bound).status == "PASS":
            assert one(rep, f"{key} {mirror} {t!r}", bound=bound).status == "PASS"


# ------------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("text, status", [
    ("shapley.audio > 0.5", "FAIL"),       # point 0.50, low end 0.45
    ("shapley.audio >= 0.45", "PASS"),
    ("shapley.audio < 0.55", "FAIL"),      # high end 0.55
    ("shapley.audio <= 0.55", "PASS"),
    ("shapley.audio == 0.5", "PASS"),
    ("shapley.audio != 0.5", "FAIL"),
    ("accuracy >= 0.93", "PASS"),
    ("n_samples > 399", "PASS"),
    ("n_samples < 400", "FAIL"),
    ("verdict.severity != strong", "PASS"),
    ("verdict.severity == mild", "PASS"),
    ("verdict.dominant == audio", "PASS"),
    ("verdict.recommended_fix == 'ogm_ge'", "PASS"),
    ("verdict.underused == visual", "PASS"),
    ("verdict.underused != visual", "FAIL"),
    ("verdict.underused <= 1", "PASS"),
    ("shapley.details.shares.visual >= 0.3", "PASS"),
    ("shapley.details.weakest == visual", "PASS"),
    ("shapley.details.curve.2 == 0.3", "PASS"),
    ("balance >= 0.6", "FAIL"),            # headline 0.62, interval low end 0.55
    ("reliance.visual <= 0.1", "ERROR"),   # no interval under --bound ci: an ERROR naming --bound point
])
def test_each_operator_and_key_kind(text: str, status: str) -> None:
    assert one(small_report(), text).status == status


def test_ci_versus_point_bound_and_the_output_says_which() -> None:
    rep = small_report()
    ci = one(rep, "balance >= 0.6")
    point = one(rep, "balance >= 0.6", bound="point")
    assert (ci.status, ci.bound, ci.compared) == ("FAIL", "low", 0.55)
    assert (point.status, point.bound, point.compared) == ("PASS", "point", 0.62)
    assert ci.value == 0.62 and ci.interval == [0.55, 0.70]
    assert "low end" in ci.message and "point" in point.message
    high = one(rep, "shapley.visual <= 0.25")
    assert (high.status, high.bound, high.compared) == ("FAIL", "high", 0.26)
    no_ci = one(rep, "reliance.visual <= 0.1")
    assert no_ci.bound == "point" and "no interval" in no_ci.message
    result = evaluate(rep, ["balance >= 0.6"], bound="point")
    assert result.bound == "point" and result.to_dict()["bound"] == "point"
    with pytest.raises(GateError, match="Unknown bound"):
        evaluate(rep, ["balance >= 0.6"], bound="median")


def test_baseline_arithmetic() -> None:
    old = small_report()
    new_shapley = Result("shapley", 0.1, {"audio": 0.40, "visual": 0.31}, ci={"audio": [0.38, 0.42], "visual": [0.29, 0.33]})
    new = small_report(diagnostics={**old.diagnostics, "shapley": new_shapley})
    o = one(new, "shapley.visual >= baseline + 0.05", baseline=old, bound="point")
    assert o.status == "PASS" and o.baseline_value == 0.20 and math.isclose(o.threshold, 0.25)
    assert one(new, "shapley.visual >= baseline + 0.05", baseline=old).status == "PASS"  # low end 0.29
    assert one(new, "shapley.audio <= baseline - 0.05", baseline=old).status == "PASS"  # high 0.42 <= 0.45
    assert one(new, "shapley.audio <= baseline - 0.1", baseline=old).status == "FAIL"
    o = one(new, "shapley.visual >= baseline * 1.5", baseline=old)
    assert o.status == "FAIL" and math.isclose(o.threshold, 0.3)  # low end 0.29 < 0.3
    assert one(new, "shapley.visual >= baseline * 1.5", baseline=old, bound="point").status == "PASS"
    assert one(new, "shapley.visual >= baseline / 2", baseline=old).status == "PASS"
    with pytest.raises(GateError, match="no baseline report"):
        evaluate(new, ["shapley.visual >= baseline"])
    gone = small_report(diagnostics={k: v for k, v in old.diagnostics.items() if k != "reliance"})
    miss = one(new, "reliance.audio <= baseline", baseline=gone)
    assert miss.status == "ERROR" and "baseline report cannot answer" in miss.message


def test_missing_keys() -> None:
    rep = small_report()
    skipped = one(rep, "probe.visual >= 0.5")
    assert skipped.status == "ERROR" and not skipped.usage_error and "was skipped" in skipped.message
    assert "black box" in skipped.message
    crashed = one(rep, "cal.audio >= 0.1")
    assert crashed.status == "ERROR" and "failed" in crashed.message and "boom" in crashed.message
    not_run = one(rep, "combinations >= 0.1")
    assert not_run.status == "ERROR" and "not run" in not_run.message and not not_run.usage_error
    typo = one(rep, "shaply.visual >= 0.1")
    assert typo.status == "ERROR" and typo.usage_error and typo.suggestion == "shapley.visual"
    assert "Did you mean 'shapley.visual'" in typo.message
    mod = one(rep, "shapley.vision >= 0.1")
    assert mod.usage_error and mod.suggestion == "shapley.visual"
    field = one(rep, "verdict.severty != strong")
    assert field.usage_error and field.suggestion == "verdict.severity"
    detail = one(rep, "shapley.details.share.audio < 1")
    assert detail.usage_error and detail.suggestion == "shapley.details.shares"
    table = one(rep, "shapley.details.shares < 1")
    assert table.usage_error and "table" in table.message
    none_value = one(rep, "unimodal >= 0.1")
    assert none_value.status == "ERROR" and "not a number" in none_value.message
    nan_value = one(rep, "unimodal.visual >= 0.1")
    assert nan_value.status == "ERROR"
    assert measure(rep, "unimodal.audio").value == 0.9
    result = evaluate(rep, ["balance >= 0.5", "shaply >= 0.1"])
    assert result.exit_code == 2
    assert evaluate(rep, ["balance >= 0.5", "probe >= 0.1"]).exit_code == 1
    assert evaluate(rep, ["balance >= 0.5"]).exit_code == 0


def test_warn_rules_and_warn_only() -> None:
    rep = small_report()
    assert evaluate(rep, [parse_rule("balance >= 0.9", warn=True)]).outcomes[0].status == "WARN"
    res = evaluate(rep, ["balance >= 0.9", "probe >= 0.1"], warn_only=True)
    assert [o.status for o in res.outcomes] == ["WARN", "WARN"] and res.exit_code == 0
    # a typo stays a usage error even for a warning rule
    assert evaluate(rep, ["balanse >= 0.9"], warn_only=True).exit_code == 2


def test_junit_shape_and_markdown() -> None:
    rep = small_report()
    res = evaluate(rep, ["balance >= 0.6", "shapley.audio >= 0.4", "probe >= 0.1", parse_rule("reliance < 0", warn=True)])
    root = ET.fromstring(to_junit(res))
    suite = root.find("testsuite")
    assert suite is not None
    assert suite.get("tests") == "4" and suite.get("failures") == "1" and suite.get("errors") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["balance >= 0.6", "shapley.audio >= 0.4", "probe >= 0.1", "reliance < 0"]
    failure = cases[0].find("failure")
    assert failure is not None and "0.620" in failure.get("message", "") and "0.550" in failure.get("message", "")
    assert cases[1].find("failure") is None and cases[1].find("error") is None
    assert cases[2].find("error") is not None
    assert "WARN" in (cases[3].findtext("system-out") or "")
    md = to_markdown(res)
    assert md.startswith("### mmdiag gate: failed")
    assert "| ❌ FAIL | `balance >= 0.6` | 0.620 [0.550, 0.700]" in md
    assert "Bound: **ci**" in md
    assert json.loads(json.dumps(res.to_dict()))["counts"] == {"PASS": 1, "WARN": 1, "FAIL": 1, "ERROR": 1}


# -------------------------------------------------------------------------------------------- CLI


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "report.json"
    small_report().save(path)
    return path


def run(*args: str):
    return CliRunner().invoke(app, [*args])


def test_cli_exit_codes(saved: Path, tmp_path: Path) -> None:
    ok = run("gate", str(saved), "--rule", "shapley.visual >= 0.1", "--rule", "verdict.severity != strong")
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.output and "interval" in ok.output
    fail = run("gate", str(saved), "-r", "balance >= 0.6")
    assert fail.exit_code == 1 and "FAIL" in fail.output
    assert run("gate", str(saved), "-r", "balance >= 0.6", "--bound", "point").exit_code == 0
    assert run("gate", str(saved), "-r", "balance >= 0.6", "--warn-only").exit_code == 0
    assert run("gate", str(saved), "-r", "probe >= 0.1").exit_code == 1
    typo = run("gate", str(saved), "-r", "shapley.visul >= 0.1")
    assert typo.exit_code == 2 and "shapley.visual" in typo.output
    assert run("gate", str(saved), "-r", "balance = 0.6").exit_code == 2
    assert run("gate", str(saved), "-r", "balance >= baseline").exit_code == 2
    assert run("gate", str(saved), "-r", "balance >= 0.1", "--bound", "mean").exit_code == 2
    assert run("gate", str(tmp_path / "missing.json"), "-r", "balance >= 0.1").exit_code == 2
    (tmp_path / "bad.json").write_text("{not json")
    assert run("gate", str(tmp_path / "bad.json"), "-r", "balance >= 0.1").exit_code == 2
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert run("gate", str(saved), "--config", str(empty)).exit_code == 2  # no rules anywhere
    base = run("gate", str(saved), "-r", "balance >= baseline - 0.1", "--baseline", str(saved))
    assert base.exit_code == 0, base.output


def test_cli_outputs(saved: Path, tmp_path: Path) -> None:
    junit, md = tmp_path / "gate.xml", tmp_path / "gate.md"
    res = run("gate", str(saved), "-r", "balance >= 0.6", "-r", "shapley.audio >= 0.4", "--junit", str(junit),
              "--markdown", str(md), "--json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert doc["bound"] == "ci" and doc["exit_code"] == 1 and len(doc["outcomes"]) == 2
    assert doc["outcomes"][0]["interval"] == [0.55, 0.7] and doc["outcomes"][0]["compared"] == 0.55
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "1"
    assert "balance >= 0.6" in md.read_text()


def test_rules_from_config(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "mmdiag.toml"
    conf.write_text('[gate]\nrules = ["shapley.visual >= 0.1", "verdict.severity != strong"]\nbound = "ci"\n'
                    '[[gate.rule]]\nrule = "balance >= 0.6"\nwarn = true\n')
    res = run("gate", str(saved), "--config", str(conf), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [o["status"] for o in doc["outcomes"]] == ["PASS", "PASS", "WARN"]
    # --rule replaces the config's rules
    assert run("gate", str(saved), "--config", str(conf), "-r", "balance >= 0.6").exit_code == 1
    conf.write_text('[gate]\nrules = ["balance >= 0.6"]\nbound = "point"\n')
    assert run("gate", str(saved), "--config", str(conf)).exit_code == 0
    assert run("gate", str(saved), "--config", str(conf), "--bound", "ci").exit_code == 1
    conf.write_text('[gate]\nrulez = ["balance >= 0.6"]\n')
    bad = run("gate", str(saved), "--config", str(conf))
    assert bad.exit_code == 2 and "rules" in bad.output
    conf.write_text('[gate]\nrules = ["balance => 0.6"]\n')
    assert run("gate", str(saved), "--config", str(conf)).exit_code == 2
    # pyproject.toml [tool.mmdiag.gate], found in the working directory
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pyproject.toml").write_text('[tool.mmdiag.gate]\nrules = ["balance >= 0.9"]\n')
    monkeypatch.chdir(proj)
    res = run("gate", str(saved))
    assert res.exit_code == 1 and "balance >= 0.9" in res.output


def test_gate_on_a_large_synthetic_report() -> None:
    rep = synthetic_report(6)
    res = evaluate(rep, ["shapley.m0 >= 0.1", "combinations.details.accuracy.m0+m1 >= 0.3", "perceptual.m5 < 1",
                         "probe > 0", "verdict.underused == m5"])
    assert [o.status for o in res.outcomes] == ["PASS", "PASS", "PASS", "ERROR", "PASS"]


def test_github_format_annotates_each_rule_that_did_not_pass(tmp_path):
    from typer.testing import CliRunner

    from mmdiag.cli.app import app

    path = synthetic_report().save(tmp_path / "report.json")
    res = CliRunner().invoke(app, ["gate", str(path), "--bound", "point", "--format", "github",
                                   "--rule", "shapley.audio >= 0", "--rule", "shapley.visual >= 0.99",
                                   "--warn-rule", "reliance.visual >= 0.99"])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("::")]
    assert lines[0].startswith("::error title=mmdiag gate FAIL%3A shapley.visual >= 0.99") and "::measured" in lines[0]
    assert lines[1].startswith("::warning title=mmdiag gate WARN%3A reliance.visual >= 0.99")
    assert lines[-1].startswith("::notice title=mmdiag gate::1 pass, 1 warn, 1 fail, 0 error")
    assert not any("shapley.audio" in line for line in lines)


def test_github_format_annotates_an_error_that_stops_the_gate(tmp_path):
    synthetic_report().save(tmp_path / "report.json")
    res = CliRunner().invoke(app, ["gate", str(tmp_path), "--format", "github", "--rule", "balance >= 0.6"])
    assert res.exit_code == 2
    notes = [line for line in res.output.splitlines() if line.startswith("::error title=mmdiag gate could not run::")]
    assert len(notes) == 1 and f"did you mean {tmp_path / 'report.json'}?" in notes[0]
    plain = CliRunner().invoke(app, ["gate", str(tmp_path), "--rule", "balance >= 0.6"])
    assert plain.exit_code == 2 and "::error" not in plain.output


def test_junit_system_out_says_pass_once(tmp_path):
    from mmdiag.gate import evaluate, parse_rule, to_junit

    result = evaluate(synthetic_report(), [parse_rule("shapley.audio >= 0")], bound="point")
    xml = to_junit(result)
    out = xml[xml.index("<system-out>"):xml.index("</system-out>")]
    assert out.count("PASS") == 1
