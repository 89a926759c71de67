"""``mmdiag rebalance --fix a,b,c|all`` (a leaderboard) and ``--fix race`` / ``--fix auto --race``:
the checks of their options, the call into the library, and the terminal tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from rich import box
from rich.markup import escape
from rich.table import Table

from mmdiag.cli.common import console, err_console, split_list
from mmdiag.cli.flags import to_cli
from mmdiag.errors import ConfigError

__all__ = ["check_many", "check_objective_data", "mode_of", "runner", "show"]

LEADERBOARD, RACE = "leaderboard", "race"


def mode_of(o: Mapping[str, Any]) -> str | None:
    """``leaderboard`` for a fix list or ``all``, ``race`` for ``race`` or ``auto`` with ``--race``, else None."""
    from mmdiag.rebalance.candidates import is_fix_list

    fix = str(o.get("fix") or "auto")
    if fix == RACE or (fix == "auto" and o.get("race")):
        return RACE
    return LEADERBOARD if is_fix_list(fix) else None


def check_many(o: Mapping[str, Any], fix_params: Mapping[str, Any]) -> str | None:
    """The mode (see :func:`mode_of`), its fixes, parameters and options checked before any work."""
    from mmdiag.rebalance.board_run import prepared_fixes
    from mmdiag.rebalance.scoring import OBJECTIVES

    mode = mode_of(o)
    if o.get("race") and mode != RACE:
        raise ConfigError(f"--race goes with --fix auto (or write --fix race); found --fix {o.get('fix')}.")
    if o.get("candidates") and mode != RACE:
        raise ConfigError("--candidates names the fixes of a race (--fix race); for a leaderboard list the "
                          "fixes in --fix (e.g. --fix ogm_ge,arl).")
    if int(o.get("jobs") or 1) < 1:
        raise ConfigError(f"--jobs must be at least 1; found {o.get('jobs')}.")
    if mode is None:
        return None
    if str(o.get("objective") or "fused") not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}; found {o.get('objective')!r}.")
    fixes = _race_candidates(o) if mode == RACE else str(o["fix"])
    prepared_fixes(fixes, fix_params, with_baseline=mode == RACE)  # unknown fix or parameter: exit 2 now
    return mode


def check_objective_data(o: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    """``--objective deployment`` needs a deployment distribution (``--missing`` or the config's)."""
    from mmdiag.rebalance.board_table import check_objective
    from mmdiag.rebalance.scoring import has_deployment
    from mmdiag.specs import AnalysisSpec

    if mode_of(o) is not None:
        check_objective(str(o.get("objective") or "fused"), has_deployment(AnalysisSpec(params=params)))


def _race_candidates(o: Mapping[str, Any]) -> str:
    names = split_list(o.get("candidates"))
    return ",".join(names) if names else "all"


def runner(mode: str, o: Mapping[str, Any]) -> Callable[..., Any]:
    """A callable taking :func:`mmdiag.rebalance.rebalance`'s arguments that runs the leaderboard
    or the race instead (with ``--objective`` and ``--jobs``)."""
    from mmdiag.rebalance.board_run import leaderboard
    from mmdiag.rebalance.halving import DEFAULT_HOLDOUT
    from mmdiag.rebalance.race_run import race

    objective, jobs = str(o.get("objective") or "fused"), int(o.get("jobs") or 1)

    def run(factory: Any, train_data: Any, *, fix: str, baseline: bool, report_formats: Any, **kwargs: Any) -> Any:
        if mode == RACE:
            return race(factory, train_data, candidates=_race_candidates(o), objective=objective, jobs=jobs,
                        holdout=float(o.get("holdout") or DEFAULT_HOLDOUT), baseline=baseline,
                        report_formats=report_formats, **kwargs)
        formats = split_list(report_formats) if isinstance(report_formats, str) else list(report_formats)
        return leaderboard(factory, train_data, fixes=fix, objective=objective, jobs=jobs,
                           formats=(*formats, "csv", "json"), **kwargs)

    return run


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


#: the narrowest a column may get (a 0.000 value has 5 characters; the fix name may shrink)
_MIN_WIDTH = {"rank": 2, "fix": 6, "separated": 3, "train_seconds": 6}


def _header(column: str) -> str:
    """Short headers, so the table fits a terminal: the modality's name for its unimodal accuracy."""
    if column.startswith("unimodal."):
        return column.split(".", 1)[1]
    return {"rank": "#", "accuracy": "fused", "train_seconds": "train s", "step_overhead": "step x",
            "separated": "sep.", "deployment": "deploy"}.get(column, column)


def leaderboard_table(board: Any) -> Table:
    """The leaderboard's rows as a rich table (the baseline row dimmed; the intervals are in the CSV)."""
    title = f"leaderboard by {board.objective} (validation data; modality columns: accuracy with it alone)"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    shown = [c for c in board.columns if c not in ("accuracy_low", "accuracy_high")]
    for c in shown:
        # numbers keep their characters on a narrow terminal; the fix names and headers give way first
        table.add_column(_header(c), justify="left" if c == "fix" else "right", no_wrap=True,
                         min_width=_MIN_WIDTH.get(c, 5))
    for r in board.rows:
        table.add_row(*[_fmt(r.get(c)) for c in shown], style="dim" if r["fix"] == "none" else None)
    table.caption = ("sep.: the paired bootstrap interval of the fused-accuracy difference to the baseline (none) "
                     "excludes 0; step x: seconds per training step relative to none")
    return table


def _warn(lines: Any) -> None:
    for line in lines:
        err_console.print(f"[bold yellow]warning:[/] {escape(to_cli(line))}", highlight=False, soft_wrap=True)


def race_table(result: Any) -> Table:
    """The rungs of a race: each candidate's held-out score and what became of it."""
    table = Table(title=f"race by {result.objective} on {result.held_out} held-out training rows",
                  title_justify="left")
    for c in ("rung", "epochs", "fix", "score", "decision"):
        table.add_column(c, justify="left" if c in ("fix", "decision") else "right")
    for r in result.rows:
        table.add_row(str(r.rung), str(r.epochs), r.fix, f"{r.score:.3f}", r.decision,
                      style="dim" if r.decision == "dropped" else None)
    return table


def show(result: Any, quiet: bool, out_dir: Path) -> Any:
    """Print a leaderboard (returns None) or a race (returns its rebalance result, printed as for one fix)."""
    from mmdiag.rebalance.board_table import Leaderboard

    if isinstance(result, Leaderboard):
        _warn(result.warnings)
        if not quiet:
            for note in result.notes:
                console.print(f"[dim]note: {escape(to_cli(note))}[/]", highlight=False)
            console.print(leaderboard_table(result))
        best = result.best
        console.print(f"leaderboard by {result.objective}: best {best['fix']} (fused accuracy {best['accuracy']:.3f}); "
                      f"baseline none {result.row('none')['accuracy']:.3f}", highlight=False, soft_wrap=True)
        if not quiet:
            console.print(f"[dim]wrote {out_dir / 'leaderboard.csv'} and {out_dir / 'leaderboard.json'}[/]")
        return None
    if not quiet:
        console.print(race_table(result))
    c = result.cost
    console.print(f"race cost: {c.epochs} candidate-epochs, {c.seconds:.1f} s of training; --fix all would train "
                  f"{c.all_epochs} epochs (about {c.all_seconds:.1f} s); winner {result.winner}",
                  highlight=False, soft_wrap=True)
    return result.rebalance
