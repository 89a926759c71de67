"""collect(): the one place that runs the model for diagnosis.

One streaming pass over the evaluation data. Each batch is run once (the fused logits, and with
feature-level masking the encoder outputs, which every producer reuses); then each producer the
requested diagnostics need adds its evidence kind (see :mod:`mmdiag.collect.producer`). Rows are
visited in a seeded shuffled order (so within-batch permutations mix classes even when the file is
sorted by label); ``Evidence.index`` maps each row back to the dataset index.

An optional evidence kind that fails (a frozen encoder for parameter gradients, say) does not stop
the pass: the reason goes to ``meta['unavailable']`` and the diagnostics that need it fail with
that reason. Each producer's time is measured inside the pass (``meta['timings']``, seconds of
wall time; on a GPU, launch time unless the device is synchronised).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mmdiag.adapter import ModelAdapter
from mmdiag.categorical import check_categorical
from mmdiag.collect.checks import check_finite, check_labels, eval_mode
from mmdiag.collect.producer import PRODUCERS, Batch, Producer
from mmdiag.collect.sampling import gather_evidence, make_loader, per_rank, take
from mmdiag.collect.settings import CollectSettings, ProgressFn
from mmdiag.collect.stacking import StackedHead
from mmdiag.collect.stats_pass import estimate_stats
from mmdiag.runtime.batching import split_batch
from mmdiag.runtime.device import resolve_device
from mmdiag.runtime.distributed import distributed_rank
from mmdiag.errors import AdapterError, ConfigError, EvidenceError, user_iteration
from mmdiag.evidence import ENCODER_KINDS, EVIDENCE_KINDS, Evidence
from mmdiag.pooling import check_mode

#: rows of the first batch that the adapter checks and the producers' ``prepare`` run on.
VERIFY_ROWS = 16


class Run:
    """The state one pass shares with its producers."""

    def __init__(self, adapter: ModelAdapter, settings: CollectSettings, progress: ProgressFn | None) -> None:
        self.adapter = adapter
        self.settings = settings
        self.progress = progress
        self.device = resolve_device(settings.device)
        self.gen = torch.Generator().manual_seed(settings.seed + 1)
        self.unavailable: dict[str, str] = {}
        self.skipped: set[str] = set()
        self.data_std: dict[str, float] = {}
        self.timings: dict[str, float] = {}
        self.world = 1
        self.n_total: int | None = None
        self.stacked_head = StackedHead(adapter)

    def batches(self, loader: DataLoader, limit: int | None = None) -> Iterator[tuple[int, dict[str, Tensor], Tensor, dict[str, Tensor]]]:
        """(offset, inputs on the device, labels, extras) per batch, up to ``limit`` rows."""
        offset = 0
        for batch in user_iteration(loader, "reading a batch of the data (the dataset's __getitem__)"):
            inputs, labels, extras = split_batch(batch, self.adapter.modalities)
            inputs = {m: t.to(self.device) for m, t in inputs.items()}
            yield offset, inputs, labels.to(self.device), extras
            offset += labels.shape[0]
            if limit is not None and offset >= limit:
                return

    def fail(self, kind: str, exc: BaseException) -> None:
        """Record why ``kind`` could not be gathered (its producer stops)."""
        known = isinstance(exc, (EvidenceError, AdapterError))
        self.unavailable[kind] = str(exc) if known else f"{type(exc).__name__}: {exc}"

    def timed(self, kind: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.timings[kind] = self.timings.get(kind, 0.0) + time.perf_counter() - start


def _check_request(wanted: set[str], adapter: ModelAdapter, s: CollectSettings) -> None:
    unknown = wanted - set(EVIDENCE_KINDS)
    if unknown:
        raise ConfigError(f"Unknown evidence kinds {sorted(unknown)}; known: {sorted(EVIDENCE_KINDS)}.")
    m_count = len(adapter.modalities)
    if "subsets" in wanted and (1 << m_count) > s.max_subsets:
        raise ConfigError(
            f"{m_count} modalities give {1 << m_count} subsets, more than the limit {s.max_subsets}. "
            "Raise `max_subsets` if you accept the cost, or skip shapley/combinations/reliance/unimodal."
        )


def _producers(run: Run, wanted: set[str], sample: dict[str, Tensor]) -> list[Producer]:
    """The producers of the pass, after the adapter's checks; unavailable kinds get their reason."""
    adapter = run.adapter
    if not adapter.has_encoders:
        for kind in sorted(wanted & ENCODER_KINDS):
            run.unavailable[kind] = (
                "needs each modality's encoder output, and the model is driven as a black box: "
                f"{adapter.black_box_reason or 'no encoders are known'}"
            )
        wanted -= ENCODER_KINDS
    for kind, reason in check_categorical(adapter, sample, wanted).items():
        run.unavailable[kind] = reason
        run.skipped.add(kind)
        wanted.discard(kind)
    chosen = []
    for name, cls in sorted(PRODUCERS.items(), key=lambda kv: kv[1].order):
        if not (name in wanted or cls.auto) or (cls.kind.needs_encoders and not adapter.has_encoders):
            continue
        producer = cls(run)
        if producer.prepare(sample) is None:
            chosen.append(producer)
    return chosen


def collect(
    adapter: ModelAdapter,
    data: Dataset | DataLoader,
    needs: Iterable[str],
    settings: CollectSettings | None = None,
    progress: ProgressFn | None = None,
) -> Evidence:
    """Run the model over ``data`` once and gather the evidence kinds in ``needs``.

    Args:
        adapter: drives the model (its modalities, call convention, encoders, masking).
        data: a map-style Dataset of dict items (visited in a seeded shuffled order) or a DataLoader.
        needs: evidence kinds (keys of :data:`~mmdiag.evidence.EVIDENCE_KINDS`).
        settings: caps, seeds, batch size and device.
        progress: optional callback ``progress(stage, done, total)``.

    Returns:
        The :class:`~mmdiag.evidence.Evidence`. The model's parameters, gradients, train/eval
        flags and hooks are left as they were.
    """
    s = settings or CollectSettings()
    wanted = set(needs)
    _check_request(wanted, adapter, s)
    adapter.pool_mode = check_mode(s.pool)
    run = Run(adapter, s, progress)
    rank, world = distributed_rank()
    sharded = world > 1 and not isinstance(data, DataLoader)
    if sharded:
        # each process evaluates every world-th row of the shuffled order; caps are split too
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(s.seed)).tolist()  # type: ignore[arg-type]
        loader, rows = make_loader(data, s, order[rank::world])
        stats_loader, _ = make_loader(data, s, order[: s.stats_samples])  # the same rows on every rank
        run.settings = s = per_rank(s, world, sorted({c for p in PRODUCERS.values() for c in p.caps}))
        run.world = world
    else:
        loader, rows = make_loader(data, s)
        stats_loader = loader
    run.n_total = len(rows) if rows is not None else None
    model = adapter.model
    original_device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.to(run.device)
    try:
        with eval_mode(model):
            stream = run.batches(loader)
            first = next(stream, None)
            if first is None:
                raise EvidenceError("The dataset is empty: there is nothing to evaluate.")
            # The adapter checks and the producers' checks look at a few rows: on the whole first
            # batch they would cost extra batch forwards, half a pass on a 1k-row set.
            sample = take(first[1], torch.arange(min(VERIFY_ROWS, int(first[2].shape[0]))))
            adapter.verify(sample)
            producers = _producers(run, set(wanted), sample)
            if adapter.needs_stats() or any(p.needs_stats for p in producers):
                # the statistics pass reads the loader too: the main pass starts it afresh rather
                # than hold two iterators of one DataLoader (persistent workers serve only one)
                stream.close()
                estimate_stats(run, stats_loader)
                stream = run.batches(loader)
            else:
                # the main pass goes on from the batch already read (loading it again cost a
                # quarter of a plain pass on a 1k-row set)
                stream = itertools.chain([first], stream)
            ev = _main_pass(run, producers, stream, rows)
            return gather_evidence(ev, world) if sharded else ev
    finally:
        model.to(original_device)


def _main_pass(run: Run, producers: list[Producer], stream: Iterable[tuple[int, dict[str, Tensor], Tensor, dict[str, Tensor]]],
               rows: list[int] | None) -> Evidence:
    a = run.adapter
    for p in producers:
        p.start()
    acc: dict[str, list[Tensor]] = {k: [] for k in ("labels", "logits", "index", "ood")}
    active = list(producers)

    def step(p: Producer, method: str, *args: Any) -> None:
        try:
            run.timed(p.kind.name, getattr(p, method), *args)
        except p.failures as exc:
            run.fail(p.kind.name, exc)
            active.remove(p)

    with torch.no_grad():
        for offset, inputs, labels, extras in stream:
            start = time.perf_counter()
            logits, feats = a.encode(inputs) if a.has_encoders else (a.call_model(inputs), None)
            check_finite(logits, "all modalities present")
            check_labels(labels, logits.shape[1], a.output_kind)
            run.timings["forward"] = run.timings.get("forward", 0.0) + time.perf_counter() - start
            b = labels.shape[0]
            acc["labels"].append(labels.cpu())
            acc["logits"].append(logits.float().cpu())
            if "index" in extras:
                acc["index"].append(extras["index"].long().reshape(-1))
            elif rows is not None:
                acc["index"].append(torch.tensor(rows[offset:offset + b]))
            else:
                acc["index"].append(torch.arange(offset, offset + b))
            if "ood" in extras:
                acc["ood"].append(extras["ood"].bool().reshape(-1))
            batch = Batch(offset, inputs, labels, extras, logits, feats)
            for p in list(active):
                step(p, "accumulate", batch)
            if run.progress is not None:
                run.progress("evaluating", offset + b, run.n_total)
        for p in list(active):
            step(p, "flush")
    return _evidence(run, active, acc)


def _evidence(run: Run, producers: list[Producer], acc: dict[str, list[Tensor]]) -> Evidence:
    labels = torch.cat(acc["labels"])
    logits = torch.cat(acc["logits"])
    if torch.unique(labels).numel() < 2:
        raise EvidenceError(
            f"The evaluation data has only one class (label {int(labels[0])}): accuracy-based "
            "contributions are undefined. Evaluate on data with at least two classes."
        )
    fields: dict[str, Any] = {"ood": torch.cat(acc["ood"])} if acc["ood"] else {}
    meta: dict[str, Any] = {"subsample_rows": {}}
    for p in producers:
        fields.update(run.timed(p.kind.name, p.finish))
        for key, value in p.meta().items():
            if isinstance(value, dict) and isinstance(meta.get(key), dict):
                meta[key].update(value)
            else:
                meta[key] = value
    s = run.settings
    meta.update({
        **run.adapter.describe(),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
        "device": str(run.device),
        "head_split": bool(meta.get("head_split")),
        "unavailable": dict(run.unavailable),
        "skipped_kinds": sorted(run.skipped),
        "data_std": dict(run.data_std),
        "timings": {k: round(v, 6) for k, v in run.timings.items()},
    })
    return Evidence(modalities=run.adapter.modalities, n_classes=int(logits.shape[1]), labels=labels,
                    logits=logits, index=torch.cat(acc["index"]), meta=meta, **fields)
