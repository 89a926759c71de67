"""``mmdiag acquire``: choose which pool samples to label (RL-MBA and baselines), or simulate the choice."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from mmdiag.cli import options as opt
from mmdiag.cli.analyze import adapter_spec
from mmdiag.cli.common import (ProgressBar, console, err_console, handle_errors, prepare_out_dir, print_table,
                               split_list)
from mmdiag.cli.flags import to_cli
from mmdiag.errors import ConfigError, MmdiagWarning
from mmdiag.io import write_atomic

HELP = """Choose which samples of an unlabelled pool to label next, or simulate the choice.

Rank a pool: scores --pool with --model/--checkpoint (one pass; the pool needs no labels) and writes
OUT/selection.csv (the --budget rows to label, ranked, with the score and its parts), OUT/report.json
and, for --strategy rlmba, OUT/policy.json (pass it back with --policy in the next round, with
--val-data to reward the last round's choice).

Simulate (--simulate): hides the labels of --data, starts every strategy of --strategies from the
same --initial labelled rows and round-0 model, and for --rounds rounds acquires --budget rows,
retrains from scratch (--epochs, --fix) and evaluates on --val-data. Writes OUT/curves.csv,
OUT/curves.png and OUT/summary.csv (area under each curve, with 95% intervals over --seeds).
An interrupted simulation continues with --resume."""

_STRATEGY_NAMES = "rlmba, bmmal, badge, entropy or random"


def _load_pool(spec: str, modalities: tuple[str, ...]) -> dict[str, Any]:
    """The modality arrays of a .npz or .pt pool file (a label array, if any, is not read)."""
    import numpy as np
    import torch

    path = Path(spec).expanduser()
    if path.suffix.lower() not in (".npz", ".pt", ".pth"):
        raise ConfigError(f"--pool must be a .npz or .pt file of modality arrays; found {spec!r}.")
    if not path.is_file():
        raise ConfigError(f"--pool {path} does not exist (looked in {path.resolve()}).")
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            found = list(npz.files)
            arrays = {m: npz[m] for m in modalities if m in npz.files}
    else:
        data = torch.load(path, weights_only=True)
        if not isinstance(data, dict):
            raise ConfigError(f"--pool {path} holds a {type(data).__name__}; expected a dict of tensors.")
        found = list(data)
        arrays = {m: data[m] for m in modalities if m in data}
    missing = [m for m in modalities if m not in arrays]
    if missing:
        raise ConfigError(f"--pool {path} has no array for modality {', '.join(missing)}; expected "
                          f"{', '.join(modalities)}; found {', '.join(found) or 'no arrays'}.")
    return arrays


def _print_warnings(notes: list[str]) -> None:
    for note in notes:
        err_console.print(f"[bold yellow]warning:[/] {escape(to_cli(note))}", highlight=False, soft_wrap=True)


def _rank(o: dict[str, Any], quiet: bool) -> None:
    """Rank mode: one pool pass and one selection; writes selection.csv, report.json (and policy.json)."""
    from mmdiag.acquire import from_json, rank_pool
    from mmdiag.acquire.curves import to_csv
    from mmdiag.acquire.simulate import evaluation_of
    from mmdiag.loading import build_model, load_checkpoint, load_dataset

    for key in ("model", "pool"):
        if not o.get(key):
            raise ConfigError(f"--{key} is required to rank a pool (or pass --simulate).")
    out = prepare_out_dir(Path(o["out"]), bool(o["overwrite"]), marker="selection.csv", create=True)
    model = build_model(o["model"], None)
    if o.get("checkpoint"):
        load_checkpoint(model, o["checkpoint"], trust=bool(o["trust_checkpoint"]), key=o.get("checkpoint_key"),
                        strip_prefix=o.get("strip_prefix"))
    mods = tuple(split_list(o.get("modalities")) or ())
    labelled = None
    if o.get("labelled"):
        labelled, found = load_dataset(o["labelled"], list(mods) or None)
        mods = tuple(found)
    if not mods:
        raise ConfigError("Name the modalities: pass --labelled (its arrays name them) or --modalities a,b.")
    adapter = adapter_spec(o, mods).build(model, seed=int(o["seed"]))
    policy = None
    if o.get("policy"):
        if not Path(o["policy"]).is_file():
            raise ConfigError(f"--policy {o['policy']} does not exist; expected the policy.json of an earlier "
                              "`mmdiag acquire --strategy rlmba` run.")
        policy = from_json(Path(o["policy"]).read_text(), f"--policy {o['policy']}")
    notes = []
    evaluation = None
    if o["strategy"] == "rlmba":
        # AMCB's reward compares this evaluation with the one kept in policy.json by the last round
        reference = load_dataset(o["val_data"], list(mods))[0] if o.get("val_data") else labelled
        if reference is None and policy is not None:
            raise ConfigError("--policy continues AMCB, whose reward needs the current model's accuracy on "
                              "labelled data: pass --val-data (or --labelled).")
        if reference is None:
            notes.append("no labelled data was given, so policy.json keeps no evaluation and the next round "
                         "cannot reward this one; pass --val-data (or --labelled)")
        elif not o.get("val_data"):
            notes.append("the AMCB evaluation was measured on the labelled (training) data, where accuracy is "
                         "optimistic; pass --val-data for a held-out reward")
        if reference is not None:
            evaluation = evaluation_of(adapter, reference, device=o["device"], seed=int(o["seed"]))
    pool = _load_pool(o["pool"], mods)
    with ProgressBar(not quiet) as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", MmdiagWarning)
        sel = rank_pool(adapter, pool, int(o["budget"]), strategy=o["strategy"], policy=policy,
                        evaluation=evaluation, seed=int(o["seed"]), batch_size=int(o["batch_size"]),
                        device=o["device"], progress=bar)
    notes = sel.warnings + notes
    _print_warnings(notes)
    write_atomic(out / "selection.csv", to_csv(sel.rows))
    write_atomic(out / "report.json", json.dumps({**sel.report, "notes": notes, "pool": o["pool"],
                                                  "model": o["model"],
                                                  "checkpoint": str(o["checkpoint"]) if o.get("checkpoint") else None},
                                                 indent=2) + "\n")
    if sel.policy is not None:
        from mmdiag.acquire import to_json

        write_atomic(out / "policy.json", to_json(sel.policy))
    rep = sel.report
    console.print(f"[bold]{escape(rep['strategy'])}[/]: chose {rep['budget']} of {rep['pool_size']} pool rows "
                  f"(embedding: {rep['embedding']})", highlight=False)
    console.print(escape(rep["why"]), highlight=False, soft_wrap=True)
    if rep.get("reward") is not None:
        console.print(f"AMCB reward of the last round: {rep['reward']:+.4f}", highlight=False)
    console.print(f"[dim]wrote {out / 'selection.csv'} and {out / 'report.json'}"
                  + (f" and {out / 'policy.json'}" if sel.policy is not None else "") + "[/]", highlight=False)


def _simulate(o: dict[str, Any], quiet: bool) -> None:
    """Simulation mode: curves.csv, curves.png, summary.csv and the summary table."""
    from mmdiag.acquire import SimulationSpec, simulate, summary
    from mmdiag.acquire.curves import to_csv
    from mmdiag.loading import build_model, load_dataset
    from mmdiag.render.acquire_curves import plot_acquisition_curves
    from mmdiag.specs import TrainSpec

    for key in ("model", "data", "val_data"):
        if not o.get(key):
            raise ConfigError(f"--simulate needs --{key.replace('_', '-')}.")
    train_ds, found = load_dataset(o["data"], split_list(o.get("modalities")))
    val_ds, _ = load_dataset(o["val_data"], list(found))
    fix_params = dict(str(p).partition("=")[::2] for p in (o.get("fix_param") or []))
    spec = SimulationSpec(initial=int(o["initial"]), budget=int(o["budget"]), rounds=int(o["rounds"]),
                          strategies=tuple(split_list(o["strategies"]) or ()), seeds=int(o["seeds"]),
                          seed=int(o["seed"]), fix=o["fix"], fix_params=fix_params,
                          train=TrainSpec(epochs=int(o["epochs"]), optimizer=o["optimizer"], lr=float(o["lr"]),
                                          batch_size=int(o["batch_size"]), device=o["device"]))
    build_model(o["model"], None)  # a broken factory fails here, before any training
    out = Path(o["out"])
    try:
        with ProgressBar(not quiet) as bar, warnings.catch_warnings():
            warnings.simplefilter("ignore", MmdiagWarning)
            result = simulate(functools.partial(build_model, o["model"], None), train_ds, val_ds, spec,
                              adapter_spec(o, found), out, jobs=int(o["jobs"]), resume=bool(o["resume"]),
                              progress=bar)
    except KeyboardInterrupt:
        err_console.print(f"[yellow]interrupted[/]; every finished round is saved. Continue with the same "
                          f"command and --resume (--out {escape(str(out))}).", highlight=False)
        raise typer.Exit(130) from None
    _print_warnings(result.notes)
    rows = summary(result.rows)
    write_atomic(out / "curves.csv", to_csv(result.rows))
    write_atomic(out / "summary.csv", to_csv(rows))
    write_atomic(out / "summary.json", json.dumps({"summary": rows, "notes": result.notes,
                                                   "settings": spec.describe()}, indent=2) + "\n")
    plot_acquisition_curves(result.rows, out / "curves.png")
    print_table(console, summary_table(rows))
    console.print(f"[dim]wrote {out / 'curves.csv'}, {out / 'curves.png'} and {out / 'summary.csv'}[/]",
                  highlight=False)


def summary_table(rows: list[dict[str, Any]]) -> Table:
    """Area under the fused-accuracy, weakest-modality and balance curves, mean [95% interval] over seeds."""
    table = Table(title="area under each curve (mean over seeds [95% t-interval])", title_justify="left")
    table.add_column("strategy", style="bold")
    for curve in ("accuracy", "weakest", "balance"):
        table.add_column(curve, justify="right")
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        cells = [strategy]
        for curve in ("accuracy", "weakest", "balance"):
            r = next(x for x in rows if x["strategy"] == strategy and x["curve"] == curve)
            ci = "" if r["seeds"] < 2 else f" [{r['low']:.3f}, {r['high']:.3f}]"
            cells.append(f"{r['area']:.3f}{ci}")
        table.add_row(*cells)
    return table


def _check(o: dict[str, Any]) -> None:
    from mmdiag.acquire import STRATEGIES

    if o["strategy"] not in STRATEGIES:
        raise ConfigError(f"--strategy must be {_STRATEGY_NAMES}; found {o['strategy']!r}.")
    for key in ("budget", "jobs", "batch_size"):
        if int(o[key]) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1; found {o[key]}.")


@handle_errors
def acquire(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model factory: FILE.py:fn or package.module:fn."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Weights of the current model (rank mode)."),
    labelled: Optional[str] = typer.Option(None, "--labelled", help="The labelled data so far (names the modalities; the AMCB reward without --val-data)."),
    pool: Optional[str] = typer.Option(None, "--pool", help="The unlabelled pool: FILE.npz or FILE.pt of modality arrays (a label array is not read)."),
    budget: int = typer.Option(100, "--budget", "-b", help="Samples to choose (per round with --simulate)."),
    strategy: str = typer.Option("rlmba", "--strategy", help=f"Acquisition strategy: {_STRATEGY_NAMES}."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="policy.json of the previous round (rlmba): continue AMCB from it."),
    simulate: bool = typer.Option(False, "--simulate", help="Simulate acquisition on --data (labels hidden) instead of ranking a pool."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Training data whose labels the simulation hides (FILE.npz, FILE.pt or FILE.py:fn)."),
    val_data: Optional[str] = typer.Option(None, "--val-data", help="Validation data: the curves (--simulate) and the AMCB reward."),
    initial: int = typer.Option(200, "--initial", help="Labelled rows at round 0 (--simulate)."),
    rounds: int = typer.Option(8, "--rounds", help="Acquisition rounds (--simulate)."),
    strategies: str = typer.Option("rlmba,bmmal,badge,entropy,random", "--strategies", help="Comma-separated strategies to simulate."),
    seeds: int = typer.Option(3, "--seeds", help="Simulation seeds (seed, seed+1, ...)."),
    epochs: int = typer.Option(10, "--epochs", help="Training epochs of each retraining (--simulate)."),
    optimizer: str = typer.Option("adam", "--optimizer", help="sgd, adam or adamw (--simulate)."),
    lr: float = typer.Option(3e-3, "--lr", help="Learning rate (--simulate)."),
    fix: str = typer.Option("none", "--fix", "-f", help="Rebalancing fix of each retraining (--simulate; mmdiag list fixes)."),
    fix_param: Optional[list[str]] = typer.Option(None, "--fix-param", metavar="KEY=VALUE", help="Parameter of the fix (repeatable)."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Processes running strategies in parallel (--simulate)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the simulation in --out after its last finished round."),
    batch_size: int = typer.Option(64, "--batch-size", help="Training batch size (--simulate); scoring batch size x4."),
    seed: int = typer.Option(0, "--seed", help="Seed of the selection draws, the initial set and the training."),
    device: str = opt.DEVICE,
    modalities: Optional[str] = opt.MODALITIES,
    call: Optional[str] = opt.CALL,
    encoder: Optional[list[str]] = opt.ENCODER,
    head: Optional[str] = opt.HEAD,
    mask: str = opt.MASK,
    mask_at: Optional[str] = opt.MASK_AT,
    trust_checkpoint: bool = opt.TRUST,
    checkpoint_key: Optional[str] = opt.CHECKPOINT_KEY,
    strip_prefix: Optional[str] = opt.STRIP_PREFIX,
    out: Path = typer.Option(Path("mmdiag-acquire"), "--out", "-o", help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier selection.csv in --out (rank mode)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Choose which pool samples to label (RL-MBA and baselines), or simulate the choice."""
    o = dict(ctx.params)
    _check(o)
    if simulate:
        _simulate(o, quiet)
    else:
        o["batch_size"] = int(batch_size) * 4  # scoring needs no gradients through the encoders
        _rank(o, quiet)
