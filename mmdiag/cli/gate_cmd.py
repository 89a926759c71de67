"""``mmdiag gate``: check rules against a report and exit 0 (pass), 1 (a rule fails) or 2 (usage error).

Rules come from ``--rule`` (repeatable) or, when none is given, from the ``[gate]`` table of
``mmdiag.toml`` / ``[tool.mmdiag.gate]``::

    [gate]
    rules = ["balance >= 0.6", "verdict.severity != strong"]
    bound = "ci"                 # or "point"
    baseline = "baseline/report.json"
    junit = "gate.xml"           # optional outputs
    markdown = "gate.md"

    [[gate.rule]]
    rule = "shapley.visual >= 0.15"
    warn = true                  # report WARN instead of FAIL

Exit codes: 0 when every rule passes (or only warns); 1 when a rule FAILs or the report cannot answer
it (ERROR: the diagnostic failed, was skipped or was not run); 2 for usage and config errors: an
unparseable rule, an unreadable report, a key that exists nowhere (the message names the closest
key), a ``baseline`` rule without a baseline report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmdiag.cli import config as cfg
from mmdiag.cli.common import console, err_console, handle_errors, print_table
from mmdiag.cli.flags import to_cli
from mmdiag.errors import ConfigError, GateError, MmdiagError
from mmdiag.registry import closest

HELP = """Check gate rules against a report.json; exit 0 (pass), 1 (a rule fails) or 2 (usage error).

Rules look like "balance >= 0.6", "shapley.visual >= 0.15", "verdict.severity != strong" or
"reliance.audio <= baseline + 0.05" (with --baseline OLD/report.json). Without --rule the rules
come from [gate] in mmdiag.toml or [tool.mmdiag.gate] in pyproject.toml. With --bound ci (the
default) a >= rule must hold for the low end of the 95% interval and a <= rule for its high end.
With --missing (or [deployment] in the config) the deployment keys are re-weighted to that
distribution from the report's per-combination accuracies."""

GATE_KEYS = ("rules", "rule", "bound", "baseline", "warn_only", "junit", "markdown")


def rules_from_table(table: Mapping[str, Any], source: str | None = None) -> list[Any]:
    """Parsed rules of a ``[gate]`` table: ``rules = [...]`` strings and ``[[gate.rule]]`` tables."""
    where = f"[gate] in {source or 'the config'}"
    unknown = [k for k in table if k not in GATE_KEYS]
    if unknown:
        near = closest(unknown[0], list(GATE_KEYS))
        hint = f" Did you mean {near!r}?" if near else ""
        raise ConfigError(f"Unknown key {unknown[0]!r} in {where} (keys: {', '.join(GATE_KEYS)}).{hint}")
    out = []
    rules = table.get("rules", [])
    if isinstance(rules, str):
        rules = [rules]
    if not isinstance(rules, list):
        raise ConfigError(f"rules in {where} must be a list of strings, e.g. rules = [\"balance >= 0.6\"].")
    for text in rules:
        if isinstance(text, Mapping):
            out.append(_rule_table(text, where))
        elif isinstance(text, str):
            out.append(_parse(text, where))
        else:
            raise ConfigError(f"rules in {where} must hold strings; found {text!r}.")
    entries = table.get("rule", [])
    if isinstance(entries, Mapping):
        entries = [entries]
    if not isinstance(entries, list):
        raise ConfigError(f"[[gate.rule]] in {where} must be an array of tables with rule = \"...\".")
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise ConfigError(f"Each [[gate.rule]] in {where} must be a table like "
                              "{ rule = \"shapley.visual >= 0.15\", warn = true }; found {entry!r}.")
        out.append(_rule_table(entry, where))
    return out


def _parse(text: str, where: str, warn: bool = False) -> Any:
    from mmdiag.gate import parse_rule

    try:
        return parse_rule(text, warn=warn)
    except GateError as exc:
        raise GateError(f"{where}: {exc}") from None


def _rule_table(entry: Mapping[str, Any], where: str) -> Any:
    extra = [k for k in entry if k not in ("rule", "warn")]
    if extra or not isinstance(entry.get("rule"), str):
        raise ConfigError(f"A [[gate.rule]] entry in {where} takes rule = \"...\" and optionally warn = true; "
                          f"found keys {sorted(entry)}.")
    warn = entry.get("warn", False)
    if not isinstance(warn, bool):
        raise ConfigError(f"warn in a [[gate.rule]] of {where} must be true or false; found {warn!r}.")
    return _parse(entry["rule"], where, warn=warn)


def _status_style(status: str) -> str:
    return {"PASS": "green", "WARN": "yellow", "FAIL": "red", "ERROR": "bold red"}[status]


def gate_table(result: Any) -> Table:
    """The rich table of outcomes."""
    from mmdiag.gate import value_text

    title = (f"mmdiag gate ({'interval bounds: >= checks the low end, <= the high end' if result.bound == 'ci' else 'point values'})")
    table = Table(title=title, title_justify="left")
    table.add_column("status")
    table.add_column("rule", style="bold", overflow="fold")
    table.add_column("value [95% interval]", justify="right")
    table.add_column("detail", overflow="fold")
    for o in result.outcomes:
        table.add_row(f"[{_status_style(o.status)}]{o.status}[/]", escape(str(o.rule)), escape(value_text(o)),
                      escape(o.message))
    return table


def print_gate(result: Any, out: Console) -> None:
    """Table plus a closing line with the counts and the exit code."""
    print_table(out, gate_table(result))
    counts = ", ".join(f"{result.count(s)} {s.lower()}" for s in ("PASS", "WARN", "FAIL", "ERROR"))
    colour = "green" if result.exit_code == 0 else "red"
    word = {0: "passed", 1: "failed", 2: "usage error"}[result.exit_code]
    out.print(f"[bold {colour}]gate {word}[/] ({counts}; bound: {result.bound}; exit {result.exit_code})",
              highlight=False)


def run_gate(report: Any, *, rules: list[Any], baseline: Path | None, bound: str, warn_only: bool,
             junit: Path | None = None, markdown: Path | None = None, as_json: bool = False,
             report_path: str | None = None, github: bool = False) -> int:
    """Evaluate, print (table or JSON; with ``github``, also GitHub annotations), write
    JUnit/Markdown files; return the exit code."""
    from mmdiag.gate import evaluate, to_junit, to_markdown
    from mmdiag.io import write_atomic
    from mmdiag.report import Report

    if not rules:
        raise ConfigError("No gate rules: pass --rule \"balance >= 0.6\" (repeatable) or add rules = [...] to "
                          "[gate] in mmdiag.toml or [tool.mmdiag.gate] in pyproject.toml.")
    base = Report.load(baseline) if baseline is not None else None
    result = evaluate(report, rules, baseline=base, bound=bound, warn_only=warn_only)
    outcomes = [dataclasses.replace(o, message=to_cli(o.message)) for o in result.outcomes]  # flags, not settings
    result = type(result)(outcomes, bound=result.bound, report=report_path,
                          baseline=None if baseline is None else str(baseline))
    if junit is not None:
        write_atomic(Path(junit), to_junit(result))
    if markdown is not None:
        write_atomic(Path(markdown), to_markdown(result))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_gate(result, console)
    if github:
        from mmdiag.gate_annotations import to_github

        typer.echo(to_github(result, report_path))
    if result.exit_code == 2:
        bad = next(o for o in result.outcomes if o.usage_error)
        err_console.print(f"[bold red]error:[/] rule {escape(repr(str(bad.rule)))}: {escape(bad.message)}",
                          highlight=False, soft_wrap=True)
    return result.exit_code


def resolve_gate(conf: Mapping[str, Any], source: str | None, cli_rules: list[str] | None,
                 cli_warn_rules: list[str] | None, bound: str | None, baseline: Path | None,
                 warn_only: bool | None, junit: Path | None, markdown: Path | None) -> dict[str, Any]:
    """Merge flags over the [gate] table (flags win; --rule replaces the config's rules)."""
    table = cfg.normalise_keys(cfg.table(conf, "gate"))
    config_rules = rules_from_table(table, source)
    if cli_rules or cli_warn_rules:
        rules = [_parse(t, "--rule") for t in (cli_rules or [])]
        rules += [_parse(t, "--warn-rule", warn=True) for t in (cli_warn_rules or [])]
    else:
        rules = config_rules

    def from_table(key: str) -> Path | None:
        # paths in [gate] are relative to the working directory, like the flags
        v = table.get(key)
        if v is None:
            return None
        if not isinstance(v, str):
            raise ConfigError(f"{key} in [gate] must be a path string; found {v!r}.")
        return Path(v)
    chosen_bound = bound or table.get("bound", "ci")
    if chosen_bound not in ("ci", "point"):
        raise ConfigError(f"bound must be 'ci' or 'point'; found {chosen_bound!r}.")
    wo = warn_only if warn_only is not None else table.get("warn_only", False)
    if not isinstance(wo, bool):
        raise ConfigError(f"warn_only in [gate] must be true or false; found {wo!r}.")
    return {
        "rules": rules,
        "bound": chosen_bound,
        "baseline": baseline if baseline is not None else from_table("baseline"),
        "warn_only": wo,
        "junit": junit if junit is not None else from_table("junit"),
        "markdown": markdown if markdown is not None else from_table("markdown"),
    }


@handle_errors
def gate(
    report: Path = typer.Argument(..., metavar="REPORT", help="The report.json to check."),
    rule: Optional[list[str]] = typer.Option(None, "--rule", "-r", metavar="RULE", help="A rule such as 'shapley.visual >= 0.15' (repeatable; replaces the config's rules)."),
    warn_rule: Optional[list[str]] = typer.Option(None, "--warn-rule", metavar="RULE", help="A rule that only warns when it fails (repeatable)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", "-b", help="Earlier report.json that 'baseline' in rules refers to."),
    bound: Optional[str] = typer.Option(None, "--bound", help="ci (interval ends; default) or point (point values)."),
    warn_only: Optional[bool] = typer.Option(None, "--warn-only/--no-warn-only", help="Report failures as warnings and exit 0."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write a JUnit XML file (one testcase per rule)."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY)."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcomes as JSON instead of a table."),
    output_format: str = typer.Option("table", "--format", metavar="table|json|github", help="table (default), json (as --json), or github: the table plus GitHub Actions annotations (::error / ::warning lines) for each rule that did not pass."),
    missing: Optional[str] = typer.Option(None, "--missing", help="Gate the deployment keys under these independent missing rates (MODALITY=RATE,...; or [deployment] in the config): the report's per-combination accuracies are re-weighted (point values; the analysis's own distribution keeps its intervals)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML config (default: ./mmdiag.toml or [tool.mmdiag] in ./pyproject.toml)."),
) -> None:
    """Check gate rules against a report.json."""
    if output_format == "github":
        with github_errors():
            _gate(report, rule, warn_rule, baseline, bound, warn_only, junit, markdown, as_json, output_format,
                  missing, config)
    else:
        _gate(report, rule, warn_rule, baseline, bound, warn_only, junit, markdown, as_json, output_format,
              missing, config)


@contextlib.contextmanager
def github_errors() -> Iterator[None]:
    """An error that stops the gate (exit 2) also as a GitHub Actions annotation, so the job's
    summary shows why no rule was checked (the message itself still goes to stderr)."""
    try:
        yield
    except MmdiagError as exc:
        from mmdiag.gate_annotations import annotation_data

        typer.echo(f"::error title=mmdiag gate could not run::{annotation_data(to_cli(str(exc)))}")
        raise


def _gate(report: Path, rule: Any, warn_rule: Any, baseline: Any, bound: Any, warn_only: Any, junit: Any,
          markdown: Any, as_json: bool, output_format: str, missing: Any, config: Any) -> None:
    from mmdiag.report import Report

    if output_format not in ("table", "json", "github"):
        raise ConfigError(f"--format must be table, json or github; found {output_format!r}.")
    as_json = as_json or output_format == "json"
    if bound is not None and bound not in ("ci", "point"):
        raise ConfigError(f"--bound must be 'ci' or 'point'; found {bound!r}.")
    conf, source = cfg.find_config(config)
    o = resolve_gate(conf, source, rule, warn_rule, bound, baseline, warn_only, junit, markdown)
    the_report = deployed(Report.load(report), cfg.deployment_params(conf, source, missing))
    code = run_gate(the_report, rules=o["rules"], baseline=o["baseline"], bound=o["bound"], warn_only=o["warn_only"],
                    junit=o["junit"], markdown=o["markdown"], as_json=as_json, report_path=str(report),
                    github=output_format == "github")
    if code:
        raise typer.Exit(code)


def deployed(report: Any, deployment: Mapping[str, Any]) -> Any:
    """``report`` with its ``deployment`` result re-weighted to the distribution of ``--missing`` or
    ``[deployment]`` (unchanged when none is given, the report has no such result, or it already used it)."""
    res = report.diagnostics.get("deployment")
    if not deployment or res is None:
        return report
    from mmdiag.deployment import distribution
    from mmdiag.diagnostics.deployment import reweighted

    new = reweighted(res, report.modalities, distribution(deployment.get("missing"), deployment.get("combinations")))
    return dataclasses.replace(report, diagnostics={**report.diagnostics, "deployment": new})


def analysis_gate_options(conf: Mapping[str, Any], source: str | None, baseline: Any) -> dict[str, Any]:
    """Options of ``mmdiag analyze --gate`` from the config's [gate] table, checked before the analysis."""
    o = resolve_gate(conf, source, None, None, None, Path(baseline) if baseline else None, None, None, None)
    if not o["rules"]:
        raise ConfigError(f"--gate needs rules: add rules = [\"balance >= 0.6\", ...] to [gate] in "
                          f"{source or 'mmdiag.toml (or [tool.mmdiag.gate] in pyproject.toml)'}.")
    if o["baseline"] is not None and not Path(o["baseline"]).is_file():
        raise ConfigError(f"The gate's baseline report {o['baseline']} does not exist.")
    return o
