"""``mmdiag rebalance``: retrain with the fix the diagnosis calls for; compare before / after / baseline."""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.markup import escape
from rich.progress import TextColumn, TimeRemainingColumn
from rich.table import Table

from mmdiag.cli import config as cfg
from mmdiag.cli import options as opt
from mmdiag.cli.analyze import SETTINGS as ANALYZE_SETTINGS, adapter_spec, analysis_spec
from mmdiag.cli.common import ProgressBar, console, err_console, handle_errors, print_table, split_list
from mmdiag.cli.flags import to_cli
from mmdiag.cli.log_to import check_targets, log_rebalance_to
from mmdiag.errors import ConfigError, MmdiagWarning
from mmdiag.fixes import FIXES
from mmdiag.io import write_atomic
from mmdiag.rebalance.run import AnalysisProgress
from mmdiag.registry import closest
from mmdiag.validation import REBALANCE

if TYPE_CHECKING:  # the specs import torch: only when the command runs
    from mmdiag.specs import AnalysisSpec, TrainSpec

HELP = """Retrain a multimodal classifier with the fix that matches its diagnosis, and compare.

Analyzes --model/--checkpoint on --val-data (before/), trains with --fix (a fix name, or auto: the
fix the verdict recommends) for --epochs on --data, optionally trains the plain model under the same
budget and seed (--baseline), analyzes the results (after/, baseline/) and writes OUT/model.safetensors,
OUT/history.csv, OUT/comparison.json and OUT/comparison.csv. An interrupted run continues with
--resume OUT.

--fix a,b,c or --fix all trains each fix and the plain baseline under the same budget and seed and
writes OUT/leaderboard.csv/.json/.png/.html ranked by --objective; --fix race (or --fix auto --race)
picks the fix by successive halving on held-out training rows and writes what one fix writes plus
OUT/race.csv."""

#: Flags that config files (top level or the [rebalance] table) may set.
SETTINGS = (
    "model", "checkpoint", "data", "val_data", "modalities", "call", "encoder", "head", "mask", "mask_at",
    "trust_checkpoint", "checkpoint_key", "strip_prefix", "fix", "fix_param", "epochs", "optimizer", "lr",
    "weight_decay", "momentum", "batch_size", "seed", "device", "init", "baseline", "grad_clip", "bootstrap",
    "only", "skip", "format", "out", "overwrite", "nan_policy", "num_classes", "missing", "log_to",
    "objective", "jobs", "race", "candidates", "holdout",
)
#: Settings that define the training; a resumed run must not change them.
TRAINING_KEYS = (
    "model", "checkpoint", "checkpoint_key", "strip_prefix", "data", "val_data", "modalities", "call", "encoder",
    "head", "mask", "mask_at", "fix", "fix_param", "epochs", "optimizer", "lr", "weight_decay", "momentum",
    "batch_size", "seed", "init", "baseline", "grad_clip", "nan_policy", "num_classes", "objective", "race",
    "candidates", "holdout",
)
_RUN_FILE = "run.json"
#: The config tables a run keeps in run.json for --resume.
_TABLES = ("fix_params", "model_kwargs", "data_kwargs", "params", "thresholds", "collect")


class _TrainBar(ProgressBar):
    """One rich bar per phase: each analysis (rows evaluated) and each training (epochs, with the
    live loss and the fix's signals), with elapsed and remaining time. The fix choice is printed as
    soon as it is made."""

    extra_columns = (TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    transient = False

    def _say(self, text: str, style: str = "dim") -> None:
        out = self._progress.console if self._progress is not None else err_console
        out.print(f"[{style}]{escape(to_cli(text))}[/]", highlight=False, soft_wrap=True)

    def __call__(self, phase: str, info: Any) -> None:
        if info is None:
            if phase.startswith("fix "):
                self._say(phase, "bold")
            elif self._progress is None:
                self._say(f"{phase}...")
            return
        if self._progress is None:
            if getattr(info, "stage", None) == "epoch":
                self._say(f"{phase}: epoch {info.epoch + 1}/{info.epochs} {_info_text(info)}")
            return
        if isinstance(info, AnalysisProgress):
            total, done, text = info.total, info.done, ""
        else:
            total = info.epochs
            done = info.epoch + (1 if info.stage == "epoch" else info.batch / max(info.batches, 1))
            text = _info_text(info)
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total, info="")
        # the live text is cut to the terminal: a line wider than the terminal wraps and scrolls
        room = max(10, self._progress.console.width - 70)
        self._progress.update(self._tasks[phase], completed=done, info=text[:room])


def _info_text(info: Any) -> str:
    parts = [f"loss {info.loss:.3f}"]
    row = info.row or {}
    if "val_accuracy" in row:
        parts.append(f"val {row['val_accuracy']:.3f}")
    for k, v in sorted(row.items()):
        if k.startswith("unimodal_acc."):
            parts.append(f"{k.split('.', 1)[1]} {v:.3f}")
    for k, v in list(info.signals.items())[:6]:
        parts.append(f"{k} {v:.2f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k} {v}")
    return "  ".join(parts)


def _fmt(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


#: what a change of a headline means, by the result's headline label: (+1 higher is better, -1 lower
#: is better, 0 nearer 0 is better (a signed log-ratio); the words for the table)
_HEADLINE_DIRECTION = {
    "spread": (-1, "lower: more even"), "max ratio": (-1, "lower: more even"),
    "log-ratio": (0, "nearer 0: more even"), "evenness": (+1, "higher: more even"),
    "weakest": (+1, "higher is better"), "lowest cos": (+1, "higher: less conflict"),
    "fused u": (-1, "lower: more certain"), "expected": (+1, "higher is better"),
}


def row_direction(key: str, report: Any) -> tuple[int, str] | None:
    """How to read a change of row ``key`` (see :data:`_HEADLINE_DIRECTION`); None: neither way
    (a per-modality value, which says where the model's reliance moved)."""
    if key == "accuracy":
        return +1, "higher is better"
    res = report.diagnostics.get(key) if report is not None and "." not in key else None
    label = (getattr(res, "headline", "") or "") if res is not None else ""
    return _HEADLINE_DIRECTION.get(label.split(" ")[0] if label.startswith("expected") else label)


def comparison_table(rows: list[dict[str, Any]], fix: str, has_before: bool, has_baseline: bool,
                     after: Any = None) -> Table:
    """Rows of the comparison: value before / after / baseline and the differences (* = intervals
    separate), with a column saying which way is better, and changes coloured by it."""
    table = Table(title=f"rebalance with {fix}: before -> after" + (" vs baseline" if has_baseline else ""),
                  title_justify="left")
    table.add_column("value", style="bold", no_wrap=True)
    table.add_column("better", no_wrap=True)
    if has_before:
        table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    if has_baseline:
        table.add_column("baseline", justify="right")
    if has_before:
        table.add_column("after-before", justify="right")
    if has_baseline:
        table.add_column("after-baseline", justify="right")

    def diff(value: Any, separated: Any, direction: int | None, old: Any) -> str:
        if value is None:
            return "-"
        text = f"{value:+.3f}" + ("*" if separated else "")
        if direction is None or not separated:
            return text
        gain = value * direction if direction else (abs(old or 0) - abs((old or 0) + value))
        return f"[green]{text}[/]" if gain > 0 else f"[red]{text}[/]" if gain < 0 else text

    for r in rows:
        read = row_direction(r["key"], after)
        direction = read[0] if read is not None else None
        cells = [r["key"], read[1] if read is not None else ""]
        if has_before:
            cells.append(_fmt(r["before"]))
        cells.append(_fmt(r["after"]))
        if has_baseline:
            cells.append(_fmt(r["baseline"]))
        if has_before:
            cells.append(diff(r["after_minus_before"], r["separated_after_before"], direction, r["before"]))
        if has_baseline:
            cells.append(diff(r["after_minus_baseline"], r["separated_after_baseline"], direction, r["baseline"]))
        table.add_row(*cells)
    table.caption = ("* the 95% bootstrap intervals do not overlap; green: a change the right way, red: the "
                     "wrong way; per-modality rows show where the reliance moved")
    return table


def _merge_config(ctx: typer.Context, conf: dict[str, Any], source: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resolve flags > [rebalance] table > top-level config > defaults; returns (options, fix params)."""
    table = cfg.table(conf, "rebalance")
    fix_params = dict(table.pop("fix_params", {}) or {})
    if not isinstance(fix_params, dict):
        raise ConfigError(f"[rebalance.fix_params] in {source or 'the config'} must be a table.")
    for key in cfg.normalise_keys(table):
        if key not in SETTINGS:
            near = closest(key, list(SETTINGS) + ["fix_params"])
            hint = f" Did you mean {near!r}?" if near else ""
            raise ConfigError(f"Unknown key {key!r} in [rebalance] of {source or 'the config'}.{hint}")
    top = {k: v for k, v in conf.items() if k != "rebalance"}
    merged_conf = {**top, **table}
    allowed = set(SETTINGS) | set(ANALYZE_SETTINGS)
    o = cfg.resolve(ctx, dict(ctx.params), merged_conf, source, allowed, schema=REBALANCE)
    return o, fix_params


def _resume_options(ctx: typer.Context, o: dict[str, Any], folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options saved by the run in ``folder``; flags given now must agree with them."""
    path = folder / _RUN_FILE
    if not path.is_file():
        raise ConfigError(
            f"--resume {folder}: no {_RUN_FILE} there, so it is not the --out of an mmdiag rebalance run. "
            "Point --resume at the folder given to --out before."
        )
    saved = json.loads(path.read_text())
    opts, tables = dict(saved.get("options", {})), dict(saved.get("tables", {}))
    changed = []
    for key in TRAINING_KEYS:
        src = getattr(ctx.get_parameter_source(key), "name", None)
        if src == "COMMANDLINE" and _normal(o.get(key)) != _normal(opts.get(key)):
            changed.append(f"--{key.replace('_', '-')} {o.get(key)!r} (the run used {opts.get(key)!r})")
    if changed:
        raise ConfigError(
            f"--resume {folder} continues a run with its own settings; these flags differ: {'; '.join(changed)}. "
            "Drop them, or start a new run with another --out."
        )
    for key in ("device", "quiet", "bootstrap", "only", "skip", "format", "jobs"):
        src = getattr(ctx.get_parameter_source(key), "name", None)
        if src == "COMMANDLINE":
            opts[key] = o.get(key)
    opts["out"] = str(folder)
    return cfg.check_flags(ctx, opts, REBALANCE), tables


def _normal(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, Path):
        return str(v)
    return v


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder. Choose another --out.")
    earlier = [p for p in ("comparison.json", "checkpoint.pt", "baseline/checkpoint.pt", _RUN_FILE) if (out / p).exists()]
    if earlier and not overwrite:
        raise ConfigError(
            f"--out {out} already holds an earlier rebalance run ({', '.join(earlier)}). Pass --resume {out} to "
            "continue it, --overwrite to start over, or choose another --out."
        )
    if overwrite:
        for p in ("checkpoint.pt", "baseline/checkpoint.pt", "fix.json", _RUN_FILE):
            if (out / p).is_file():
                (out / p).unlink()
    out.mkdir(parents=True, exist_ok=True)


@handle_errors
def rebalance(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model factory: FILE.py:fn or package.module:fn."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Weights of the trained model (the 'before' model)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Training data: FILE.npz, FILE.pt or FILE.py:fn."),
    val_data: Optional[str] = typer.Option(None, "--val-data", help="Validation data for the analyses and the history."),
    fix: str = typer.Option("auto", "--fix", "-f", help="A fix name (mmdiag list fixes), auto: the fix the diagnosis recommends, a list a,b,c or all: a leaderboard, or race: the fix that wins successive halving."),
    fix_param: Optional[list[str]] = typer.Option(None, "--fix-param", metavar="[FIX.]KEY=VALUE", help="KEY=VALUE parameter of the fix (repeatable; FIX.KEY=VALUE for one fix only)."),
    epochs: int = typer.Option(20, "--epochs", help="Training epochs (fix run and baseline)."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd, adam or adamw."),
    lr: float = typer.Option(1e-2, "--lr", help="Learning rate."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", help="Weight decay."),
    momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum."),
    batch_size: int = typer.Option(64, "--batch-size", help="Training batch size (per process under torchrun)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation, data order, fixes and analyses."),
    device: str = opt.DEVICE,
    init: str = typer.Option("scratch", "--init", help="scratch (fresh model from the factory) or checkpoint (fine-tune)."),
    baseline: bool = typer.Option(False, "--baseline/--no-baseline", help="Also train the plain model (fix none) under the same budget and seed (--no-baseline overrides a config that asks for it)."),
    objective: str = typer.Option("fused", "--objective", help="Leaderboard ranking and race selection: fused, weakest, balance or deployment (needs --missing)."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Leaderboard and race: candidates trained at once, one process each."),
    race: bool = typer.Option(False, "--race", help="With --fix auto: pick the fix by a race (as --fix race)."),
    candidates: Optional[str] = typer.Option(None, "--candidates", help="Comma-separated fixes of a race (default: every registered fix and none)."),
    holdout: float = typer.Option(0.2, "--holdout", help="Race: fraction of the training rows held out to score the rungs (not trained on)."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Clip the global gradient norm to this value."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted run whose --out was DIR."),
    modalities: Optional[str] = opt.MODALITIES,
    call: Optional[str] = opt.CALL,
    encoder: Optional[list[str]] = opt.ENCODER,
    head: Optional[str] = opt.HEAD,
    mask: str = opt.MASK,
    mask_at: Optional[str] = opt.MASK_AT,
    trust_checkpoint: bool = opt.TRUST,
    checkpoint_key: Optional[str] = opt.CHECKPOINT_KEY,
    strip_prefix: Optional[str] = opt.STRIP_PREFIX,
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples of the analyses' 95% intervals."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated diagnostics for the analyses."),
    missing: Optional[str] = opt.MISSING_REBALANCE,
    skip: Optional[str] = typer.Option(None, "--skip", help="Comma-separated diagnostics to leave out of the analyses."),
    format: Optional[str] = typer.Option(None, "--format", help="Report renderings of before/after/baseline: json,csv,html,png."),
    nan_policy: str = opt.NAN_POLICY,
    num_classes: Optional[int] = opt.NUM_CLASSES,
    out: Path = typer.Option(Path("mmdiag-rebalance"), "--out", "-o", help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an --out that holds an earlier run."),
    config: Optional[Path] = opt.CONFIG,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; print only the result line."),
    log_to: Optional[list[str]] = opt.LOG_TO,
) -> None:
    """Retrain with the fix the diagnosis calls for, and compare before / after / baseline."""
    from mmdiag.loading import build_model
    from mmdiag.cli import leaderboard_view as many
    from mmdiag.rebalance import rebalance as run_rebalance
    from mmdiag.train import Interrupted

    if resume is not None:
        o, saved = _resume_options(ctx, dict(ctx.params), resume)
        tables = {k: dict(saved.get(k) or {}) for k in _TABLES}
        out_dir = resume
    else:
        o, tables = _fresh_options(ctx, config)
        out_dir = Path(o["out"])
    _check_options(o, tables["fix_params"])
    many.check_objective_data(o, tables["params"])  # before run.json is written
    trackers = check_targets(o.get("log_to"))
    main_rank = int(os.environ.get("RANK", "0") or 0) == 0  # under torchrun only rank 0 writes
    if resume is None and main_rank:
        _check_out(out_dir, bool(o.get("overwrite")))
    spec, kwargs = o["model"], dict(tables["model_kwargs"])
    build_model(spec, kwargs)  # a broken factory fails here, before any training
    train_ds, val_ds, found = _load_data(o, tables["data_kwargs"])
    if resume is None and main_rank:
        options = {k: _normal(o.get(k)) for k in SETTINGS}
        write_atomic(out_dir / _RUN_FILE, json.dumps({"options": options, "tables": tables}, indent=2,
                                                     default=str) + "\n")
    settings = {"model": spec, "checkpoint": None if not o.get("checkpoint") else str(o["checkpoint"]),
                "data": o["data"], "val_data": o.get("val_data")}
    quiet = bool(o.get("quiet", quiet))
    mode = many.mode_of(o)
    try:
        with _TrainBar(not quiet) as bar, warnings.catch_warnings():
            warnings.simplefilter("ignore", MmdiagWarning)  # printed from the reports' notes below
            run = run_rebalance if mode is None else many.runner(mode, o)
            result = run(  # a partial, not a lambda: --jobs sends the factory to other processes
                functools.partial(build_model, spec, kwargs), train_ds, val_data=val_ds,
                checkpoint=o.get("checkpoint"), trust_checkpoint=bool(o.get("trust_checkpoint")),
                checkpoint_key=o.get("checkpoint_key"), strip_prefix=o.get("strip_prefix"),
                fix=o["fix"], fix_params=tables["fix_params"], init=o["init"], baseline=bool(o["baseline"]),
                train=train_spec(o), adapter=adapter_spec(o, found), analysis=_analysis_spec(o, tables),
                out_dir=out_dir, resume=resume is not None, settings=settings,
                progress=None if quiet or not main_rank else bar,
                report_formats=o.get("format") or ("json", "csv", "html", "png"),
            )
    except Interrupted as exc:
        err_console.print(f"[yellow]interrupted[/] at epoch {exc.epoch}, batch {exc.batch}; the state is saved. "
                          f"Continue with: mmdiag rebalance --resume {out_dir}", highlight=False)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:  # outside training (an analysis, a setup step)
        can_resume = out_dir is not None and (Path(out_dir) / _RUN_FILE).is_file()
        err_console.print("[yellow]interrupted[/]" + (f"; continue with: mmdiag rebalance --resume {out_dir}"
                                                      if can_resume else ""), highlight=False)
        raise typer.Exit(130) from None
    if main_rank and mode is not None:
        result = many.show(result, quiet, out_dir)
    if main_rank and result is not None and result.after is not None:  # under torchrun only rank 0 prints
        _print_result(result, quiet, out_dir)
        log_rebalance_to(trackers, result, out_dir, quiet)


def _fresh_options(ctx: typer.Context, config: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options, tables) of a new run from flags and config, every table checked before any work.

    The tables are what ``run.json`` keeps for ``--resume``: ``fix_params``, ``model_kwargs``,
    ``data_kwargs``, ``params`` (of the diagnostics), ``thresholds`` and ``collect``.
    """
    conf, source = cfg.find_config(config)
    o, fix_params = _merge_config(ctx, conf, source)
    tables = {"model_kwargs": cfg.table(conf, "model_kwargs"), "data_kwargs": cfg.table(conf, "data_kwargs"),
              "params": cfg.diagnostic_params(conf, source), "thresholds": cfg.table(conf, "thresholds"),
              "collect": cfg.table(conf, "collect")}
    # the deployment distribution is a parameter of the analyses' deployment diagnostic (kept for --resume)
    tables["params"] = cfg.with_deployment(tables["params"], cfg.deployment_params(conf, source, o.get("missing")))
    cfg.verdict_thresholds(conf, source)  # unknown keys and bad values fail before any work
    cfg.collect_settings(conf, source, device=str(o["device"]))
    for item in o.get("fix_param") or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--fix-param expects KEY=VALUE (e.g. alpha=0.8); found {item!r}.")
        fix_params[key.strip()] = value.strip()
    return o, {"fix_params": fix_params, **tables}


def _check_options(o: dict[str, Any], fix_params: dict[str, Any]) -> None:
    """The options a run needs, and a named fix with its parameters, checked before anything runs."""
    from mmdiag.cli.leaderboard_view import check_many
    from mmdiag.rebalance import make_fix
    from mmdiag.train import OPTIMIZERS

    if not o.get("model"):
        raise ConfigError("--model is required: a factory such as my_model.py:build or package.module:build.")
    if not o.get("data"):
        raise ConfigError("--data is required: the training data (FILE.npz, FILE.pt or FILE.py:make_dataset).")
    if o["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; found {o['optimizer']!r}.")
    if o["init"] not in ("scratch", "checkpoint"):
        raise ConfigError(f"--init must be scratch or checkpoint; found {o['init']!r}.")
    if o["init"] == "checkpoint" and not o.get("checkpoint"):
        raise ConfigError("--init checkpoint fine-tunes the trained weights, so it needs --checkpoint FILE.")
    if int(o["epochs"]) < 1:
        raise ConfigError(f"--epochs must be at least 1; found {o['epochs']}.")
    if check_many(o, fix_params) is None and o["fix"] != "auto":
        try:  # unknown fix or parameter: exit 2 before anything runs
            make_fix(o["fix"], fix_params)
        except ConfigError as exc:
            if o["fix"] in FIXES:
                raise
            raise ConfigError(f"{exc} `fix` also takes auto (the verdict's choice), all (a leaderboard of "
                              "every fix), race (successive halving) or a comma-separated list of fixes.") from None


def _load_data(o: dict[str, Any], data_kwargs: dict[str, Any]) -> tuple[Any, Any, tuple[str, ...]]:
    """(training data, validation data or None, modalities)."""
    from mmdiag.loading import load_dataset

    nan_policy = o.get("nan_policy") or "error"
    kwargs = dict(data_kwargs) or None
    train_ds, found = load_dataset(o["data"], split_list(o.get("modalities")), kwargs=kwargs,
                                   nan_policy=nan_policy, num_classes=o.get("num_classes"))
    val_ds = None
    if o.get("val_data"):
        val_ds, _ = load_dataset(o["val_data"], list(found), kwargs=kwargs, nan_policy=nan_policy,
                                 num_classes=o.get("num_classes"))
    return train_ds, val_ds, tuple(found)


def train_spec(o: dict[str, Any]) -> TrainSpec:
    """The :class:`~mmdiag.specs.TrainSpec` of resolved options (--epochs, --optimizer, --lr, ...)."""
    from mmdiag.specs import TrainSpec

    return TrainSpec(epochs=int(o["epochs"]), optimizer=o["optimizer"], lr=float(o["lr"]),
                     weight_decay=float(o["weight_decay"]), momentum=float(o["momentum"]),
                     batch_size=int(o["batch_size"]), seed=int(o["seed"]), device=str(o["device"]),
                     grad_clip=o.get("grad_clip"))


def _analysis_spec(o: dict[str, Any], tables: dict[str, Any]) -> AnalysisSpec:
    thresholds = cfg.verdict_thresholds({"thresholds": tables["thresholds"]})
    collect = cfg.collect_settings({"collect": tables["collect"]}, device=str(o["device"]))
    return analysis_spec(o, tables["params"], collect, thresholds)


def _print_result(result: Any, quiet: bool, out_dir: Path) -> None:
    """Notes, each report's warnings once, the fix choice, the comparison table and the result line."""
    for note in result.notes if not quiet else ():
        console.print(f"[dim]note: {escape(to_cli(note))}[/]", highlight=False)
    said: set[str] = set()
    for report in (result.before, result.baseline, result.after):
        for note in (report.notes if report is not None else []):
            if note not in said:  # each change of method once, on stderr
                said.add(note)
                err_console.print(f"[bold yellow]warning:[/] {escape(to_cli(note))}", highlight=False,
                                  soft_wrap=True)
    if not quiet:
        print_table(console, comparison_table(result.comparison, result.fix, result.before is not None,
                                              result.baseline is not None, result.after))
        if result.after is not None:
            console.print(f"[bold]verdict after {escape(result.fix)}:[/] {escape(result.after.verdict.headline())}",
                          highlight=False)
            headline = result.after.verdict.headline()
            for reason in result.after.verdict.reasons:
                if reason not in headline:  # the headline of "no dominance" already holds its one reason
                    console.print(f"  - {escape(to_cli(reason))}", highlight=False)
    console.print(_result_line(result), highlight=False, soft_wrap=True)
    if not quiet:
        console.print(f"[dim]wrote {out_dir / 'model.safetensors'}, {out_dir / 'history.csv'}, "
                      f"{out_dir / 'comparison.csv'} and the reports {out_dir / 'after'}/report.json"
                      + (f", {out_dir / 'baseline'}/report.json" if result.baseline is not None else "") + "[/]",
                      soft_wrap=True)


def _result_line(result: Any) -> str:
    def val(key: str, col: str) -> str:
        try:
            return _fmt(result.row(key)[col])
        except KeyError:
            return "-"

    mods = result.after.modalities
    parts = [f"fused accuracy {val('accuracy', 'after')}"]
    parts += [f"{m}-only {val(f'unimodal.{m}', 'after')}" for m in mods]
    ref = "baseline" if result.baseline is not None else "before" if result.before is not None else None
    text = f"after {result.fix}: " + ", ".join(parts)
    if ref:
        refs = [f"fused {val('accuracy', ref)}"] + [f"{m}-only {val(f'unimodal.{m}', ref)}" for m in mods]
        text += f" ({ref}: " + ", ".join(refs) + ")"
    return text
