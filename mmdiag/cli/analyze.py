"""``mmdiag analyze``: load the user's model, checkpoint and data; diagnose; write the report."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import typer
from rich.markup import escape

from mmdiag.cli import config as cfg
from mmdiag.cli import options as opt
from mmdiag.cli.common import STATE, ProgressBar, console, err_console, handle_errors, parse_pairs, prepare_out_dir, split_list
from mmdiag.cli.log_to import check_targets, log_report_to
from mmdiag.cli.summary import print_details, print_summary, print_warnings
from mmdiag.errors import ConfigError, MmdiagWarning
from mmdiag.io import staged_folder

if TYPE_CHECKING:  # the specs import torch: only when the command runs
    from mmdiag.specs import AdapterSpec, AnalysisSpec

HELP = """Diagnose modality imbalance of a trained multimodal classifier.

Loads --model (a factory: FILE.py:fn or package.module:fn) and --checkpoint, runs the model over
--data once, computes the diagnostics and writes OUT/report.json, OUT/metrics.csv, OUT/report.html
and OUT/plots/. With --gate, the rules of [gate] in the config are checked right after (exit codes as
for `mmdiag gate`)."""

def balance_of_help() -> str:
    """The --balance-of help: the measures balance can summarise, as the registry declares them."""
    from mmdiag.diagnostics.balance import measures

    return ("Contribution measure behind 'balance' (default shapley): " + ", ".join(measures())
            + " (every diagnostic declared a shareable contribution measure, plug-ins included).")


#: Flags that config files may set (the command's parameter names).
SETTINGS = (
    "model", "checkpoint", "data", "modalities", "call", "encoder", "head", "mask", "mask_at",
    "trust_checkpoint", "checkpoint_key", "strip_prefix", "batch_size", "num_workers", "device", "seed",
    "bootstrap", "only", "skip",
    "max_subsets", "max_probe_samples", "probe_data", "per_sample", "out", "overwrite", "nan_policy",
    "balance_of", "save_evidence", "num_classes", "run_gate", "baseline", "restore", "missing", "ood_data",
    "ood_quantile", "log_to",
)


def load_inputs(o: dict[str, Any], config: dict[str, Any]) -> tuple[Any, Any, tuple[str, ...], dict[str, Any]]:
    """(model, dataset, modalities, settings for the report) from resolved options."""
    from mmdiag.loading import build_model, checkpoint_settings, load_checkpoint, load_dataset

    if not o.get("model"):
        raise ConfigError("--model is required: a factory such as my_model.py:build or package.module:build.")
    if not o.get("data"):
        raise ConfigError("--data is required: FILE.npz, FILE.pt, or a factory FILE.py:make_dataset.")
    model = build_model(o["model"], cfg.table(config, "model_kwargs"))
    info = None
    if o.get("checkpoint"):
        info = load_checkpoint(model, o["checkpoint"], trust=bool(o.get("trust_checkpoint")),
                               key=o.get("checkpoint_key"), strip_prefix=o.get("strip_prefix"))
    data_kwargs = cfg.table(config, "data_kwargs") or None
    dataset, modalities = load_dataset(o["data"], split_list(o.get("modalities")), kwargs=data_kwargs,
                                       nan_policy=o.get("nan_policy") or "error",
                                       num_classes=o.get("num_classes"))
    settings = {
        "model": o["model"],
        "checkpoint": o.get("checkpoint"),
        **checkpoint_settings(info),
        "data": o["data"],
    }
    return model, dataset, tuple(modalities), settings


def adapter_spec(o: dict[str, Any], modalities: Sequence[str] | None) -> AdapterSpec:
    """The :class:`~mmdiag.specs.AdapterSpec` of resolved options (--modalities, --call, --encoder, ...)."""
    from mmdiag.specs import AdapterSpec

    return AdapterSpec(modalities=tuple(modalities) if modalities else None, call=o.get("call"),
                       encoders=parse_pairs(o.get("encoder"), "--encoder"), head=o.get("head"), mask=o["mask"],
                       mask_at=o.get("mask_at"))


def analysis_spec(o: dict[str, Any], params: dict[str, Any], collect: Any, thresholds: Any) -> AnalysisSpec:
    """The :class:`~mmdiag.specs.AnalysisSpec` of resolved options (--only, --skip, --bootstrap, --seed)
    with the config's diagnostic parameters, collection settings and verdict thresholds."""
    from mmdiag.specs import AnalysisSpec

    return AnalysisSpec(only=split_list(o.get("only")), skip=split_list(o.get("skip")), params=params,
                        bootstrap=int(o["bootstrap"]), seed=int(o["seed"]), collect=collect, thresholds=thresholds)


def no_checkpoint_note(o: dict[str, Any]) -> str | None:
    """The warning for a run without --checkpoint (a factory may load its weights itself)."""
    if o.get("checkpoint"):
        return None
    return (f"no --checkpoint: analysing the weights that the factory {o.get('model')} returns. If it does "
            "not load trained weights itself, these numbers describe an untrained model.")


@handle_errors
def analyze(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model factory: FILE.py:fn or package.module:fn."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Weights: a state_dict or training checkpoint (.pt/.pth/.bin/.ckpt), .safetensors, or a Hugging Face style folder."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="FILE.npz, FILE.pt or a dataset factory FILE.py:fn."),
    modalities: Optional[str] = opt.MODALITIES,
    call: Optional[str] = opt.CALL,
    encoder: Optional[list[str]] = opt.ENCODER,
    head: Optional[str] = opt.HEAD,
    mask: str = opt.MASK,
    mask_at: Optional[str] = opt.MASK_AT,
    trust_checkpoint: bool = opt.TRUST,
    checkpoint_key: Optional[str] = opt.CHECKPOINT_KEY,
    strip_prefix: Optional[str] = opt.STRIP_PREFIX,
    batch_size: int = typer.Option(256, "--batch-size", help="Evaluation batch size."),
    num_workers: int = typer.Option(0, "--num-workers", help="DataLoader workers."),
    device: str = opt.DEVICE,
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice (bootstrap, subsamples, masks)."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% intervals (0: none)."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated diagnostics to run."),
    skip: Optional[str] = typer.Option(None, "--skip", help="Comma-separated diagnostics to leave out."),
    max_subsets: int = typer.Option(256, "--max-subsets", help="Refuse more modality subsets (2^M) than this."),
    max_probe_samples: int = typer.Option(2000, "--max-probe-samples", help="Cap on samples whose features feed probes and prototypes."),
    probe_data: Optional[str] = typer.Option(None, "--probe-data", help="Separate data to train linear probes on."),
    missing: Optional[str] = opt.MISSING,
    ood_data: Optional[str] = typer.Option(None, "--ood-data", help="New data to score for distribution shift against --data (same formats; labels optional; is_ood or is_ood_<modality> flags give AUROCs): runs the ood diagnostic on all its rows."),
    ood_quantile: Optional[float] = typer.Option(None, "--ood-quantile", help="Reference quantile of the ood threshold (default 0.95: 5% of in-distribution samples lie beyond it)."),
    per_sample: bool = typer.Option(False, "--per-sample", help="Also write per-sample scores to OUT/per_sample.csv."),
    balance_of: Optional[str] = typer.Option(None, "--balance-of", help=balance_of_help()),
    nan_policy: str = opt.NAN_POLICY,
    num_classes: Optional[int] = opt.NUM_CLASSES,
    save_evidence: bool = typer.Option(False, "--save-evidence", help="Also write the collected evidence to OUT/evidence.pt."),
    out: Path = typer.Option(Path("mmdiag-report"), "--out", "-o", help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs of an earlier run in --out."),
    config: Optional[Path] = opt.CONFIG,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the verdict line."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json on stdout instead of the summary (warnings stay on stderr)."),
    run_gate: bool = typer.Option(False, "--gate", help="After the analysis, check the rules of [gate] in the config (exit 1 when one fails)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Earlier report.json that 'baseline' in gate rules refers to."),
    restore: Optional[Path] = typer.Option(None, "--restore", help="Folder holding restore.safetensors (from `rebalance --fix restore`): evaluate every modality combination with the missing modalities restored by that translator instead of masked."),
    log_to: Optional[list[str]] = opt.LOG_TO,
) -> None:
    """Diagnose modality imbalance of a trained multimodal classifier."""
    from mmdiag.api import analyze_with
    from mmdiag.render import write_outputs

    conf, source = cfg.find_config(config)
    o = cfg.resolve(ctx, dict(ctx.params), conf, source, SETTINGS)
    # settings errors first: they are cheaper to find than an output folder, a model and data load
    cs = cfg.collect_settings(conf, source, batch_size=int(o["batch_size"]), num_workers=int(o["num_workers"]),
                              device=str(o["device"]), max_feature_samples=int(o["max_probe_samples"]),
                              max_subsets=int(o["max_subsets"]))
    params = cfg.diagnostic_params(conf, source)
    if o.get("balance_of"):
        params.setdefault("balance", {})["of"] = o["balance_of"]
    params = cfg.with_deployment(params, cfg.deployment_params(conf, source, o.get("missing")))
    if o.get("ood_quantile") is not None:
        params.setdefault("ood", {})["quantile"] = float(o["ood_quantile"])
    thresholds = cfg.verdict_thresholds(conf, source)
    gate_options = None
    if o.get("run_gate"):  # check the rules before the (long) analysis
        from mmdiag.cli.gate_cmd import analysis_gate_options

        gate_options = analysis_gate_options(conf, source, o.get("baseline"))
    elif ctx.params.get("baseline") is not None:  # the flag itself (a config may hold one for --gate)
        raise ConfigError("--baseline names the report that 'baseline' in gate rules refers to, so it needs "
                          "--gate; add --gate, or leave --baseline out.")
    trackers = check_targets(o.get("log_to"))
    out_dir = prepare_out_dir(Path(o["out"]), bool(o["overwrite"]))
    # under torchrun every process evaluates a shard; evidence is gathered, rank 0 writes
    from mmdiag.runtime import is_main_process, join

    join(str(o["device"]))
    the_model, dataset, mods, settings = load_inputs(o, conf)
    no_checkpoint = no_checkpoint_note(o)
    if no_checkpoint:
        err_console.print(f"[bold yellow]warning:[/] {escape(no_checkpoint)}", highlight=False, soft_wrap=True)
    probe = None
    if o.get("probe_data"):
        from mmdiag.loading import load_dataset

        probe, _ = load_dataset(o["probe_data"], list(mods), nan_policy=o.get("nan_policy") or "error")
    new_data = None
    if o.get("ood_data"):  # read (and checked) before the long pass
        from mmdiag.loading.ood import load_new_data

        new_data = load_new_data(o["ood_data"], list(mods), nan_policy=o.get("nan_policy") or "error")
    if o.get("restore") and not quiet:
        console.print(f"restoring missing modalities with the translator in {escape(str(o['restore']))}: the "
                      "combinations are evaluated with restored, not masked, modalities", highlight=False)
    with ProgressBar(not (quiet or as_json)) as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", MmdiagWarning)  # printed from report.notes below
        report, ev = analyze_with(
            the_model, dataset, adapter_spec(o, mods), analysis_spec(o, params, cs, thresholds),
            settings={**settings, "config": source}, progress=bar, probe_data=probe, return_evidence=True,
            restore=o.get("restore"), ood_data=new_data,
        )
    if not is_main_process():
        return
    if no_checkpoint:
        report.notes.insert(0, no_checkpoint)
    if STATE["verbose"]:
        print_details(report, err_console)
    print_warnings(report, err_console, said=(no_checkpoint,))
    with staged_folder(out_dir) as stage:  # an interrupted run leaves none or all of its outputs
        write_outputs(report, stage, per_sample=report.diagnostics if o.get("per_sample") else None)
        if o.get("save_evidence"):
            ev.save(stage / "evidence.pt")
    log_report_to(trackers, report, out_dir, quiet or as_json)
    if as_json:  # the report document itself, for scripts (warnings stay on stderr)
        typer.echo(report.to_json())
    elif quiet:
        console.print(report.verdict.headline(), highlight=False)
    else:
        print_summary(report, console, html_path=str(out_dir / "report.html"))
        console.print(f"[dim]wrote report.json, metrics.csv, report.html and plots/ in {out_dir}[/]")
    if gate_options is not None:
        from mmdiag.cli.gate_cmd import run_gate

        code = run_gate(report, **gate_options, report_path=str(out_dir / "report.json"))
        if code:
            raise typer.Exit(code)
