"""Evidence: everything the diagnostics need, gathered from the model once, as tensors.

Diagnostics are pure functions of an :class:`Evidence`; they never call the model. Evidence can be
saved and loaded (``torch.save`` of plain tensors, readable with ``weights_only=True``), so a GPU
job can collect it and a CPU job can diagnose and gate.

Subsets of modalities are indexed by bit masks: bit ``j`` set means modality ``modalities[j]`` is
present. ``subsets[full_mask]`` are the logits with every modality present and ``subsets[0]`` those
with every modality masked.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from mmdiag.errors import EvidenceError

#: Evidence kinds a diagnostic can ask for in its ``needs``.
EVIDENCE_KINDS: dict[str, str] = {
    "subsets": "logits for every subset of modalities (masking the others)",
    "features": "pooled encoder features of a random subsample (needs encoders)",
    "grad_x_act": "per-sample |gradient x activation| of the true-class logit margin and of the fused loss "
                  "at each encoder output (needs encoders)",
    "param_grads": "cosine of fused and unimodal loss gradients on each encoder's parameters (needs encoders)",
    "permutations": "correctness and loss with one modality permuted across samples",
    "noise_features": "pooled encoder features of inputs corrupted at a grid of noise levels (needs encoders)",
    "attribution": "Integrated-Gradients attribution mass per modality (captum)",
}

#: Kinds that only exist when the adapter knows each modality's encoder.
ENCODER_KINDS = frozenset({"features", "grad_x_act", "param_grads", "noise_features"})


def subset_masks(n_modalities: int) -> range:
    """All subset bit masks, from 0 (nothing present) to 2^M - 1 (everything present)."""
    return range(1 << n_modalities)


def members(mask: int, modalities: Sequence[str]) -> tuple[str, ...]:
    """The modalities present in subset ``mask``."""
    return tuple(m for j, m in enumerate(modalities) if mask >> j & 1)


def mask_of(present: Sequence[str], modalities: Sequence[str]) -> int:
    """The bit mask of a subset given by modality names."""
    return sum(1 << modalities.index(m) for m in present)


def subset_name(mask: int, modalities: Sequence[str]) -> str:
    """A readable name of a subset: ``audio+visual``, or ``none`` for the empty one."""
    return "+".join(members(mask, modalities)) or "none"


def nonempty_subsets(modalities: Sequence[str]) -> Iterator[tuple[int, tuple[str, ...]]]:
    """(mask, members) of every non-empty subset, by size then order."""
    for size in range(1, len(modalities) + 1):
        for combo in itertools.combinations(modalities, size):
            yield mask_of(combo, modalities), combo


@dataclass
class Evidence:
    """Tensors gathered from one pass of the model over the evaluation data.

    Attributes:
        modalities: modality names (order defines subset bit masks).
        n_classes: number of classes C.
        labels: [N] int64 true labels.
        logits: [N, C] fused logits with every modality present.
        index: [N] int64 dataset index of each row (rows are in a seeded shuffled order).
        subsets: [2^M, N, C] logits per subset mask, or None.
        features: modality -> [n_f, d_m] pooled encoder features of the rows in ``feature_rows``.
        feature_rows: [n_f] row numbers (into ``labels``) of the feature subsample.
        grad_x_act: [n_g, M] per-sample |<dT/dh_m, h_m>| of the centred true-class logit margin
            T = z_y - mean_k z_k, rows ``grad_rows``.
        grad_x_loss: [n_g, M] per-sample |<dL/dh_m, h_m>| of the fused cross-entropy L, same rows.
        grad_rows: [n_g] row numbers of the gradient subsample.
        param_grad_norm: [M] norm of each encoder's parameter gradient of the mean fused loss.
        grad_cosine: [n_batches, M] per batch, cos(grad of fused CE, grad of m-only CE) on encoder m.
        grad_batch_sizes: [n_batches] rows in each of those batches.
        perm_correct: [K, M, N] bool, correctness with modality m permuted (permutation k).
        perm_nll: [K, M, N] true-class negative log-likelihood under the same permutations.
        noise_levels: [L] noise levels (1 = clean).
        noise_features: modality -> [L, n_u, d_m] pooled features with that modality corrupted.
        noise_rows: [n_u] row numbers of the noise subsample.
        attribution: [n_a, M] summed |Integrated-Gradients attribution| per modality.
        attribution_signed: [n_a, M] summed signed Integrated-Gradients attribution per modality
            (by completeness, the rows sum to f_y(x) - f_y(baseline) up to the delta).
        attribution_delta: [n_a] captum's convergence delta per sample.
        attribution_rows: [n_a] row numbers of the attribution subsample.
        ood: [N] bool out-of-distribution flags when the data carries an ``ood`` key.
        head_split: [M, N, C] OGM's head-split readouts z_m = W_m h_m + b/M when the head is one
            Linear layer over the concatenated pooled features, else None.
        probe_features: modality -> [n_p, d_m] pooled features of separate probe-training data
            (``--probe-data``), or None (probes then split ``features``).
        probe_labels: [n_p] labels of ``probe_features``.
        meta: JSON-safe facts: mask, mask_at, call, encoders, seeds, caps, notes.
    """

    modalities: tuple[str, ...]
    n_classes: int
    labels: Tensor
    logits: Tensor
    index: Tensor
    subsets: Tensor | None = None
    features: dict[str, Tensor] | None = None
    feature_rows: Tensor | None = None
    grad_x_act: Tensor | None = None
    grad_x_loss: Tensor | None = None
    grad_rows: Tensor | None = None
    param_grad_norm: Tensor | None = None
    grad_cosine: Tensor | None = None
    grad_batch_sizes: Tensor | None = None
    perm_correct: Tensor | None = None
    perm_nll: Tensor | None = None
    noise_levels: Tensor | None = None
    noise_features: dict[str, Tensor] | None = None
    noise_rows: Tensor | None = None
    attribution: Tensor | None = None
    attribution_signed: Tensor | None = None
    attribution_delta: Tensor | None = None
    attribution_rows: Tensor | None = None
    ood: Tensor | None = None
    head_split: Tensor | None = None
    probe_features: dict[str, Tensor] | None = None
    probe_labels: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ conveniences
    @property
    def n_samples(self) -> int:
        """Number of evaluated samples N."""
        return int(self.labels.shape[0])

    @property
    def n_modalities(self) -> int:
        """Number of modalities M."""
        return len(self.modalities)

    @property
    def full_mask(self) -> int:
        """Bit mask of the subset with every modality present."""
        return (1 << self.n_modalities) - 1

    def has(self, kind: str) -> bool:
        """Whether evidence of ``kind`` (one of :data:`EVIDENCE_KINDS`) was collected."""
        attr = {
            "subsets": "subsets",
            "features": "features",
            "grad_x_act": "grad_x_act",
            "param_grads": "grad_cosine",
            "permutations": "perm_correct",
            "noise_features": "noise_features",
            "attribution": "attribution",
        }[kind]
        return getattr(self, attr) is not None

    def require(self, *kinds: str) -> None:
        """Raise EvidenceError unless every kind was collected."""
        missing = [k for k in kinds if not self.has(k)]
        if missing:
            raise EvidenceError(
                f"This diagnostic needs evidence {', '.join(missing)}, which was not collected "
                f"({'; '.join(EVIDENCE_KINDS[k] for k in missing)})."
            )

    def subset_logits(self, present: Sequence[str]) -> Tensor:
        """[N, C] logits with only ``present`` modalities present."""
        self.require("subsets")
        assert self.subsets is not None
        return self.subsets[mask_of(present, self.modalities)]

    def correct(self, logits: Tensor | None = None) -> Tensor:
        """[N] float 0/1 correctness of ``logits`` (default: the fused logits)."""
        z = self.logits if logits is None else logits
        return (z.argmax(dim=-1) == self.labels).float()

    def true_logprob(self, logits: Tensor | None = None) -> Tensor:
        """[N] log-probability of the true class under ``logits`` (default: fused)."""
        z = self.logits if logits is None else logits
        return torch.log_softmax(z.float(), dim=-1).gather(-1, self.labels[:, None])[:, 0]

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """Plain tensors and JSON-safe values, loadable with ``torch.load(weights_only=True)``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if f.name == "modalities" else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Evidence":
        """Inverse of :meth:`to_dict`."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise EvidenceError(f"Evidence has unknown fields {sorted(unknown)}; was it written by a newer mmdiag?")
        values = dict(data)
        values["modalities"] = tuple(values["modalities"])
        return cls(**values)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically to ``path`` (temporary file in the same folder, then rename)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(self.to_dict(), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Evidence":
        """Read evidence written by :meth:`save` (no arbitrary unpickling)."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise EvidenceError(f"Evidence file {path} does not exist.") from None
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
            raise EvidenceError(f"Evidence file {path} could not be read: {exc}") from None
        if not isinstance(data, dict) or "labels" not in data:
            raise EvidenceError(f"{path} is not an mmdiag evidence file (expected a dict with 'labels').")
        return cls.from_dict(data)

    def select_rows(self, rows: Tensor) -> "Evidence":
        """Evidence restricted to rows (sample-level fields only; subsample fields re-indexed).

        Used by tests (shuffling, subsetting) and by sharded collection.
        """
        rows = rows.long()
        position = torch.full((self.n_samples,), -1, dtype=torch.long)
        position[rows] = torch.arange(rows.numel())

        def remap(sub_rows: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
            if sub_rows is None:
                return None, None
            keep = position[sub_rows] >= 0
            return keep, position[sub_rows][keep]

        kw = self.to_dict()
        kw.update(
            labels=self.labels[rows], logits=self.logits[rows], index=self.index[rows],
            subsets=None if self.subsets is None else self.subsets[:, rows],
            perm_correct=None if self.perm_correct is None else self.perm_correct[:, :, rows],
            perm_nll=None if self.perm_nll is None else self.perm_nll[:, :, rows],
            ood=None if self.ood is None else self.ood[rows],
            head_split=None if self.head_split is None else self.head_split[:, rows],
        )
        keep, kw["feature_rows"] = remap(self.feature_rows)
        if keep is not None and self.features is not None:
            kw["features"] = {m: f[keep] for m, f in self.features.items()}
        keep, kw["grad_rows"] = remap(self.grad_rows)
        if keep is not None and self.grad_x_act is not None:
            kw["grad_x_act"] = self.grad_x_act[keep]
            kw["grad_x_loss"] = None if self.grad_x_loss is None else self.grad_x_loss[keep]
        keep, kw["noise_rows"] = remap(self.noise_rows)
        if keep is not None and self.noise_features is not None:
            kw["noise_features"] = {m: f[:, keep] for m, f in self.noise_features.items()}
        keep, kw["attribution_rows"] = remap(self.attribution_rows)
        if keep is not None and self.attribution is not None:
            kw["attribution"] = self.attribution[keep]
            kw["attribution_signed"] = None if self.attribution_signed is None else self.attribution_signed[keep]
            kw["attribution_delta"] = None if self.attribution_delta is None else self.attribution_delta[keep]
        kw["modalities"] = self.modalities
        return Evidence(**kw)


def merge_evidence(parts: Sequence[Evidence]) -> Evidence:
    """Concatenate evidence gathered on disjoint shards of the data (one part per process).

    Per-sample fields are concatenated; subsample row numbers are shifted by the rows of the parts
    before them; per-batch gradient cosines are concatenated. ``param_grad_norm`` (the norm of a
    mean gradient, which cannot be merged exactly from norms) becomes the row-weighted mean of the
    parts' norms, and the meta records that.
    """
    parts = [p for p in parts if p.n_samples > 0]
    if not parts:
        raise EvidenceError("No evidence to merge: every shard was empty.")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    offsets = [0]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + p.n_samples)

    def cat(name: str, dim: int = 0) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        if any(v is None for v in values):
            return None
        return torch.cat(values, dim=dim)

    def rows(name: str) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        if any(v is None for v in values):
            return None
        return torch.cat([v + off for v, off in zip(values, offsets)])

    def cat_dict(name: str, dim: int = 0) -> dict[str, Tensor] | None:
        values = [getattr(p, name) for p in parts]
        if any(v is None for v in values):
            return None
        return {m: torch.cat([v[m] for v in values], dim=dim) for m in first.modalities}

    norm = None
    if all(p.param_grad_norm is not None and p.grad_batch_sizes is not None for p in parts):
        weights = torch.tensor([float(p.grad_batch_sizes.sum()) for p in parts])  # type: ignore[union-attr]
        norm = (torch.stack([p.param_grad_norm for p in parts]) * weights[:, None]).sum(0) / weights.sum()  # type: ignore[misc]
    meta = dict(first.meta)
    meta["shards"] = len(parts)
    unavailable: dict[str, str] = {}
    for p in parts:
        unavailable.update(p.meta.get("unavailable", {}))
    meta["unavailable"] = unavailable
    for key in ("subsample_rows", "ig_steps_used"):  # row counts add up over the shards
        totals: dict[str, int] = {}
        for p in parts:
            for k, v in p.meta.get(key, {}).items():
                totals[k] = totals.get(k, 0) + int(v)
        if totals:
            meta[key] = totals
    return Evidence(
        modalities=first.modalities, n_classes=first.n_classes,
        labels=cat("labels"), logits=cat("logits"), index=cat("index"),  # type: ignore[arg-type]
        subsets=cat("subsets", 1), features=cat_dict("features"), feature_rows=rows("feature_rows"),
        grad_x_act=cat("grad_x_act"), grad_x_loss=cat("grad_x_loss"), grad_rows=rows("grad_rows"), param_grad_norm=norm,
        grad_cosine=cat("grad_cosine"), grad_batch_sizes=cat("grad_batch_sizes"),
        perm_correct=cat("perm_correct", 2), perm_nll=cat("perm_nll", 2), noise_levels=first.noise_levels,
        noise_features=cat_dict("noise_features", 1), noise_rows=rows("noise_rows"),
        attribution=cat("attribution"), attribution_signed=cat("attribution_signed"), attribution_delta=cat("attribution_delta"),
        attribution_rows=rows("attribution_rows"), ood=cat("ood"), head_split=cat("head_split", 1),
        probe_features=first.probe_features, probe_labels=first.probe_labels, meta=meta,
    )
