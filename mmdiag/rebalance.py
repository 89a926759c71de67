"""rebalance: retrain a multimodal classifier with the fix that matches its diagnosis, and compare.

``rebalance(factory, train_data, val_data=..., checkpoint=..., fix="auto", baseline=True)``

1. analyzes the trained model (``factory()`` + ``checkpoint``) on the validation data: the
   *before* report;
2. picks the fix: a registered name, or ``auto``, the ``recommended_fix`` of the before report's
   verdict (of the baseline's when there is no checkpoint), falling back to ``ogm_ge`` when the
   verdict recommends none or names a fix that is not registered (said in ``choice``);
3. trains the model with that fix with :func:`mmdiag.train.fit` (``init="scratch"``: a fresh model
   from the factory under ``torch.manual_seed(seed)``; ``"checkpoint"``: fine-tune from it), and
   with ``baseline=True`` also plain training (fix ``none``) under the same budget, seed and init;
4. analyzes the results on the validation data (*after*, *baseline*) and compares every headline
   and per-modality value with the differences and whether the bootstrap intervals separate.

Under torchrun every rank trains and takes part in the analyses (``collect`` shards the rows);
only rank 0 writes. With ``out_dir`` it writes::

    model.safetensors   the rebalanced weights, the user's own state_dict keys
    aux.pt              auxiliary modules a fix added (only when there are any)
    history.csv         per-epoch loss, validation and unimodal accuracy, fix signals
    checkpoint.pt       the resumable training state (baseline/checkpoint.pt for the baseline)
    fix.json            the fix used, its parameters, and for auto the recommendation and reasons
    before/ after/ baseline/   report.json + metrics.csv of each analysis
    comparison.json, comparison.csv

Nothing here prints or parses config files; the command line lives in ``mmdiag.cli.rebalance_cmd``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mmdiag.adapter import ModelAdapter
from mmdiag.api import analyze, as_dataset
from mmdiag.collect import CollectSettings
from mmdiag.distributed import is_main_process
from mmdiag.errors import ConfigError, TrainError
from mmdiag.fixes import FIXES, Fix
from mmdiag.registry import closest
from mmdiag.report import Report, json_safe, write_atomic
from mmdiag.stats import bootstrap_mean_ci
from mmdiag.train import CHECKPOINT, History, TrainProgress, distributed, fit
from mmdiag.verdict import VerdictThresholds

__all__ = ["COMPARISON_COLUMNS", "FALLBACK_FIX", "INITS", "RebalanceResult", "choose_fix", "compare_reports",
           "make_fix", "parse_param_value", "rebalance"]

#: The fix used when ``auto`` finds no usable recommendation.
FALLBACK_FIX = "ogm_ge"
#: Ways to initialise the retrained model.
INITS = ("scratch", "checkpoint")
#: Columns of ``comparison.csv``.
COMPARISON_COLUMNS = (
    "key", "diagnostic", "modality",
    "before", "before_low", "before_high",
    "after", "after_low", "after_high",
    "baseline", "baseline_low", "baseline_high",
    "after_minus_before", "separated_after_before",
    "after_minus_baseline", "separated_after_baseline",
)

PhaseFn = Callable[[str, "TrainProgress | None"], None]


# ----------------------------------------------------------------------------------------------
# fix choice and parameters
# ----------------------------------------------------------------------------------------------


def parse_param_value(text: Any) -> Any:
    """A ``--fix-param`` value from text: none/null, true/false, int, float, else the string."""
    if not isinstance(text, str):
        return text
    t = text.strip()
    low = t.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def _fix_params_for(name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Scalar entries apply to whichever fix is used; a table named like a fix only to that fix."""
    out: dict[str, Any] = {}
    for key, value in dict(params or {}).items():
        if isinstance(value, Mapping):
            if key not in FIXES:
                FIXES.get(key)  # ConfigError naming the closest fix
            if key == name:
                out.update(value)
        elif "." in key:
            fix_name, _, sub = key.partition(".")
            if fix_name not in FIXES:
                FIXES.get(fix_name)
            if fix_name == name:
                out[sub] = value
        else:
            out[key] = value
    return out


def make_fix(name: str, params: Mapping[str, Any] | None = None) -> Fix:
    """Instantiate the fix ``name`` with ``params`` (values given as text are parsed); unknown
    names and parameters are a ConfigError naming the closest ones."""
    cls = FIXES.get(name)
    known = [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
    kwargs = {}
    for key, value in _fix_params_for(name, params).items():
        if key not in known:
            near = closest(key, known)
            raise ConfigError(
                f"Fix {name!r} has no parameter {key!r}."
                + (f" Did you mean {near!r}?" if near else "")
                + f" Its parameters are: {', '.join(known) or '(none)'}."
            )
        value = parse_param_value(value)
        default = next(f.default for f in dataclasses.fields(cls) if f.name == key)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Bad parameters for fix {name!r}: {exc}") from None


def choose_fix(report: Report | None) -> dict[str, Any]:
    """The ``auto`` choice from a report's verdict: ``{"used", "recommended", "reasons", "note"}``."""
    recommended = report.verdict.recommended_fix if report is not None else None
    reasons = list(report.verdict.reasons) if report is not None else []
    if recommended is None:
        note = (f"the verdict recommends no fix ({report.verdict.headline()}); using the default {FALLBACK_FIX}"
                if report is not None else f"no analysis to recommend a fix; using the default {FALLBACK_FIX}")
        return {"used": FALLBACK_FIX, "recommended": None, "reasons": reasons, "note": note}
    if recommended not in FIXES:
        note = (f"the verdict recommends {recommended!r}, which is not a registered fix in this installation "
                f"(registered: {', '.join(FIXES.names())}); falling back to {FALLBACK_FIX}")
        return {"used": FALLBACK_FIX, "recommended": recommended, "reasons": reasons, "note": note}
    return {"used": recommended, "recommended": recommended, "reasons": reasons,
            "note": f"the verdict recommends {recommended}"}


# ----------------------------------------------------------------------------------------------
# comparison
# ----------------------------------------------------------------------------------------------


def _entries(report: Report, accuracy_ci: Sequence[float] | None) -> dict[str, tuple[str, str, float | None, list | None]]:
    """key -> (diagnostic, modality, value, [low, high])."""
    out: dict[str, tuple[str, str, float | None, list | None]] = {
        "accuracy": ("accuracy", "", report.accuracy, list(accuracy_ci) if accuracy_ci is not None else None)
    }
    for name, res in report.diagnostics.items():
        out[name] = (name, "", res.value, res.value_ci)
        for m in report.modalities:
            if m in res.per_modality:
                out[f"{name}.{m}"] = (name, m, res.per_modality[m], (res.ci or {}).get(m))
    return out


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(f) else f


def _separated(a: list | None, b: list | None) -> bool | None:
    if not a or not b or any(_num(x) is None for x in (*a[:2], *b[:2])):
        return None
    return bool(float(a[0]) > float(b[1]) or float(b[0]) > float(a[1]))


def compare_reports(after: Report, before: Report | None = None, baseline: Report | None = None,
                    accuracy_ci: Mapping[str, Sequence[float] | None] | None = None) -> list[dict[str, Any]]:
    """One row per headline and per-modality value (see :data:`COMPARISON_COLUMNS`).

    ``separated_*`` is True when the two bootstrap intervals do not overlap, False when they do,
    None when an interval is missing. ``accuracy_ci`` maps ``before``/``after``/``baseline`` to the
    bootstrap interval of the fused accuracy.
    """
    cis = dict(accuracy_ci or {})
    runs = {"before": before, "after": after, "baseline": baseline}
    entries = {k: (_entries(r, cis.get(k)) if r is not None else {}) for k, r in runs.items()}
    keys: list[str] = []
    for k in ("after", "before", "baseline"):
        keys.extend(key for key in entries[k] if key not in keys)
    rows = []
    for key in keys:
        first = next(entries[k][key] for k in ("after", "before", "baseline") if key in entries[k])
        row: dict[str, Any] = {"key": key, "diagnostic": first[0], "modality": first[1]}
        for k in ("before", "after", "baseline"):
            e = entries[k].get(key)
            ci = e[3] if e is not None else None
            row[k] = _num(e[2]) if e is not None else None
            row[f"{k}_low"] = _num(ci[0]) if ci else None
            row[f"{k}_high"] = _num(ci[1]) if ci else None
        for other in ("before", "baseline"):
            a, o = row["after"], row[other]
            row[f"after_minus_{other}"] = None if a is None or o is None else a - o
            ea, eo = entries["after"].get(key), entries[other].get(key)
            row[f"separated_after_{other}"] = _separated(ea[3] if ea else None, eo[3] if eo else None)
        rows.append(row)
    return rows


def _comparison_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COMPARISON_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COMPARISON_COLUMNS})
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


@dataclass
class RebalanceResult:
    """What :func:`rebalance` did.

    Attributes:
        fix: the fix trained; fix_params: its parameters; choice: how it was chosen
            (``requested``, ``used``, ``recommended``, ``reasons``, ``note``).
        model: the rebalanced model (eval mode); baseline_model: the plain one (or None).
        history, baseline_history: per-epoch training histories.
        before, after, baseline: the analyses (None when not run); every rank has them.
        comparison: rows of :func:`compare_reports`.
        out_dir: where the outputs were written (None: nothing written, as on ranks other than 0).
        notes: things worth telling the user (fallbacks, resumes).
    """

    fix: str
    fix_params: dict[str, Any]
    choice: dict[str, Any]
    model: nn.Module
    history: History
    after: Report | None = None
    before: Report | None = None
    baseline: Report | None = None
    baseline_model: nn.Module | None = None
    baseline_history: History | None = None
    comparison: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    notes: list[str] = field(default_factory=list)

    def row(self, key: str) -> dict[str, Any]:
        """The comparison row of ``key`` (e.g. ``unimodal.visual``); KeyError when absent."""
        for r in self.comparison:
            if r["key"] == key:
                return r
        raise KeyError(key)


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (unchanged without torch.distributed)."""
    with contextlib.suppress(ImportError):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]
    return value


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(json_safe(data), indent=2) + "\n")


def rebalance(
    factory: Callable[[], nn.Module],
    train_data: Any,
    *,
    val_data: Any = None,
    checkpoint: str | os.PathLike[str] | None = None,
    trust_checkpoint: bool = False,
    checkpoint_key: str | None = None,
    strip_prefix: str | None = None,
    fix: str | Fix = "auto",
    fix_params: Mapping[str, Any] | None = None,
    init: str = "scratch",
    epochs: int = 20,
    optimizer: str = "sgd",
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    grad_clip: float | None = None,
    baseline: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    modalities: Sequence[str] | None = None,
    call: str | None = None,
    encoders: Mapping[str, str] | None = None,
    head: str | None = None,
    mask: str = "zero",
    mask_at: str | None = None,
    bootstrap: int = 1000,
    only: Sequence[str] | None = None,
    skip: Sequence[str] | None = None,
    analyze_params: Mapping[str, Mapping[str, Any]] | None = None,
    thresholds: VerdictThresholds | None = None,
    collect_settings: CollectSettings | None = None,
    settings: Mapping[str, Any] | None = None,
    progress: PhaseFn | None = None,
    report_formats: str | Sequence[str] | None = None,
) -> RebalanceResult:
    """Retrain with the fix the diagnosis calls for and compare before / after / baseline.

    Args:
        factory: builds a fresh, untrained model (called under ``torch.manual_seed(seed)``).
        train_data, val_data: Datasets of dict items or dicts of arrays; the analyses run on
            ``val_data`` (on ``train_data`` when there is none).
        checkpoint: weights of the trained model (the *before* model, and the start for
            ``init="checkpoint"``); without it there is no before analysis.
        trust_checkpoint, checkpoint_key, strip_prefix: how it is read (see
            :func:`mmdiag.loading.load_checkpoint`: ``trust``, ``key``, ``strip_prefix``).
        fix: a registered fix name, a :class:`Fix` instance, or ``auto`` (see the module doc).
        fix_params: parameters of the fix; values may be text (``"0.8"``); a nested table named like
            a fix (or a ``fix.key`` entry) applies only when that fix is used.
        init: ``scratch`` (default) or ``checkpoint``.
        epochs, optimizer, lr, weight_decay, momentum, batch_size, seed, device, grad_clip:
            the training budget, shared by the fix run and the baseline.
        baseline: also train plain (fix ``none``) under the same budget and seed.
        out_dir: folder for the outputs; ``resume`` continues interrupted runs from its checkpoints.
        modalities, call, encoders, head, mask, mask_at: how to drive the model (:class:`ModelAdapter`).
        bootstrap, only, skip, analyze_params, thresholds, collect_settings: passed to
            :func:`mmdiag.analyze` (``analyze_params`` is its ``params``).
        settings: extra facts recorded in the reports and ``fix.json`` (model and data specs).
        progress: ``progress(phase, train_progress_or_None)`` as phases start and batches finish.
        report_formats: renderings of the before/after/baseline reports (default: all, see
            :func:`mmdiag.render.write_outputs`).
    """
    if init not in INITS:
        raise ConfigError(f"init must be one of {', '.join(INITS)}; found {init!r}.")
    if init == "checkpoint" and checkpoint is None:
        raise ConfigError("init='checkpoint' fine-tunes from the trained weights, so it needs a checkpoint "
                          "(--checkpoint FILE); use --init scratch to train from a fresh initialisation.")
    if int(epochs) < 1:
        raise ConfigError(f"epochs must be at least 1; found {epochs}.")
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise TrainError("resume needs the output folder of the run to continue (out_dir).")
    train_ds = as_dataset(train_data, modalities)
    if modalities is None:
        modalities = getattr(train_ds, "modalities", None)
        if modalities is None:
            raise ConfigError("Cannot infer the modalities from this data; pass modalities=[...] (--modalities a,b).")
    mods = tuple(modalities)
    val_ds = as_dataset(val_data, mods) if val_data is not None else None
    eval_ds = val_ds if val_ds is not None else train_ds
    notes: list[str] = []
    if val_ds is None:
        notes.append("no validation data: the analyses run on the training data")
    extra = dict(settings or {})

    def phase(name: str, info: TrainProgress | None = None) -> None:
        if progress is not None:
            progress(name, info)

    def build() -> nn.Module:
        from mmdiag.loading import load_checkpoint

        torch.manual_seed(int(seed))
        model = factory()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"The model factory returned {type(model).__name__}, expected a torch.nn.Module.")
        if init == "checkpoint":
            load_checkpoint(model, checkpoint, trust=trust_checkpoint, key=checkpoint_key,  # type: ignore[arg-type]
                            strip_prefix=strip_prefix)
        return model

    def adapter_for(model: nn.Module) -> ModelAdapter:
        return ModelAdapter(model, mods, call=call, encoders=dict(encoders) if encoders else None,  # type: ignore[arg-type]
                            head=head, mask=mask, mask_at=mask_at, seed=int(seed))  # type: ignore[arg-type]

    def run_analysis(model: nn.Module, stage: str) -> tuple[Report, list[float] | None]:
        phase(f"analyze {stage}")
        report, ev = analyze(
            model, eval_ds, modalities=mods, call=call, encoders=encoders, head=head, mask=mask, mask_at=mask_at,
            only=only, skip=skip, params=analyze_params, bootstrap=int(bootstrap), seed=int(seed),
            collect_settings=collect_settings, thresholds=thresholds, settings={**extra, "stage": stage}, return_evidence=True,
        )  # type: ignore[misc]
        ci = None
        if int(bootstrap) > 0:
            ci = [float(x) for x in bootstrap_mean_ci(ev.correct().numpy(), int(bootstrap), int(seed))]
        return report, ci

    def train(fix_obj: Fix, folder: Path | None, stage: str) -> tuple[nn.Module, History]:
        model = build()
        ckpt = folder / CHECKPOINT if folder is not None else None
        go_on = bool(resume and ckpt is not None and ckpt.is_file())
        if resume and not go_on:
            notes.append(f"{stage}: no checkpoint to resume from; trained from the start")
        elif go_on:
            notes.append(f"{stage}: resumed from {ckpt}")
        phase(f"train {stage}")
        adapter = adapter_for(model)
        hist = fit(adapter, train_ds, val_data=val_ds, fix=fix_obj, epochs=int(epochs), optimizer=optimizer,
                   lr=float(lr), weight_decay=float(weight_decay), momentum=float(momentum),
                   batch_size=int(batch_size), seed=int(seed), device=device, out_dir=folder, resume=go_on,
                   progress=(lambda p: phase(f"train {stage}", p)), grad_clip=grad_clip)
        notes.extend(f"{stage} training: {w}" for w in adapter.warnings)  # a change of method, said
        return model, hist

    with distributed(device):
        main = is_main_process()
        if out is not None and main:
            out.mkdir(parents=True, exist_ok=True)

        # analyses run on every rank: under torchrun collect shards the rows and gathers the evidence
        before_report, before_ci = None, None
        if checkpoint is not None:
            from mmdiag.loading import checkpoint_settings, load_checkpoint

            torch.manual_seed(int(seed))
            trained = factory()
            extra.update(checkpoint_settings(load_checkpoint(
                trained, checkpoint, trust=trust_checkpoint, key=checkpoint_key, strip_prefix=strip_prefix)))
            before_report, before_ci = run_analysis(trained, "before")

        base_model = base_hist = base_report = None
        base_ci = None
        saved_choice = None
        if resume and out is not None and (out / "fix.json").is_file():
            saved_choice = json.loads((out / "fix.json").read_text())
        requested = fix.name if isinstance(fix, Fix) else str(fix)
        if isinstance(fix, Fix):
            fix_obj = fix
            choice = {"requested": requested, "used": fix.name, "recommended": None, "reasons": [],
                      "note": "given by the caller"}
        else:
            if requested == "auto" and saved_choice is not None:
                choice = {k: saved_choice.get(k) for k in ("requested", "used", "recommended", "reasons", "note")}
                notes.append(f"fix auto: reusing the choice recorded in {out / 'fix.json'} ({choice['used']})")
            elif requested == "auto":
                source = before_report
                if checkpoint is None:
                    # nothing trained to diagnose yet: the plain baseline is the model to diagnose
                    if not baseline:
                        notes.append("fix auto without a checkpoint: the plain baseline was trained first and diagnosed")
                    baseline = True
                    base_model, base_hist = train(make_fix("none"), out / "baseline" if out else None, "baseline")
                    base_report, base_ci = run_analysis(base_model, "baseline")
                    source = base_report
                choice = _broadcast({"requested": "auto", **choose_fix(source)})
            else:
                FIXES.get(requested)
                choice = {"requested": requested, "used": requested, "recommended": None, "reasons": [],
                          "note": "named by the user"}
            fix_obj = make_fix(str(choice["used"]), fix_params)
        if choice.get("recommended") and choice.get("used") != choice.get("recommended"):
            notes.append(str(choice["note"]))
        if type(fix_obj).scales_gradients and optimizer.lower() in ("adam", "adamw"):
            notes.append(f"{fix_obj.name} acts by rescaling gradients, and {optimizer} normalises each "
                         "parameter's gradient scale, which cancels most of that; the method was designed "
                         "for SGD (try --optimizer sgd)")

        if out is not None and main:
            _write_json(out / "fix.json", {**choice, "fix": fix_obj.name, "params": fix_obj.params(),
                                            "summary": type(fix_obj).summary, "settings": extra})

        model, hist = train(fix_obj, out, "after")
        if baseline and base_model is None:
            base_model, base_hist = train(make_fix("none"), out / "baseline" if out else None, "baseline")

        result = RebalanceResult(fix=fix_obj.name, fix_params=fix_obj.params(), choice=choice, model=model,
                                 history=hist, baseline_model=base_model, baseline_history=base_hist,
                                 before=before_report, out_dir=out if main else None, notes=notes)
        after_report, after_ci = run_analysis(model, "after")
        if base_model is not None and base_report is None:
            base_report, base_ci = run_analysis(base_model, "baseline")
        result.after, result.baseline = after_report, base_report
        result.comparison = compare_reports(after_report, before_report, base_report,
                                            {"before": before_ci, "after": after_ci, "baseline": base_ci})
        if out is not None and main:
            _write_outputs(result, out, {"before": before_ci, "after": after_ci, "baseline": base_ci}, extra,
                           report_formats)
        return result


def _write_outputs(result: RebalanceResult, out: Path, cis: Mapping[str, Any], extra: Mapping[str, Any],
                   formats: str | Sequence[str] | None = None) -> None:
    from mmdiag.loading import save_state_dict
    from mmdiag.render import DEFAULT_FORMATS, write_outputs

    save_state_dict(result.model.state_dict(), out / "model.safetensors")
    if len(result.history.aux):
        aux_state = {k: v.detach().cpu() for k, v in result.history.aux.state_dict().items()}
        write_atomic_bytes(out / "aux.pt", aux_state)
    result.history.to_csv(out / "history.csv")
    for stage, report in (("before", result.before), ("after", result.after), ("baseline", result.baseline)):
        if report is not None:
            write_outputs(report, out / stage, formats=formats if formats is not None else DEFAULT_FORMATS)
    if result.baseline_model is not None:
        save_state_dict(result.baseline_model.state_dict(), out / "baseline" / "model.safetensors")
        if result.baseline_history is not None:
            result.baseline_history.to_csv(out / "baseline" / "history.csv")
    write_atomic(out / "comparison.csv", _comparison_csv(result.comparison))
    _write_json(out / "comparison.json", {
        "fix": result.fix,
        "fix_params": result.fix_params,
        "choice": result.choice,
        "verdicts": {stage: (r.verdict.to_dict() if r is not None else None)
                     for stage, r in (("before", result.before), ("after", result.after), ("baseline", result.baseline))},
        "accuracy_ci": dict(cis),
        "rows": result.comparison,
        "notes": result.notes,
        "settings": dict(extra),
        "columns": list(COMPARISON_COLUMNS),
    })


def write_atomic_bytes(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """``torch.save`` a tensor dict atomically (temporary file, then rename)."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(dict(state), tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
