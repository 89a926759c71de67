"""Shared CLI plumbing: consoles, error handling with exit codes, progress bars, small parsers."""

from __future__ import annotations

import functools
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mmdiag.cli.flags import to_cli
from mmdiag.errors import (ConfigError, MmdiagError, UserCodeError, exception_message, raised_in_user_code,
                           user_code_error)

console = Console()
err_console = Console(stderr=True)

STATE: dict[str, bool] = {"debug": False, "verbose": False}

F = TypeVar("F", bound=Callable[..., Any])


def print_table(out: Console, table: Table) -> None:
    """Print a rich table with no value or key cut short: at the console's width when the whole
    table fits it, otherwise at the table's natural width (a CI log or a pipe would otherwise get
    the default 80 columns, and a narrow terminal ``0.…`` for every number; a terminal wraps the
    long lines instead, which loses nothing)."""
    natural = Measurement.get(out, out.options.update(width=10_000), table).maximum
    if natural <= out.width:
        out.print(table)
        return
    width = out.width
    out.width = natural  # rich clamps a print's width to the console's
    try:
        out.print(table)
    finally:
        out.width = width


def handle_errors(fn: F) -> F:
    """Turn every error into a one-paragraph message and exit code 2 (the traceback only with --debug).

    mmdiag's own errors print their message, with the settings it names written as flags
    (:func:`~mmdiag.cli.flags.to_cli`). Any other exception is either raised in the user's
    code (a traceback frame outside mmdiag, installed packages and the standard library), reported
    as such with the file and line, or an internal error of mmdiag. Exit code 1 stays reserved for
    a failing gate rule; typer's own exits and usage errors pass through.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MmdiagError as exc:
            text = exception_message(exc)  # the user's own exception's words stay as they are
            _fail(text if isinstance(exc, UserCodeError) else to_cli(text), exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as exc:
            if type(exc).__module__.split(".")[0] in ("typer", "click"):
                raise  # typer.Exit, typer.Abort and click's usage errors
            if raised_in_user_code(exc):
                _fail(str(user_code_error(exc, "running mmdiag")), 2)
            _fail(f"internal error in mmdiag ({type(exc).__name__}: {exception_message(exc)}); rerun with "
                  "--debug for the traceback and report it", 2)

    return wrapper  # type: ignore[return-value]


def _fail(message: str, code: int) -> None:
    """Print the traceback (with --debug) and ``error: message``; exit with ``code``."""
    if STATE["debug"]:
        err_console.print(traceback.format_exc(), markup=False, highlight=False)
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


def split_list(value: str | None) -> list[str] | None:
    """'a,b, c' -> ['a', 'b', 'c']; None and '' -> None."""
    if value is None:
        return None
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    return items or None


def parse_pairs(values: list[str] | None, flag: str) -> dict[str, str] | None:
    """['audio=audio_net', ...] -> {'audio': 'audio_net'}; ConfigError on a malformed item."""
    if not values:
        return None
    out: dict[str, str] = {}
    for item in values:
        for part in str(item).split(","):
            if not part.strip():
                continue
            key, sep, val = part.partition("=")
            if not sep or not key.strip() or not val.strip():
                raise ConfigError(f"{flag} expects MODALITY=MODULE (e.g. audio=audio_net); found {part!r}.")
            out[key.strip()] = val.strip()
    return out


class ProgressBar:
    """A rich progress bar on stderr fed by mmdiag's ``progress(stage, done, total)`` callbacks."""

    #: extra columns after the count (subclasses show live numbers there)
    extra_columns: tuple[Any, ...] = ()
    transient: bool = True

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and err_console.is_terminal
        self._progress: Progress | None = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      *self.extra_columns, TimeElapsedColumn(), console=err_console,
                                      transient=self.transient)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self._progress is None:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)


def prepare_out_dir(out: Path, overwrite: bool, marker: str = "report.json", create: bool = False) -> Path:
    """Check ``out`` before any work: refuse to mix with an earlier run unless ``overwrite``.

    The folder is created only when ``create`` (otherwise by the writer, once there is something
    to write), so a run that fails while loading leaves nothing behind.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder. Choose another --out.")
    if (out / marker).exists() and not overwrite:
        raise ConfigError(
            f"--out {out} already holds a {marker} from an earlier run. Pass --overwrite to replace it, "
            "or choose another --out."
        )
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def iter_lines(text: str) -> Iterator[str]:
    yield from (line for line in text.splitlines() if line.strip())
