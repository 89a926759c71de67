"""The Python API that the CLI is a thin layer over.

``analyze(model, data, ...)`` drives the user's model through a :class:`~mmdiag.adapter.ModelAdapter`,
collects the evidence the chosen diagnostics need in one pass, computes them, and returns a
:class:`~mmdiag.report.Report` with a verdict. Its keyword arguments make the two specs that
``analyze_with(model, data, AdapterSpec(...), AnalysisSpec(...))`` takes (see :mod:`mmdiag.specs`);
the command line and ``rebalance`` call that form. ``analyze_evidence`` does the second half on
evidence saved earlier (a GPU job collects, a CPU job diagnoses).
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import fields
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mmdiag._version import __version__
from mmdiag.collect import CollectSettings, ProgressFn, collect
from mmdiag.deploy import attach_restoration, check_restored
from mmdiag.diagnostics import DIAGNOSTICS, Diagnostic
from mmdiag.diagnostics._running import run_diagnostics
from mmdiag.errors import ConfigError, MmdiagWarning
from mmdiag.evidence import Evidence
from mmdiag.loading.ood import load_new_data
from mmdiag.report import Report, json_safe
from mmdiag.specs import AdapterSpec, AnalysisSpec
from mmdiag.runtime.batching import as_dataset
from mmdiag.stats import shared_resamples, within_chance
from mmdiag.registry import closest
from mmdiag.validation import BOOTSTRAP, SEED, check_annotated
from mmdiag.verdict import VerdictThresholds, judge


def check_analysis(bootstrap: Any, seed: Any) -> tuple[int, int]:
    """``bootstrap`` (an integer >= 0) and ``seed`` (an integer >= 0), checked; ConfigError otherwise."""
    return BOOTSTRAP.check(bootstrap, "bootstrap"), SEED.check(seed, "seed")


def select_diagnostics(only: Sequence[str] | None = None, skip: Sequence[str] | None = None) -> list[str]:
    """Names to run: ``only`` (validated) or the default suite, minus ``skip``, ordered so that
    a diagnostic that reads other results (``uses``) runs after them."""
    for name in list(only or []) + list(skip or []):
        DIAGNOSTICS.get(name)  # raises with the closest name
    names = list(only) if only else [n for n in DIAGNOSTICS.names() if DIAGNOSTICS.get(n).default]
    names = [n for n in names if n not in set(skip or [])]
    if not names:
        raise ConfigError("No diagnostic is selected (check `only` and `skip`).")
    ordered: list[str] = []
    pending = list(names)
    while pending:
        for n in pending:
            if not any(u in pending and u != n for u in DIAGNOSTICS.get(n).uses):
                ordered.append(n)
                pending.remove(n)
                break
        else:  # a cycle: keep the given order
            ordered.extend(pending)
            break
    return ordered


def build_diagnostics(names: Sequence[str], params: Mapping[str, Mapping[str, Any]] | None = None,
                      bootstrap: int = 1000, seed: int = 0) -> list[Diagnostic]:
    """Instantiate diagnostics with their parameters; unknown parameters or wrong types are a ConfigError."""
    bootstrap, seed = check_analysis(bootstrap, seed)
    params = dict(params or {})
    unknown = set(params) - set(DIAGNOSTICS.names())
    if unknown:
        DIAGNOSTICS.get(sorted(unknown)[0])
    out = []
    for n in names:
        cls = DIAGNOSTICS.get(n)
        kw = dict(params.get(n, {}))
        bad = [k for k in kw if k not in cls.param_names()]
        if bad:
            near = closest(bad[0], cls.param_names())
            raise ConfigError(
                f"Diagnostic {n!r} has no parameter {bad[0]!r}; its parameters are: "
                f"{', '.join(cls.param_names()) or '(none)'}." + (f" Did you mean {near!r}?" if near else "")
            )
        types = {f.name: f.type for f in fields(cls)}
        kw = {k: check_annotated(v, types.get(k), f"parameter {k!r} of diagnostic {n!r}") for k, v in kw.items()}
        try:
            out.append(cls(bootstrap=bootstrap, seed=seed, **kw))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"Bad parameters for diagnostic {n!r}: {exc}") from None
    return out


def chance_note(ev: Evidence, accuracy: float) -> str | None:
    """The warning for a fused accuracy at (or below) chance level, or None."""
    at_chance, p0 = within_chance(accuracy, ev.labels.numpy(), ev.n_classes)
    if not at_chance:
        return None
    where = "below" if accuracy < p0 else "within sampling noise of"
    return (f"the fused accuracy {accuracy:.3f} is {where} chance level ({p0:.3f}, the larger of "
            f"1/{ev.n_classes} and the majority-class rate, on {ev.n_samples} samples): the model may be "
            "untrained, or its weights not loaded, and its modality contributions have little to measure")


def reading_notes(ev: Evidence, accuracy: float) -> list[str]:
    """What changes how the report's numbers read: the adapter's changes of method, chance accuracy."""
    notes = [str(w) for w in ev.meta.get("warnings") or []]
    chance = chance_note(ev, accuracy)
    return notes + ([chance] if chance else [])


def analyze_evidence(ev: Evidence, *, only: Sequence[str] | None = None, skip: Sequence[str] | None = None,
                     params: Mapping[str, Mapping[str, Any]] | None = None, bootstrap: int = 1000, seed: int = 0,
                     thresholds: VerdictThresholds | None = None,
                     settings: Mapping[str, Any] | None = None) -> Report:
    """Diagnose collected evidence and judge it; see :func:`analyze`."""
    names = select_diagnostics(only, skip)
    diagnostics = build_diagnostics(names, params, bootstrap, seed)
    for d in diagnostics:
        d.check(ev.modalities)
    with shared_resamples():  # the diagnostics resample the same rows: draw them once
        results, failures = run_diagnostics(ev, diagnostics)
    t = thresholds or VerdictThresholds()
    # evidence collected without an adapter's facts (built by hand) leaves it unknown: None
    has_encoders = bool(ev.meta["encoders"]) if "encoders" in ev.meta else None
    verdict = judge(results, ev.modalities, t, has_encoders=has_encoders)
    accuracy = float(ev.correct().double().mean())
    chance = chance_note(ev, accuracy)
    if chance:  # the verdict's own reasons say it too: "no dominance" here is not an all-clear
        verdict = dataclasses.replace(verdict, reasons=[chance[0].upper() + chance[1:] + ".", *verdict.reasons])
    return Report(
        modalities=list(ev.modalities),
        n_samples=ev.n_samples,
        accuracy=accuracy,
        notes=reading_notes(ev, accuracy),
        settings=json_safe({
            **dict(settings or {}),
            "mask": ev.meta.get("mask"),
            "mask_at": ev.meta.get("mask_at"),
            "seed": seed,
            "bootstrap": bootstrap,
            "diagnostics": names,
            "params": {d.name: d.params() for d in diagnostics},
            "thresholds": t.__dict__,
            "adapter": {k: ev.meta.get(k) for k in ("call", "encoders", "head", "output", "pooling", "notes",
                                                    "warnings")},
            "collect": ev.meta.get("settings"),
            "device": ev.meta.get("device"),
            "head_split": ev.meta.get("head_split"),
            "versions": {"mmdiag": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
        }),
        diagnostics=results,
        failures=failures,
        verdict=verdict,
        mmdiag_version=__version__,
    )


def analyze(
    model: nn.Module,
    data: Any,
    *,
    modalities: Sequence[str] | None = None,
    call: str | None = None,
    encoders: Mapping[str, str] | None = None,
    head: str | None = None,
    mask: str = "zero",
    mask_at: str | None = None,
    mask_index: int = 0,
    only: Sequence[str] | None = None,
    skip: Sequence[str] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    collect_settings: CollectSettings | None = None,
    thresholds: VerdictThresholds | None = None,
    nan_policy: str = "error",
    settings: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
    probe_data: Any = None,
    return_evidence: bool = False,
    restore: Any = None,
    ood_data: Any = None,
) -> Report | tuple[Report, Evidence]:
    """Diagnose modality imbalance of a trained multimodal classifier.

    Args:
        model: the user's ``nn.Module`` returning logits [B, C] (or a dict/tuple holding them).
        data: a Dataset of dict items (modalities + ``label``), a DataLoader, or a dict of arrays.
        modalities: names in positional order; inferred from the data when None.
        call, encoders, head, mask, mask_at, mask_index: how to drive the model (see :class:`~mmdiag.adapter.ModelAdapter`
            and :class:`~mmdiag.specs.AdapterSpec`).
        only, skip: diagnostic selection (default: the default suite).
        params: diagnostic name -> parameter overrides.
        bootstrap, seed: bootstrap resamples and the seed of everything random.
        collect_settings: batch size, device and sampling caps (its seed is replaced by ``seed``).
        thresholds: verdict thresholds.
        nan_policy: ``error`` or ``skip`` for samples with NaN/Inf inputs (dict-of-arrays data).
        settings: extra facts recorded in the report (model/checkpoint/data specs).
        progress: ``progress(stage, done, total)`` callback.
        probe_data: separate data to train linear probes on (features of ``data`` are then the test set).
        return_evidence: also return the collected :class:`Evidence`.
        restore: a folder holding a translator of the ``restore`` fix (``restore.safetensors``), or a
            :class:`~mmdiag.fixes.restore.Translator`: every modality subset is then evaluated with the
            absent modalities restored from the present ones instead of masked (recorded in
            ``settings.restore``; see :mod:`mmdiag.deploy`).
        ood_data: new data to score for distribution shift against ``data`` (the ``ood`` diagnostic,
            added to the selection): a data file or factory spec, a dict of arrays (labels optional;
            ``is_ood`` / ``is_ood_<modality>`` flags read when present), a Dataset or a DataLoader.
            Every row is collected.
    """
    analysis = AnalysisSpec(only=only, skip=skip, params=params, bootstrap=bootstrap, seed=seed,
                            collect=collect_settings, thresholds=thresholds)
    spec = AdapterSpec(modalities=modalities, call=call, encoders=encoders, head=head, mask=mask, mask_at=mask_at,
                       mask_index=mask_index)
    report, ev = _analyze(model, data, spec, analysis, nan_policy, settings, progress, probe_data, restore,
                          ood_data=ood_data)
    _warn_notes(report)
    return (report, ev) if return_evidence else report


def analyze_with(
    model: nn.Module,
    data: Any,
    adapter: AdapterSpec,
    analysis: AnalysisSpec,
    *,
    nan_policy: str = "error",
    settings: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
    probe_data: Any = None,
    return_evidence: bool = False,
    restore: Any = None,
    ood_data: Any = None,
) -> Report | tuple[Report, Evidence]:
    """:func:`analyze` with the model-driving and analysis settings given as specs.

    Args:
        adapter: how to drive the model; its ``modalities`` are inferred from the data when None.
        analysis: what to diagnose and how.
        nan_policy, settings, progress, probe_data, return_evidence, restore, ood_data: as for :func:`analyze`.
    """
    report, ev = _analyze(model, data, adapter, analysis, nan_policy, settings, progress, probe_data, restore,
                          ood_data=ood_data)
    _warn_notes(report)
    return (report, ev) if return_evidence else report


def _analyze(model: nn.Module, data: Any, spec: AdapterSpec, analysis: AnalysisSpec, nan_policy: str,
             settings: Mapping[str, Any] | None, progress: ProgressFn | None,
             probe_data: Any, restore: Any = None, *, ood_data: Any = None) -> tuple[Report, Evidence]:
    dataset = as_dataset(data, spec.modalities, nan_policy)
    modalities = spec.modalities
    if modalities is None:
        modalities = getattr(dataset, "modalities", None) or getattr(getattr(dataset, "dataset", None), "modalities", None)
        if modalities is None:
            raise ConfigError("Cannot infer the modalities from this data; pass `modalities=[a, b]`.")
    bootstrap, seed = analysis.bootstrap, analysis.seed
    names = with_ood(select_diagnostics(analysis.only, analysis.skip), analysis, ood_data)
    diagnostics = build_diagnostics(names, analysis.params, bootstrap, seed)  # settings errors before the model is driven
    for d in diagnostics:
        d.check(modalities)
    adapter = spec.with_modalities(modalities).build(model, seed=seed)
    if restore is not None:  # subsets evaluated with absent modalities restored, not masked
        settings = {**dict(settings or {}), "restore": attach_restoration(adapter, restore)}
    needs = set().union(*(d.needs for d in diagnostics))
    cs = analysis.collect_settings()
    ev = collect(adapter, dataset, needs, cs, progress)
    check_restored(adapter)
    if probe_data is not None and ev.features is not None:
        probe_ev = collect(adapter, as_dataset(probe_data, modalities, nan_policy), {"features"},
                           analysis.collect_settings(seed_offset=1), progress)
        ev.probe_features = probe_ev.features
        ev.probe_labels = None if probe_ev.feature_rows is None else probe_ev.labels[probe_ev.feature_rows]
    if ood_data is not None and ev.features is not None:
        collect_ood(ev, adapter, ood_data, analysis, nan_policy, progress)
    report = analyze_evidence(ev, only=names, params=analysis.params, bootstrap=bootstrap, seed=seed,
                              thresholds=analysis.thresholds, settings=settings)
    dropped = getattr(dataset, "dropped", 0)
    if dropped:
        report.settings["nan_dropped"] = int(dropped)
    return report, ev


def with_ood(names: list[str], analysis: AnalysisSpec, ood_data: Any) -> list[str]:
    """``names`` with ``ood`` added when new data is given (and not skipped); ConfigError when ``ood``
    is asked for without new data to score."""
    if ood_data is not None and "ood" not in names and "ood" not in (analysis.skip or ()):
        return [*names, "ood"]
    if ood_data is None and "ood" in names:
        raise ConfigError("The `ood` diagnostic scores new data against the evaluation data; pass the new data as "
                          "`ood_data` (a data file, a dict of arrays or a Dataset), or leave `ood` out of `only`.")
    return names


def collect_ood(ev: Evidence, adapter: Any, ood_data: Any, analysis: AnalysisSpec, nan_policy: str,
                progress: ProgressFn | None) -> None:
    """Collect the pooled features of *every* row of the new data into ``ev.ood_features`` (in row
    order), with its known flags (``ev.ood_flags``) and row numbers (``ev.ood_rows``)."""
    new = load_new_data(ood_data, ev.modalities, nan_policy=nan_policy)
    sized = getattr(new.dataset, "dataset", new.dataset) if isinstance(new.dataset, DataLoader) else new.dataset
    try:
        n = len(sized)
    except TypeError:
        raise ConfigError("The new data (`ood_data`) has no length, so mmdiag cannot collect all of its rows; pass "
                          "a map-style Dataset, a dict of arrays or a data file.") from None
    cs = analysis.collect_settings(seed_offset=2)
    cs = CollectSettings(**{**cs.__dict__, "max_feature_samples": max(cs.max_feature_samples, n)})
    new_ev = collect(adapter, new.dataset, {"features"}, cs, progress)
    if new_ev.features is None or new_ev.feature_rows is None:
        return
    rows = new_ev.index[new_ev.feature_rows]
    order = torch.argsort(rows)
    ev.ood_rows = rows[order]
    ev.ood_features = {m: f[order] for m, f in new_ev.features.items()}
    if new.flags is not None:
        ev.ood_flags = {m: torch.from_numpy(f[ev.ood_rows.numpy()]) for m, f in new.flags.items()}
    elif new_ev.ood is not None:  # per-item flags of a Dataset
        flags = new_ev.ood[new_ev.feature_rows][order]
        ev.ood_flags = {m: flags for m in ev.modalities}
    ev.meta["ood_data"] = {"rows": int(ev.ood_rows.numel()), "labelled": new.labelled,
                           "flags": sorted(ev.ood_flags or {})}


def _warn_notes(report: Report) -> None:
    """Each reading note of ``report`` as an :class:`MmdiagWarning` at the caller of the public function."""
    for note in report.notes:
        warnings.warn(note, MmdiagWarning, stacklevel=3)
