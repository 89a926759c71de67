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
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from mmdiag.errors import EvidenceError
from mmdiag.io import write_atomic_with

@dataclass(frozen=True)
class FieldSpec:
    """One field of :class:`Evidence`: its name and how rows select and shards merge it.

    ``axis`` says what the field's leading (or ``dim``-th) axis indexes:

    * ``sample``: every evaluated row (``subsets`` along ``dim=1``): rows select it, shards
      concatenate it;
    * ``rows``: row numbers into the samples of a subsample (``feature_rows``): remapped on
      selection, shifted by the rows before each shard on merge;
    * ``subsample``: values aligned with the row numbers in field ``rows`` (along ``dim``);
    * ``batch``: one entry per evaluated batch (``grad_cosine``): kept on selection, concatenated;
    * ``const``: the same in every shard (``noise_levels``): kept, the first shard's on merge;
    * ``summary``: a statistic of the whole pass: kept on selection, merged by ``merge(parts)``.

    ``per_modality`` fields hold a dict modality -> tensor, each handled as above.
    """

    name: str
    axis: str
    dim: int = 0
    rows: str | None = None
    per_modality: bool = False
    merge: Callable[[Sequence["Evidence"]], Any] | None = None


@dataclass(frozen=True)
class EvidenceKind:
    """An evidence kind: what a diagnostic names in ``needs`` and the fields its producer fills.

    ``present`` is the field whose presence means the kind was collected; ``needs_encoders`` kinds
    exist only when each modality's encoder is known; a kind that is not ``requestable`` is filled
    whenever it applies (OGM's head split) and cannot be asked for.
    """

    name: str
    description: str
    fields: tuple[FieldSpec, ...]
    present: str
    needs_encoders: bool = False
    requestable: bool = True


#: Every registered kind by name (built-in producers and plug-ins register on import).
KINDS: dict[str, EvidenceKind] = {}
#: Evidence kinds a diagnostic can ask for in its ``needs``: name -> description.
EVIDENCE_KINDS: dict[str, str] = {}
#: Kinds that only exist when the adapter knows each modality's encoder.
ENCODER_KINDS: set[str] = set()
#: Field name -> its spec, over every registered kind (and the core's own optional fields).
FIELDS: dict[str, FieldSpec] = {}


def register_kind(kind: EvidenceKind) -> EvidenceKind:
    """Make ``kind`` known to :class:`Evidence` (its fields, selection, merge and persistence)."""
    clash = [f.name for f in kind.fields if f.name in FIELDS and KINDS.get(kind.name) is None]
    if clash or (kind.name in KINDS and KINDS[kind.name] != kind):
        raise EvidenceError(f"Evidence kind {kind.name!r} (fields {clash}) is already registered.")
    KINDS[kind.name] = kind
    for f in kind.fields:
        FIELDS[f.name] = f
    if kind.requestable:
        EVIDENCE_KINDS[kind.name] = kind.description
    if kind.needs_encoders:
        ENCODER_KINDS.add(kind.name)
    return kind


#: Optional fields that belong to no kind: out-of-distribution flags carried by the data, the
#: features of separate probe-training data, and those of every row of new data to score for
#: distribution shift (``ood_data``) with its known flags and row numbers.
for _spec in (FieldSpec("ood", "sample"), FieldSpec("probe_features", "const", per_modality=True),
              FieldSpec("probe_labels", "const"), FieldSpec("ood_features", "const", per_modality=True),
              FieldSpec("ood_flags", "const", per_modality=True), FieldSpec("ood_rows", "const")):
    FIELDS[_spec.name] = _spec


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
        ood_features: modality -> [n_o, d_m] pooled features of every row of the new data scored for
            distribution shift (``ood_data``), in the order of ``ood_rows``; or None.
        ood_flags: modality -> [n_o] bool known out-of-distribution flags of those rows (the data's
            ``is_ood`` for every modality, or its ``is_ood_<modality>``), when the new data has them.
        ood_rows: [n_o] row number of each in the new data.
        meta: JSON-safe facts: mask, mask_at, call, encoders, seeds, caps, notes.

    The fields after ``index`` are declared by the evidence kinds (:func:`register_kind`): a kind
    added as a plug-in gets its fields here, saved, loaded, selected and merged, with no edit to
    this class. A declared field that was not collected reads as ``None``.
    """

    _CORE = ("modalities", "n_classes", "labels", "logits", "index", "meta")

    def __init__(self, modalities: Sequence[str], n_classes: int, labels: Tensor, logits: Tensor,
                 index: Tensor, meta: Mapping[str, Any] | None = None, **fields: Any) -> None:
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise EvidenceError(
                f"Evidence has unknown fields {unknown}; was it written by a newer mmdiag, or by an "
                "evidence kind whose plug-in is not installed?"
            )
        object.__setattr__(self, "_fields", {k: v for k, v in fields.items() if v is not None})
        self.modalities = tuple(modalities)
        self.n_classes = int(n_classes)
        self.labels, self.logits, self.index = labels, logits, index
        self.meta = dict(meta or {})

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: the declared optional fields
        if name in FIELDS:
            return self.__dict__["_fields"].get(name)
        raise AttributeError(f"Evidence has no field {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in FIELDS:
            if value is None:
                self._fields.pop(name, None)
            else:
                self._fields[name] = value
        elif name in self._CORE:
            object.__setattr__(self, name, value)
        else:
            raise AttributeError(f"Evidence has no field {name!r} (declare it in an evidence kind)")

    def replace(self, **changes: Any) -> "Evidence":
        """A copy with some fields replaced (``None`` removes an optional field)."""
        return Evidence(**{**self.to_dict(), "modalities": self.modalities, **changes})

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
        """Whether evidence of ``kind`` (a registered kind's name) was collected."""
        if kind not in KINDS:
            raise EvidenceError(f"Unknown evidence kind {kind!r}; known: {sorted(KINDS)}.")
        return self._fields.get(KINDS[kind].present) is not None

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
        out: dict[str, Any] = {k: getattr(self, k) for k in self._CORE}
        out["modalities"] = list(self.modalities)
        out.update(self._fields)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Evidence":
        """Inverse of :meth:`to_dict`."""
        values = dict(data)
        values["modalities"] = tuple(values["modalities"])
        return cls(**values)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically to ``path`` (temporary file in the same folder, then rename)."""
        write_atomic_with(path, lambda tmp: torch.save(self.to_dict(), tmp))

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
        """Evidence restricted to ``rows``: per-sample fields indexed, subsample fields re-indexed.

        Used by tests (shuffling, subsetting) and by sharded collection.
        """
        rows = rows.long()
        position = torch.full((self.n_samples,), -1, dtype=torch.long)
        position[rows] = torch.arange(rows.numel())
        kept: dict[str, Tensor] = {}  # row-number field -> which of its entries survive
        out: dict[str, Any] = {"labels": self.labels[rows], "logits": self.logits[rows], "index": self.index[rows]}
        for name, value in self._fields.items():
            spec = FIELDS[name]
            if spec.axis == "rows":
                keep = position[value] >= 0
                kept[name], out[name] = keep, position[value][keep]
        for name, value in self._fields.items():
            spec = FIELDS[name]
            if spec.axis == "sample":
                out[name] = _apply(value, spec, lambda t, d=spec.dim: t.index_select(d, rows))
            elif spec.axis == "subsample" and spec.rows in kept:
                keep = kept[spec.rows]
                out[name] = _apply(value, spec, lambda t, d=spec.dim, k=keep: t.index_select(d, k.nonzero()[:, 0]))
            elif name not in out:
                out[name] = value
        return Evidence(modalities=self.modalities, n_classes=self.n_classes, meta=self.meta, **out)


def _apply(value: Any, spec: FieldSpec, fn: Callable[[Tensor], Tensor]) -> Any:
    return {m: fn(t) for m, t in value.items()} if spec.per_modality else fn(value)


def _merge_field(spec: FieldSpec, values: list[Any], offsets: list[int], parts: Sequence[Evidence]) -> Any:
    """One field of the merged evidence, from the shards' values (None when a shard lacks it)."""
    if spec.axis == "summary":
        return spec.merge(parts) if spec.merge is not None else None
    if spec.axis == "const":
        return values[0]
    if any(v is None for v in values):
        return None
    if spec.axis == "rows":
        return torch.cat([v + off for v, off in zip(values, offsets)])
    if spec.per_modality:
        return {m: torch.cat([v[m] for v in values], dim=spec.dim) for m in values[0]}
    return torch.cat(values, dim=spec.dim)


def merge_evidence(parts: Sequence[Evidence]) -> Evidence:
    """Concatenate evidence gathered on disjoint shards of the data (one part per process).

    Each field merges as its :class:`FieldSpec` says: per-sample and subsample fields are
    concatenated, subsample row numbers are shifted by the rows of the parts before them, per-batch
    values are concatenated, constants come from the first part, and summaries (``param_grad_norm``,
    the norm of a mean gradient, which cannot be merged exactly from norms) use their kind's merge.
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
    names = [n for n in FIELDS if any(n in p._fields for p in parts)]
    merged = {n: _merge_field(FIELDS[n], [p._fields.get(n) for p in parts], offsets, parts) for n in names}
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
        modalities=first.modalities, n_classes=first.n_classes, meta=meta,
        labels=torch.cat([p.labels for p in parts]), logits=torch.cat([p.logits for p in parts]),
        index=torch.cat([p.index for p in parts]), **merged,
    )
