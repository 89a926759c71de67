"""The gate: rules such as ``shapley.visual >= 0.15`` evaluated against a report.

The gate reads reports, never the model, and is pure: :func:`parse_rule` turns text into a
:class:`Rule`, :func:`evaluate` turns a report (and optionally a baseline report) plus rules into a
:class:`GateResult` with one :class:`Outcome` per rule. Printing, config files and exit codes live
in ``mmdiag.cli.gate_cmd``.

Rule grammar::

    rule     := KEY OP RHS
    OP       := <  |  <=  |  >  |  >=  |  ==  |  !=
    RHS      := NUMBER | 'text' | "text" | bare-word | baseline [ (+|-|*|/) NUMBER ]

Keys:

- ``<diagnostic>``: the headline ``value`` of a diagnostic (interval: ``value_ci``);
- ``<diagnostic>.<modality>``: its per-modality value (interval: ``ci[<modality>]``);
- ``<diagnostic>.<key>``: a named value the diagnostic declares in ``gate_keys``, e.g.
  ``deployment.worst`` (the accuracy of the costliest combination, with its interval);
- ``<diagnostic>.details.<path>``: a number or string inside ``details`` (dotted; list items by index);
- ``accuracy``, ``n_samples``: the fused accuracy and the number of evaluated samples;
- ``verdict.<field>``: ``dominant``, ``severity``, ``recommended_fix`` (strings; a missing value
  reads as ``none``), ``underused`` (a list: ``==``/``!=`` test membership, numeric comparisons
  use its length).

Bounds: with ``bound="ci"`` a ``>``/``>=`` rule passes only when the interval's *low* end passes and
a ``<``/``<=`` rule only when its *high* end passes, so a pass is a claim the data back up. ``==`` and
``!=``, and keys that never carry an interval (``accuracy``, ``n_samples``, ``verdict.*``,
``details``), use the point value (the outcome says so). A diagnostic value without an interval
(``bootstrap = 0``, or a headline the diagnostic gives none for) is an ERROR under ``bound="ci"``
that names ``--bound point``: the gate never falls back to the point value silently.

Outcomes: ``PASS``; ``WARN`` (the rule would fail, or the report cannot answer it, but the rule is a
warning); ``FAIL``; ``ERROR`` (the report cannot answer the rule: the diagnostic failed, was skipped or
was not run, or ``bound="ci"`` finds no interval). An ERROR on a key that exists nowhere (a typo) is a *usage* error and carries the
closest known key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from mmdiag.errors import GateError
# the rule grammar lives in gate_rules; its names stay importable from here
from mmdiag.gate_rules import ARITH, EXAMPLE, OPS, Baseline, Rule, format_rule, parse_rule, parse_rules  # noqa: F401
from mmdiag.registry import closest
from mmdiag.report import Report, Result, interval

BOUNDS = ("ci", "point")
STATUSES = ("PASS", "WARN", "FAIL", "ERROR")
VERDICT_FIELDS = ("dominant", "underused", "severity", "recommended_fix")
TOP_LEVEL = ("accuracy", "n_samples")


@dataclass(frozen=True)
class Outcome:
    """The result of one rule.

    Attributes:
        rule: the rule.
        status: PASS, WARN, FAIL or ERROR.
        value: the measured point value (number, string, list or None when missing).
        interval: the [low, high] interval of the value, when the report has one.
        compared: the number actually compared (an interval end under ``bound="ci"``).
        bound: which value was compared: ``low``, ``high`` or ``point``.
        threshold: the right side after resolving ``baseline``.
        baseline_value: the key's value in the baseline report, when used.
        message: one sentence saying why (and, for errors, what to try).
        usage_error: the key exists nowhere (a typo or wrong name): a usage error, not a gate failure.
        suggestion: the closest known key, for errors.
    """

    rule: Rule
    status: str
    value: Any = None
    interval: list[float] | None = None
    compared: Any = None
    bound: str = "point"
    threshold: Any = None
    baseline_value: Any = None
    message: str = ""
    usage_error: bool = False
    suggestion: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": str(self.rule),
            "key": self.rule.key,
            "op": self.rule.op,
            "warn": self.rule.warn,
            "status": self.status,
            "value": _plain(self.value),
            "interval": self.interval,
            "compared": _plain(self.compared),
            "bound": self.bound,
            "threshold": _plain(self.threshold),
            "baseline_value": _plain(self.baseline_value),
            "message": self.message,
            "usage_error": self.usage_error,
            "suggestion": self.suggestion,
        }


@dataclass(frozen=True)
class GateResult:
    """All outcomes of one gate run, with the bound used and the derived exit code."""

    outcomes: list[Outcome]
    bound: str = "ci"
    report: str | None = None
    baseline: str | None = None

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def passed(self) -> bool:
        """True when no rule FAILs or ERRORs."""
        return not any(o.status in ("FAIL", "ERROR") for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        """2 when a rule names a key that exists nowhere, 1 when any rule FAILs or ERRORs, else 0."""
        if any(o.usage_error for o in self.outcomes):
            return 2
        return 0 if self.passed else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "exit_code": self.exit_code,
            "bound": self.bound,
            "report": self.report,
            "baseline": self.baseline,
            "counts": {s: self.count(s) for s in STATUSES},
            "outcomes": [o.to_dict() for o in self.outcomes],
        }


def _plain(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


# -------------------------------------------------------------------------------------------- lookups


@dataclass(frozen=True)
class _Measure:
    value: Any
    interval: list[float] | None = None
    error: str | None = None
    usage_error: bool = False
    suggestion: str | None = None
    #: the diagnostic whose estimate this is: a value that has an interval when one was computed
    estimate: str | None = None


def known_keys(report: Report) -> list[str]:
    """Every key this report can answer (details excluded): for suggestions and documentation."""
    keys = list(TOP_LEVEL) + [f"verdict.{f}" for f in VERDICT_FIELDS]
    for name, res in report.diagnostics.items():
        keys.append(name)
        keys.extend(f"{name}.{m}" for m in res.per_modality)
        keys.extend(f"{name}.{k}" for k in _gate_keys(name) if k not in res.per_modality)
        keys.extend(f"{name}.details.{k}" for k in (res.details or {}))
    return keys


def _gate_keys(name: str) -> dict[str, tuple[str, str | None]]:
    """The named gate keys a registered diagnostic declares (``Diagnostic.gate_keys``); none for a
    name this installation does not know."""
    try:
        from mmdiag.diagnostics.base import declared
    except Exception:  # pragma: no cover - a broken plug-in must not break the gate
        return {}
    cls = declared(name)
    return dict(getattr(cls, "gate_keys", {}) or {}) if cls is not None else {}


def _registered_diagnostics() -> list[str]:
    try:
        from mmdiag.diagnostics import DIAGNOSTICS
    except Exception:  # pragma: no cover - a broken plug-in must not break the gate
        return []
    return DIAGNOSTICS.names()


def _unknown(key: str, report: Report, what: str) -> _Measure:
    near = closest(key, known_keys(report) + [f"{d}" for d in _registered_diagnostics()])
    hint = f" Did you mean {near!r}?" if near else ""
    return _Measure(None, error=f"{what}.{hint}", usage_error=True, suggestion=near)


def measure(report: Report, key: str) -> _Measure:
    """Look up ``key`` in a report: its value, interval, or why it cannot be answered."""
    parts = key.split(".")
    head = parts[0]
    if head in TOP_LEVEL and len(parts) == 1:
        value = report.accuracy if head == "accuracy" else report.n_samples
        return _Measure(value)
    if head == "verdict":
        if len(parts) != 2 or parts[1] not in VERDICT_FIELDS:
            field_name = ".".join(parts[1:]) or "(nothing)"
            near = closest(field_name, list(VERDICT_FIELDS))
            hint = f" Did you mean 'verdict.{near}'?" if near else ""
            return _Measure(None, error=f"The verdict has no field {field_name!r} (fields: "
                                        f"{', '.join(VERDICT_FIELDS)}).{hint}", usage_error=True,
                            suggestion=f"verdict.{near}" if near else None)
        return _Measure(getattr(report.verdict, parts[1]))
    res = report.diagnostics.get(head)
    if res is None:
        failure = next((f for f in report.failures if f.diagnostic == head), None)
        if failure is not None:
            verb = "was skipped" if failure.kind == "skipped" else "failed"
            return _Measure(None, error=f"Diagnostic {head!r} {verb} in this report: {failure.error}")
        if head in _registered_diagnostics():
            return _Measure(None, error=f"Diagnostic {head!r} was not run for this report (check `only`/`skip` "
                                        f"of the analysis); diagnostics present: {', '.join(report.diagnostics) or '(none)'}.")
        return _unknown(key, report, f"Unknown key {key!r}: {head!r} is neither a diagnostic in this report nor "
                                     f"accuracy, n_samples or verdict.<field>")
    if len(parts) == 1:
        return _Measure(res.value, res.interval(), estimate=head)
    if parts[1] == "details":
        return _details(res, key, parts[2:], report)
    if len(parts) == 2:
        m = parts[1]
        if m in res.per_modality:
            return _Measure(res.per_modality[m], res.interval(m), estimate=head)
        named = _gate_keys(head).get(m)
        if named is not None:  # a named key of the diagnostic (deployment.worst), read from its details
            value_entry, interval_entry = named
            found = (res.details or {}).get(value_entry)
            ci = interval((res.details or {}).get(interval_entry)) if interval_entry else None
            return _Measure(found, ci, estimate=head if interval_entry else None)
        named_keys = "".join(f", {k}" for k in _gate_keys(head))
        return _unknown(key, report, f"Unknown key {key!r}: diagnostic {head!r} has no modality {m!r} "
                                     f"(modalities: {', '.join(res.per_modality) or '(none)'}{named_keys})")
    return _unknown(key, report, f"Unknown key {key!r}: after <diagnostic>.<modality> nothing may follow; "
                                 f"use {head}.details.<path> for details")


def _details(res: Result, key: str, path: Sequence[str], report: Report) -> _Measure:
    node: Any = res.details or {}
    walked = f"{res.name}.details"
    if not path:
        return _Measure(None, error=f"Key {key!r} names the whole details table; add a path, e.g. "
                                    f"{walked}.{next(iter(node), 'name')}.", usage_error=True)
    for part in path:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            options = list(node) if isinstance(node, Mapping) else []
            near = closest(part, [str(o) for o in options]) if options else None
            hint = f" Did you mean '{walked}.{near}'?" if near else ""
            avail = f" (entries: {', '.join(map(str, options[:12]))}{', ...' if len(options) > 12 else ''})" if options else ""
            return _Measure(None, error=f"Unknown key {key!r}: {walked} has no entry {part!r}{avail}.{hint}",
                            usage_error=True, suggestion=f"{walked}.{near}" if near else None)
        walked += f".{part}"
    if isinstance(node, (Mapping, list)):
        return _Measure(None, error=f"Key {key!r} names a table, not a value; go one level deeper.", usage_error=True)
    return _Measure(node)


# ------------------------------------------------------------------------------------------ evaluation


def _compare(a: float | str, op: str, b: float | str) -> bool:
    if op == "<":
        return a < b  # type: ignore[operator]
    if op == "<=":
        return a <= b  # type: ignore[operator]
    if op == ">":
        return a > b  # type: ignore[operator]
    if op == ">=":
        return a >= b  # type: ignore[operator]
    if op == "==":
        return a == b
    return a != b


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
        return float(v)
    return None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "none"
    return str(v)


def _evaluate_one(rule: Rule, report: Report, baseline: Report | None, bound: str, warn_only: bool) -> Outcome:
    warn = rule.warn or warn_only
    got = measure(report, rule.key)
    if got.error is not None:
        status = "WARN" if warn and not got.usage_error else "ERROR"
        return Outcome(rule, status, message=got.error, usage_error=got.usage_error, suggestion=got.suggestion)
    value, interval = got.value, got.interval

    threshold: Any = rule.rhs
    base_value: Any = None
    if isinstance(rule.rhs, Baseline):
        assert baseline is not None  # checked by evaluate()
        bgot = measure(baseline, rule.key)
        if bgot.error is not None:
            status = "WARN" if warn else "ERROR"
            return Outcome(rule, status, value=value, interval=interval,
                           message=f"The baseline report cannot answer {rule.key!r}: {bgot.error}")
        base_value = _number(bgot.value)
        if base_value is None:
            return Outcome(rule, "ERROR", value=value, interval=interval, baseline_value=bgot.value,
                           message=f"Baseline arithmetic needs a number, but {rule.key!r} in the baseline is {_fmt(bgot.value)}.")
        threshold = rule.rhs.apply(base_value)

    def done(ok: bool, compared: Any, which: str, note: str = "") -> Outcome:
        status = "PASS" if ok else ("WARN" if warn else "FAIL")
        where = {"low": "interval low end", "high": "interval high end", "point": "point value"}[which]
        thr = _fmt(threshold)
        if base_value is not None:
            thr += f" (baseline {_fmt(base_value)})"
        msg = f"{where} {_fmt(compared)} {rule.op} {thr}: {'holds' if ok else 'does not hold'}{note}"
        return Outcome(rule, status, value=value, interval=interval, compared=compared, bound=which,
                       threshold=threshold, baseline_value=base_value, message=msg)

    # text comparisons (verdict fields, string details)
    if isinstance(threshold, str):
        if isinstance(value, list):
            inside = threshold in [str(v) for v in value]
            status = "PASS" if (inside if rule.op == "==" else not inside) else ("WARN" if warn else "FAIL")
            listed = ", ".join(map(str, value)) or "empty"
            return Outcome(rule, status, value=value, compared=value, threshold=threshold,
                           message=f"{threshold!r} is {'' if inside else 'not '}in {rule.key} ({listed}); "
                                   f"{rule.op} on a list tests membership.")
        text = "none" if value is None else str(value)
        return done(_compare(text, rule.op, threshold), text, "point")

    if isinstance(value, list):
        n = len(value)
        return done(_compare(float(n), rule.op, float(threshold)), n, "point", " (the list's length)")
    number = _number(value)
    if number is None:
        status = "WARN" if warn else "ERROR"
        return Outcome(rule, status, value=value, interval=interval, threshold=threshold, baseline_value=base_value,
                       message=f"{rule.key!r} is {_fmt(value)}, not a number; a numeric rule cannot be checked"
                               f"{' (the diagnostic could not compute it)' if value is None else ''}.")
    if bound == "ci" and rule.op in (">", ">=", "<", "<="):
        if interval is None and got.estimate is not None:  # never a silent fall-back to the point value
            return Outcome(rule, "WARN" if warn else "ERROR", value=value, threshold=threshold,
                           baseline_value=base_value, message=_no_interval(rule, report.diagnostics[got.estimate]))
        if interval is None:
            return done(_compare(number, rule.op, float(threshold)), number, "point",
                        " (this key has no interval by nature, so the point value)")
        which = "low" if rule.op in (">", ">=") else "high"
        end = interval[0] if which == "low" else interval[1]
        return done(_compare(end, rule.op, float(threshold)), end, which)
    note = " (== and != use the point value)" if bound == "ci" and rule.op in ("==", "!=") else ""
    return done(_compare(number, rule.op, float(threshold)), number, "point", note)


def _no_interval(rule: Rule, res: Result) -> str:
    """Why ``--bound ci`` cannot check ``rule``: the value has no interval; what to do instead."""
    end = "low" if rule.op in (">", ">=") else "high"
    if (res.params or {}).get("bootstrap") == 0:
        why, rerun = "the analysis ran with `bootstrap=0`", ", or rerun the analysis with `bootstrap=1000`"
    elif (res.details or {}).get("reweighted"):
        why, rerun = str(res.details["reweighted"]), ""
    else:
        why, rerun = f"{res.name} computes no interval for this value", ""
    return (f"{rule.key!r} has no interval in this report ({why}), so `bound='ci'` cannot check its {end} end; "
            f"gate on point values with `bound='point'`{rerun}.")


def evaluate(report: Report, rules: Sequence[Rule | str], baseline: Report | None = None, bound: str = "ci",
             warn_only: bool = False) -> GateResult:
    """Evaluate rules against a report.

    Args:
        report: the report to gate.
        rules: parsed rules or rule texts.
        baseline: the earlier report that ``baseline`` in a rule refers to.
        bound: ``ci`` (interval ends, the default) or ``point`` (point values).
        warn_only: report failing rules as WARN (exit code 0).

    Raises:
        GateError: an unknown bound, a malformed rule text, or a baseline rule without a baseline report.
    """
    if bound not in BOUNDS:
        raise GateError(f"Unknown bound {bound!r}; expected 'ci' (interval ends) or 'point' (point values).")
    parsed = [parse_rule(r) if isinstance(r, str) else r for r in rules]
    if baseline is None:
        needing = [str(r) for r in parsed if r.uses_baseline]
        if needing:
            raise GateError(
                f"Rule {needing[0]!r} refers to 'baseline' but no baseline report was given; pass the "
                "earlier report (OLD/report.json) as `baseline`."
            )
    return GateResult([_evaluate_one(r, report, baseline, bound, warn_only) for r in parsed], bound=bound)


def with_warn(rule: Rule, warn: bool = True) -> Rule:
    """A copy of ``rule`` marked as a warning."""
    return replace(rule, warn=warn)


# ----------------------------------------------------------------------------------- JUnit / Markdown


def to_junit(result: GateResult, name: str = "mmdiag gate") -> str:
    """A JUnit XML document: one testsuite, one testcase per rule, ``<failure>``/``<error>`` with the value."""
    from xml.etree import ElementTree as ET

    suites = ET.Element("testsuites", name=name, tests=str(len(result.outcomes)),
                        failures=str(result.count("FAIL")), errors=str(result.count("ERROR")))
    suite = ET.SubElement(suites, "testsuite", name=name, tests=str(len(result.outcomes)),
                          failures=str(result.count("FAIL")), errors=str(result.count("ERROR")),
                          skipped="0", time="0")
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="bound", value=result.bound)
    if result.report:
        ET.SubElement(props, "property", name="report", value=result.report)
    if result.baseline:
        ET.SubElement(props, "property", name="baseline", value=result.baseline)
    for o in result.outcomes:
        case = ET.SubElement(suite, "testcase", classname="mmdiag.gate", name=str(o.rule), time="0")
        detail = describe(o)
        if o.status == "FAIL":
            el = ET.SubElement(case, "failure", message=f"{o.rule}: measured {value_text(o)}", type="GateFailure")
            el.text = detail
        elif o.status == "ERROR":
            el = ET.SubElement(case, "error", message=f"{o.rule}: {o.message}", type="GateError")
            el.text = detail
        else:
            out = ET.SubElement(case, "system-out")
            out.text = detail  # already opens with the status
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def value_text(o: Outcome) -> str:
    """The measured value with its interval, e.g. ``0.277 [0.243, 0.310]``."""
    if o.value is None and o.status == "ERROR":
        return "n/a"
    text = _fmt_value(o.value)
    if o.interval is not None:
        text += f" [{o.interval[0]:.3f}, {o.interval[1]:.3f}]"
    return text


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return _fmt(v)


def describe(o: Outcome) -> str:
    """One line: status, rule, value, what was compared."""
    return f"{o.status} {o.rule}: value {value_text(o)}; {o.message}"


_ICON = {"PASS": "✅", "WARN": "⚠️", "FAIL": "❌", "ERROR": "⛔"}


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(result: GateResult, title: str = "mmdiag gate") -> str:
    """A Markdown summary (for CI job summaries and merge-request comments)."""
    state = "passed" if result.passed else "failed"
    lines = [
        f"### {title}: {state}",
        "",
        f"{result.count('PASS')} passed, {result.count('WARN')} warned, {result.count('FAIL')} failed, "
        f"{result.count('ERROR')} errors. Bound: **{result.bound}** "
        + ("(a `>`/`>=` rule must hold for the interval's low end, `<`/`<=` for its high end)."
           if result.bound == "ci" else "(point values)."),
        "",
        "| status | rule | value [95% interval] | compared | detail |",
        "|---|---|---|---|---|",
    ]
    for o in result.outcomes:
        compared = "" if o.compared is None else f"{o.bound}: {_fmt_value(o.compared)}"
        lines.append(f"| {_ICON[o.status]} {o.status} | `{_md_cell(str(o.rule))}` | {_md_cell(value_text(o))} | "
                     f"{_md_cell(compared)} | {_md_cell(o.message)} |")
    return "\n".join(lines) + "\n"
