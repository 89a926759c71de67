"""``--log-to``: check the trackers before the work, log the results to them after it."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from rich.markup import escape

from mmdiag.cli.common import err_console


def check_targets(values: Sequence[str] | None) -> list[Any]:
    """The parsed ``--log-to`` targets; an unknown tracker or a missing library stops the command (exit 2)
    before any model is loaded."""
    if not values:
        return []
    from mmdiag.integrations.trackers import parse_target

    return [parse_target(v) for v in values]


def log_to_targets(targets: Sequence[Any], log: Callable[[Any], str], quiet: bool = False) -> None:
    """``log(target)`` for each target, saying where each run went (on stderr: stdout may carry JSON)."""
    for target in targets:
        where = log(target)
        if not quiet:
            err_console.print(f"[dim]logged to {escape(where)}[/]", highlight=False, soft_wrap=True)


def log_rebalance_to(targets: Sequence[Any], result: Any, out_dir: Any, quiet: bool = False) -> None:
    """Log a rebalance run (after/before/baseline reports, history, output files) to each target."""
    if targets:
        from mmdiag.integrations.trackers import log_rebalance

        log_to_targets(targets, lambda t: log_rebalance(result, t, artifacts=out_dir), quiet)


def log_report_to(targets: Sequence[Any], report: Any, out_dir: Any, quiet: bool = False) -> None:
    """Log one analysis (metrics, settings, verdict, the files of ``out_dir``) to each target."""
    if targets:
        from mmdiag.integrations.trackers import log_report

        log_to_targets(targets, lambda t: log_report(report, t, artifacts=out_dir), quiet)
