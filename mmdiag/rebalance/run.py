"""The run of :func:`rebalance`: before, the fix choice, after and baseline, the comparison."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from mmdiag.api import analyze_with
from mmdiag.compare import compare_runs
from mmdiag.errors import ConfigError, TrainError
from mmdiag.fixes import FIXES, Fix
from mmdiag.rebalance.choice import choose_fix, deployment_training_note, make_fix
from mmdiag.rebalance.result import RebalanceResult, trained_translator, write_json, write_outputs
from mmdiag.report import Report
from mmdiag.runtime.batching import as_dataset
from mmdiag.runtime.distributed import broadcast_object, is_main_process, process_group
from mmdiag.specs import AdapterSpec, AnalysisSpec, TrainSpec
from mmdiag.stats import bootstrap_mean_ci
from mmdiag.train import CHECKPOINT, History, TrainProgress, fit

__all__ = ["DEFAULT_TRAINING", "INITS", "AnalysisProgress", "PhaseFn", "choice_line", "rebalance"]

#: Ways to initialise the retrained model.
INITS = ("scratch", "checkpoint")

PhaseFn = Callable[[str, "TrainProgress | AnalysisProgress | None"], None]


@dataclass(frozen=True)
class AnalysisProgress:
    """Rows evaluated so far by an analysis phase (``total`` None when unknown)."""

    done: int
    total: int | None

#: The training budget of :func:`rebalance` when it is given no :class:`~mmdiag.specs.TrainSpec`
#: (the defaults of ``mmdiag rebalance``).
DEFAULT_TRAINING = TrainSpec(epochs=20, lr=1e-2, weight_decay=1e-4)


@dataclass
class _Stage:
    """One model of the run: trained (model, history) and/or analysed (report, accuracy interval)."""

    model: nn.Module | None = None
    history: History | None = None
    report: Report | None = None
    ci: list[float] | None = None


@dataclass
class _Session:
    """What the phases of one :func:`rebalance` call share; ``adapter`` has its modalities set."""

    factory: Callable[[], nn.Module]
    train_ds: Any
    val_ds: Any
    checkpoint: str | os.PathLike[str] | None
    load: dict[str, Any]  # load_checkpoint's trust, key and strip_prefix
    init: str
    train: TrainSpec
    adapter: AdapterSpec
    analysis: AnalysisSpec
    out: Path | None
    resume: bool
    extra: dict[str, Any]
    notes: list[str]
    progress: PhaseFn | None

    def phase(self, name: str, info: TrainProgress | None = None) -> None:
        if self.progress is not None:
            self.progress(name, info)

    def folder(self, stage: str) -> Path | None:
        """Where the run of ``stage`` (``after``, ``baseline``) writes."""
        if self.out is None:
            return None
        return self.out if stage == "after" else self.out / stage

    def build(self) -> nn.Module:
        """A fresh model from the factory (seeded), from the checkpoint with ``init='checkpoint'``."""
        from mmdiag.loading import load_checkpoint

        torch.manual_seed(self.train.seed)
        model = self.factory()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"The model factory returned {type(model).__name__}, expected a torch.nn.Module.")
        if self.init == "checkpoint":
            load_checkpoint(model, self.checkpoint, **self.load)  # type: ignore[arg-type]
        return model

    def trained(self) -> nn.Module:
        """The model of the checkpoint (the *before* model); its facts go into the reports' settings."""
        from mmdiag.loading import checkpoint_settings, load_checkpoint

        torch.manual_seed(self.train.seed)
        model = self.factory()
        self.extra.update(checkpoint_settings(load_checkpoint(model, self.checkpoint, **self.load)))  # type: ignore[arg-type]
        return model

    def analyze(self, stage: _Stage, name: str, restore: Any = None) -> _Stage:
        """``stage`` with the analysis of its model on the validation data (the training data without),
        absent modalities restored by ``restore`` (a translator) instead of masked when given."""
        self.phase(f"analyze {name}")
        data = self.val_ds if self.val_ds is not None else self.train_ds
        rows = None if self.progress is None else (
            lambda _stage, done, total: self.phase(f"analyze {name}", AnalysisProgress(done, total)))
        report, ev = analyze_with(stage.model, data, self.adapter, self.analysis,  # type: ignore[arg-type,misc]
                                  settings={**self.extra, "stage": name}, return_evidence=True, progress=rows,
                                  restore=restore)
        boot, seed = self.analysis.bootstrap, self.analysis.seed
        ci = [float(x) for x in bootstrap_mean_ci(ev.correct().numpy(), boot, seed)] if boot > 0 else None
        return dataclasses.replace(stage, report=report, ci=ci)

    def fit(self, fix_obj: Fix, name: str) -> _Stage:
        """Train a fresh model with ``fix_obj`` (resuming from the stage's checkpoint when asked)."""
        model = self.build()
        folder = self.folder(name)
        ckpt = folder / CHECKPOINT if folder is not None else None
        go_on = bool(self.resume and ckpt is not None and ckpt.is_file())
        if self.resume and not go_on:
            self.notes.append(f"{name}: no checkpoint to resume from; trained from the start")
        elif go_on:
            self.notes.append(f"{name}: resumed from {ckpt}")
        self.phase(f"train {name}")
        adapter = self.adapter.build(model, seed=self.train.seed)
        hist = fit(adapter, self.train_ds, self.train, val_data=self.val_ds, fix=fix_obj, out_dir=folder,
                   resume=go_on, progress=(lambda p: self.phase(f"train {name}", p)))
        self.notes.extend(f"{name} training: {w}" for w in adapter.warnings)  # a change of method, said
        return _Stage(model, hist)


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
    baseline: bool = False,
    train: TrainSpec | None = None,
    adapter: AdapterSpec | None = None,
    analysis: AnalysisSpec | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    settings: Mapping[str, Any] | None = None,
    progress: PhaseFn | None = None,
    report_formats: str | Sequence[str] | None = None,
    choice: Mapping[str, Any] | None = None,
) -> RebalanceResult:
    """Retrain with the fix the diagnosis calls for and compare before / after / baseline.

    Args:
        factory: builds a fresh, untrained model (called under ``torch.manual_seed(train.seed)``).
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
        baseline: also train plain (fix ``none``) under the same budget and seed.
        train: the training budget, shared by the fix run and the baseline (default
            :data:`DEFAULT_TRAINING`); its seed also seeds the factory.
        adapter: how to drive the model (modalities inferred from the data when not given).
        analysis: what the before / after / baseline analyses compute (default: the default
            suite, seeded with ``train.seed``).
        out_dir: folder for the outputs; ``resume`` continues interrupted runs from its checkpoints.
        settings: extra facts recorded in the reports and ``fix.json`` (model and data specs).
        progress: ``progress(phase, train_progress_or_None)`` as phases start and batches finish.
        report_formats: renderings of the before/after/baseline reports (default: all, see
            :func:`mmdiag.render.write_outputs`).
        choice: how a :class:`Fix` instance given as ``fix`` was chosen (``requested``, ``note``,
            ``reasons``), recorded in ``fix.json`` and ``comparison.json``; default: given by the caller.
    """
    session = make_session(factory, train_data, val_data=val_data, checkpoint=checkpoint,
                           trust_checkpoint=trust_checkpoint, checkpoint_key=checkpoint_key,
                           strip_prefix=strip_prefix, init=init, train=train, adapter=adapter, analysis=analysis,
                           out_dir=out_dir, resume=resume, settings=settings, progress=progress)
    with process_group(session.train.device):
        return _run(session, fix, fix_params, baseline, report_formats, choice)


def make_session(factory: Callable[[], nn.Module], train_data: Any, *, val_data: Any = None, checkpoint: Any = None,
                 trust_checkpoint: bool = False, checkpoint_key: str | None = None, strip_prefix: str | None = None,
                 init: str = "scratch", train: TrainSpec | None = None, adapter: AdapterSpec | None = None,
                 analysis: AnalysisSpec | None = None, out_dir: Any = None, resume: bool = False,
                 settings: Mapping[str, Any] | None = None, progress: PhaseFn | None = None) -> _Session:
    """The arguments of :func:`rebalance` of the same names checked, defaulted (the training budget
    :data:`DEFAULT_TRAINING`, the analysis seeded by it), the data coerced and the modalities found."""
    train = train if train is not None else DEFAULT_TRAINING
    analysis = analysis if analysis is not None else AnalysisSpec(seed=train.seed)
    adapter = adapter or AdapterSpec()
    load = {"trust": trust_checkpoint, "key": checkpoint_key, "strip_prefix": strip_prefix}
    if init not in INITS:
        raise ConfigError(f"init must be one of {', '.join(INITS)}; found {init!r}.")
    if init == "checkpoint" and checkpoint is None:
        raise ConfigError("`init='checkpoint'` fine-tunes the trained weights, so it needs `checkpoint` (their "
                          "file); use `init='scratch'` to train from a fresh initialisation.")
    if train.epochs < 1:
        raise ConfigError(f"epochs must be at least 1; found {train.epochs}.")
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise TrainError("resume needs the output folder of the run to continue (`out_dir`).")
    modalities = adapter.modalities
    train_ds = as_dataset(train_data, modalities, what="training data", loaders=False)
    if modalities is None:
        modalities = getattr(train_ds, "modalities", None)
        if modalities is None:
            raise ConfigError("Cannot infer the modalities from this data; pass `modalities=[a, b]`.")
    mods = tuple(modalities)
    val_ds = as_dataset(val_data, mods, what="validation data", loaders=False) if val_data is not None else None
    notes = [] if val_ds is not None else ["no validation data: the analyses run on the training data"]
    return _Session(factory, train_ds, val_ds, checkpoint, load, init, train, adapter.with_modalities(mods),
                    analysis, out, resume, dict(settings or {}), notes, progress)


def _run(s: _Session, fix: str | Fix, fix_params: Mapping[str, Any] | None, baseline: bool,
         formats: str | Sequence[str] | None, given: Mapping[str, Any] | None = None) -> RebalanceResult:
    """Before, the fix choice, after and baseline, the comparison and the outputs (inside the process group)."""
    main = is_main_process()
    if s.out is not None and main:
        s.out.mkdir(parents=True, exist_ok=True)
    # analyses run on every rank: under torchrun collect shards the rows and gathers the evidence
    before = s.analyze(_Stage(s.trained()), "before") if s.checkpoint is not None else _Stage()
    fix_obj, choice, base = _choose(s, fix, fix_params, before.report, baseline)
    if given is not None and isinstance(fix, Fix):
        choice = {**choice, **given, "used": fix_obj.name}
    baseline = baseline or base.model is not None
    _note_choice(s, fix_obj, choice)
    s.phase(choice_line(fix_obj.name, choice))  # said before the (long) training, not after
    if s.out is not None and main:
        write_json(s.out / "fix.json", {**choice, "fix": fix_obj.name, "params": fix_obj.params(),
                                          "summary": type(fix_obj).summary, "settings": s.extra})

    after = s.fit(fix_obj, "after")
    if baseline and base.model is None:
        base = s.fit(make_fix("none"), "baseline")
    result = RebalanceResult(fix=fix_obj.name, fix_params=fix_obj.params(), choice=choice, model=after.model,
                             history=after.history, baseline_model=base.model,  # type: ignore[arg-type]
                             baseline_history=base.history, before=before.report, out_dir=s.out if main else None,
                             notes=s.notes)
    translator = trained_translator(after.history.aux if after.history is not None else None)
    if translator is not None:  # the restore fix's deliverable: deployed with it, so analysed with it
        s.notes.append("after: the modality combinations are evaluated with the restore fix's translator "
                       "restoring the absent modalities (as `mmdiag.deploy.with_restoration` deploys it), not masked")
    after = s.analyze(after, "after", restore=translator)
    if base.model is not None and base.report is None:
        base = s.analyze(base, "baseline")
    result.after, result.baseline = after.report, base.report
    cis = {"before": before.ci, "after": after.ci, "baseline": base.ci}
    result.comparison = compare_runs(after.report, before.report, base.report, cis)  # type: ignore[arg-type]
    if s.out is not None and main:
        write_outputs(result, s.out, cis, s.extra, formats)
    return result


def _choose(s: _Session, fix: str | Fix, fix_params: Mapping[str, Any] | None, before: Report | None,
            baseline: bool) -> tuple[Fix, dict[str, Any], _Stage]:
    """(the fix, how it was chosen, the baseline when ``auto`` had to train and diagnose it first)."""
    base = _Stage()
    requested = fix.name if isinstance(fix, Fix) else str(fix)
    if isinstance(fix, Fix):
        return fix, {"requested": requested, "used": fix.name, "recommended": None, "reasons": [],
                     "note": "given by the caller"}, base
    saved = s.out / "fix.json" if s.out is not None else None
    if requested == "auto" and s.resume and saved is not None and saved.is_file():
        recorded = json.loads(saved.read_text())
        choice = {k: recorded.get(k) for k in ("requested", "used", "recommended", "reasons", "note")}
        s.notes.append(f"fix auto: reusing the choice recorded in {saved} ({choice['used']})")
    elif requested == "auto":
        source = before
        if s.checkpoint is None:
            # nothing trained to diagnose yet: the plain baseline is the model to diagnose
            if not baseline:
                s.notes.append("fix auto without a checkpoint: the plain baseline was trained first and diagnosed")
            base = s.analyze(s.fit(make_fix("none"), "baseline"), "baseline")
            source = base.report
        choice = broadcast_object({"requested": "auto", **choose_fix(source)})
    else:
        FIXES.get(requested)
        choice = {"requested": requested, "used": requested, "recommended": None, "reasons": [],
                  "note": "named by the user"}
    note = deployment_training_note(str(choice["used"]), fix_params, (s.analysis.params or {}).get("deployment"))
    if note:
        s.notes.append(note)
    return make_fix(str(choice["used"]), fix_params), choice, base


def _note_choice(s: _Session, fix_obj: Fix, choice: Mapping[str, Any]) -> None:
    """Say a fallback from the recommended fix, and a gradient-scaling fix under an adaptive optimizer."""
    if choice.get("recommended") and choice.get("used") != choice.get("recommended"):
        s.notes.append(str(choice["note"]))
    optimizer = s.train.optimizer
    if type(fix_obj).scales_gradients and optimizer.lower() in ("adam", "adamw"):
        s.notes.append(f"{fix_obj.name} acts by rescaling gradients, and {optimizer} normalises each "
                       "parameter's gradient scale, which cancels most of that; the method was designed "
                       "for SGD (try `optimizer='sgd'`)")


def choice_line(fix: str, choice: Mapping[str, Any]) -> str:
    """``fix auto -> arl: the verdict recommends arl`` and the verdict's reasons, one a line."""
    if choice.get("requested") != "auto":
        return f"fix {fix}: {choice.get('note')}"
    reasons = "".join(f"\n  - {r}" for r in choice.get("reasons") or [])
    return f"fix auto -> {fix}: {choice.get('note')}{reasons}"
