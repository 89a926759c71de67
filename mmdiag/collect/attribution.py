"""``attribution``: Integrated-Gradients attribution mass per modality (captum), on a seeded
subsample of N/128 rows (``attribution_fraction``; at least :data:`ATTRIBUTION_FLOOR`, at most
``max_attribution_samples``).

Attributed rows wait until they fill one Integrated-Gradients batch (rows x steps = batch size):
a few rows per evaluation batch would each pay captum's per-call cost. Every row starts at
``ig_steps`` Gauss-Legendre steps; rows whose completeness gap exceeds ``ig_tolerance`` are
attributed again with 4x the steps, up to ``ig_max_steps``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from mmdiag.categorical import attribution_path
from mmdiag.collect.producer import Batch, Producer, register_producer
from mmdiag.collect.sampling import pick, rows_in, subsample_size, take
from mmdiag.errors import AdapterError, EvidenceError
from mmdiag.evidence import EvidenceKind, FieldSpec

#: fewest attributed rows, whatever the fraction.
ATTRIBUTION_FLOOR = 32


def integrated_gradients(run: Any, inputs: Mapping[str, Tensor], labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[b, M] summed |IG attribution| and [b, M] summed signed IG attribution per modality,
    [b] convergence deltas (captum) and [b] steps each row took."""
    from captum.attr import IntegratedGradients

    a, s = run.adapter, run.settings
    # at the inputs, or (a categorical modality) at the encoder outputs: see attribution_path
    path = attribution_path(a, inputs, run.gen)
    ig = IntegratedGradients(path.forward)

    def attribute(rows: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
        xs, baselines, extra = path.take(rows)
        with torch.enable_grad():
            attrs, delta = ig.attribute(
                xs, baselines=baselines, target=labels[rows], additional_forward_args=extra,
                n_steps=steps, internal_batch_size=s.batch_size, return_convergence_delta=True,
            )
        mass, signed = path.per_modality(attrs, absolute=True), path.per_modality(attrs, absolute=False)
        return mass, signed, delta.detach().reshape(-1)

    steps = int(s.ig_steps)
    everything = torch.arange(labels.shape[0], device=labels.device)
    mass, signed, delta = attribute(everything, steps)
    used = torch.full((labels.shape[0],), steps, dtype=torch.long)
    todo = everything
    while steps < s.ig_max_steps and todo.numel():
        # captum's delta = sum of attributions - (f(x) - f(baseline)), so the gap is recoverable
        gap = (signed.sum(1) - delta).abs()
        scale = torch.maximum(gap, gap.median()).clamp_min(1e-12)
        todo = torch.nonzero(delta.abs() > s.ig_tolerance * scale).flatten()
        if not todo.numel():
            break
        steps = min(steps * 4, int(s.ig_max_steps))
        mass[todo], signed[todo], delta[todo] = attribute(todo, steps)
        used[todo.cpu()] = steps
    return mass.cpu(), signed.cpu(), delta.abs().cpu(), used


@register_producer
class AttributionProducer(Producer):
    kind = EvidenceKind(
        "attribution", "Integrated-Gradients attribution mass per modality (captum)",
        (FieldSpec("attribution", "subsample", rows="attribution_rows"),
         FieldSpec("attribution_signed", "subsample", rows="attribution_rows"),
         FieldSpec("attribution_delta", "subsample", rows="attribution_rows"),
         FieldSpec("attribution_rows", "rows")),
        present="attribution",
    )
    order = 80
    caps = ("max_attribution_samples",)
    failures = (EvidenceError, AdapterError, RuntimeError, AssertionError)

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.buffer: list[tuple[dict[str, Tensor], Tensor, Tensor]] = []
        self.out: dict[str, list[Tensor]] = {k: [] for k in ("mass", "signed", "delta", "steps", "rows")}

    def start(self) -> None:
        s = self.run.settings
        self.n_rows = subsample_size(self.run.n_total, s.max_attribution_samples, s.attribution_fraction,
                                     -(-ATTRIBUTION_FLOOR // self.run.world))
        self.chosen = pick(self.run.n_total, self.n_rows, s.seed + 14)
        self.chunk = max(1, s.batch_size // s.ig_steps)

    def accumulate(self, batch: Batch) -> None:
        r = rows_in(batch.offset, batch.size, self.chosen, self.n_rows)
        if not r.numel():
            return
        self.buffer.append((take(batch.inputs, r), batch.labels[r.to(batch.labels.device)], r + batch.offset))
        if sum(int(x[2].numel()) for x in self.buffer) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        inputs = {k: torch.cat([x[0][k] for x in self.buffer]) for k in self.buffer[0][0]}
        labels = torch.cat([x[1] for x in self.buffer])
        rows = torch.cat([x[2] for x in self.buffer])
        self.buffer.clear()
        mass, signed, delta, steps = integrated_gradients(self.run, inputs, labels)
        for key, value in (("mass", mass), ("signed", signed), ("delta", delta), ("steps", steps), ("rows", rows)):
            self.out[key].append(value)

    def finish(self) -> dict[str, Any]:
        if not self.out["rows"]:
            return {}
        return {"attribution": torch.cat(self.out["mass"]), "attribution_signed": torch.cat(self.out["signed"]),
                "attribution_delta": torch.cat(self.out["delta"]), "attribution_rows": torch.cat(self.out["rows"])}

    def meta(self) -> dict[str, Any]:
        out: dict[str, Any] = {"subsample_rows": {"attribution": self.n_rows}}
        if self.out["steps"]:
            values, counts = torch.unique(torch.cat(self.out["steps"]), return_counts=True)
            out["ig_steps_used"] = {str(k): v for k, v in zip(values.tolist(), counts.tolist())}
        return out
