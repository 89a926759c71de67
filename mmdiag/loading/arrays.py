"""In-memory datasets: per-sample arrays (one per modality, the labels, optional extras) checked
and wrapped as an :class:`ArrayDataset`, and the batch collation every loader uses."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from mmdiag.errors import ConfigError, EvidenceError
from mmdiag.registry import closest


#: Names a label array may have in a data file (the first one present wins).
LABEL_KEYS: tuple[str, ...] = ("label", "labels")
#: Optional per-sample arrays carried through to every item, beside modalities and the label.
EXTRA_KEYS: tuple[str, ...] = ("ood", "index")
#: What to do with samples whose inputs hold NaN or +-Inf.
NAN_POLICIES: tuple[str, ...] = ("error", "skip")

_RESERVED_KEYS = frozenset(LABEL_KEYS) | frozenset(EXTRA_KEYS)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def collate(items: Sequence[Any]) -> Any:
    """Batch a list of items (flat dicts) -- torch's ``default_collate``."""
    return default_collate(items)


class ArrayDataset(Dataset):
    """Validated in-memory arrays: one per modality, integer labels, optional extras.

    ``dataset[i]`` is ``{modality: float32 (int64 for integer data) tensor, ..., "label": int64 scalar, extras...}``.
    Attributes: ``modalities``, ``n_classes``, ``labels`` (``np.ndarray`` of int64), ``arrays``
    (modality name -> float32 ``np.ndarray``), ``extras``, ``dropped`` (samples removed by
    ``nan_policy="skip"``) and ``source`` (where the data came from, for messages). Build it with
    :func:`dataset_from_arrays` or :func:`load_dataset`, which validate first.
    """

    collate = staticmethod(collate)

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        labels: np.ndarray,
        extras: Mapping[str, np.ndarray] | None = None,
        *,
        n_classes: int | None = None,
        dropped: int = 0,
        source: str = "arrays",
    ) -> None:
        self.arrays: dict[str, np.ndarray] = dict(arrays)
        self.modalities: tuple[str, ...] = tuple(self.arrays)
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64)
        self.extras: dict[str, np.ndarray] = dict(extras or {})
        self.n_classes: int = int(n_classes) if n_classes is not None else (
            int(self.labels.max()) + 1 if len(self.labels) else 0
        )
        self.dropped: int = int(dropped)
        self.source = source

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item: dict[str, torch.Tensor] = {
            m: torch.from_numpy(np.array(a[i], dtype=a.dtype)) for m, a in self.arrays.items()
        }
        item["label"] = torch.tensor(int(self.labels[i]), dtype=torch.int64)
        for k, a in self.extras.items():
            item[k] = torch.as_tensor(np.array(a[i]))
        return item

    def tensors(self) -> dict[str, torch.Tensor]:
        """All samples at once: modality tensors, ``"label"`` and extras, sharing memory."""
        out = {m: torch.from_numpy(a) for m, a in self.arrays.items()}
        out["label"] = torch.from_numpy(self.labels)
        out.update({k: torch.from_numpy(a) for k, a in self.extras.items()})
        return out

    def __repr__(self) -> str:
        shapes = ", ".join(f"{m}{tuple(a.shape[1:])}" for m, a in self.arrays.items())
        return (
            f"ArrayDataset({len(self)} samples from {self.source}: {shapes}; "
            f"{self.n_classes} classes)"
        )


def input_dtype(dtype: Any) -> np.dtype:
    """The dtype a modality is fed to the model in: int64 for integer or bool data (token ids,
    category codes, which embeddings need), float32 for everything else."""
    dtype = np.dtype(dtype)
    return np.dtype(np.int64) if (np.issubdtype(dtype, np.integer) or dtype == np.bool_) else np.dtype(np.float32)


def _as_input_tensor(value: Any) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return t.to(torch.float32)
    return t.to(torch.int64)


def _check_nan_policy(nan_policy: str) -> None:
    if nan_policy not in NAN_POLICIES:
        near = closest(str(nan_policy), list(NAN_POLICIES))
        raise ConfigError(
            f"Unknown NaN policy {nan_policy!r}; expected one of {', '.join(NAN_POLICIES)}."
            + (f" Did you mean {near!r}?" if near else "")
        )


def _to_numpy(value: Any, key: str, source: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu")
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.to(torch.float32)
        try:
            return t.numpy()
        except (TypeError, RuntimeError) as e:
            raise EvidenceError(
                f"Array {key!r} in {source} has dtype {t.dtype}, which cannot become a numeric "
                f"array ({e}). Expected numbers (float, int or bool); convert it first."
            ) from e
    try:
        arr = np.asarray(value)
    except Exception as e:
        raise EvidenceError(
            f"Entry {key!r} in {source} is a {type(value).__name__} that is not an array "
            f"({type(e).__name__}: {e}). Expected a numpy array or a tensor with one row per sample."
        ) from e
    return arr


def _counts_text(arrays: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k}: {a.shape[0] if a.ndim else 'scalar'}" for k, a in arrays.items())


def _nonfinite_rows(arr: np.ndarray, chunk: int = 8192) -> np.ndarray:
    n = arr.shape[0]
    bad = np.zeros(n, dtype=bool)
    if arr.dtype.kind != "f" or n == 0:
        return bad
    for s in range(0, n, chunk):
        block = np.asarray(arr[s : s + chunk]).reshape(min(chunk, n - s), -1)
        bad[s : s + chunk] = ~np.isfinite(block).all(axis=1)
    return bad


#: The refusal of multi-hot labels (several classes per sample), shared by every data path.
MULTI_LABEL = (
    "{what} have shape {shape} with several classes marked for some samples: multi-label "
    "classification is not supported yet (mmdiag's diagnostics read one true class per sample). "
    "For a single-label task stored one-hot, save labels.argmax(axis=1) instead."
)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _validate_labels(raw: np.ndarray, key: str, source: str, num_classes: int | None) -> np.ndarray:
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim == 2 and np.isin(raw, (0, 1)).all() and (raw.sum(axis=1) != 1).any():
        raise EvidenceError(MULTI_LABEL.format(what=f"Labels {key!r} in {source}", shape=tuple(raw.shape)))
    if raw.ndim != 1:
        raise EvidenceError(
            f"Labels {key!r} in {source} have shape {tuple(raw.shape)}; expected one integer class "
            f"index per sample, shape (N,). For one-hot labels save labels.argmax(axis=1) instead."
        )
    kind = raw.dtype.kind
    if kind == "b":
        labels = raw.astype(np.int64)
    elif kind in "iu":
        labels = raw.astype(np.int64, copy=False)
    elif kind == "f":
        finite = np.isfinite(raw)
        whole = finite & (raw == np.round(np.where(finite, raw, 0)))
        if not whole.all():
            bad = np.flatnonzero(~whole)
            examples = ", ".join(repr(float(raw[i])) for i in bad[:3])
            raise EvidenceError(
                f"Labels {key!r} in {source} are floats and {len(bad)} of {raw.shape[0]} "
                f"{'is not a whole number' if len(bad) == 1 else 'are not whole numbers'} (e.g. "
                f"{examples}, first at index {int(bad[0])}); expected integer class indices "
                f"0..C-1. Save class indices, not probabilities or regression targets."
            )
        labels = raw.astype(np.int64)
    else:
        raise EvidenceError(
            f"Labels {key!r} in {source} have dtype {raw.dtype}; expected integer class indices "
            f"0..C-1. Map class names to integers before saving."
        )
    if labels.size and labels.min() < 0:
        bad = np.flatnonzero(labels < 0)
        raise EvidenceError(
            f"Labels {key!r} in {source} contain {_plural(len(bad), 'negative value')} (e.g. "
            f"{int(labels[bad[0]])} at index {int(bad[0])}); expected class indices >= 0. Remove "
            f"or remap ignored samples (such as -1 / -100) before running mmdiag."
        )
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        raise EvidenceError(
            f"Labels {key!r} in {source} go up to {int(labels.max())}, but num_classes is "
            f"{num_classes}; expected labels in 0..{num_classes - 1}. Pass the right number of "
            f"classes or fix the labels."
        )
    return labels


def _choose_modalities(arrays: Mapping[str, Any], modalities: Sequence[str] | str | None, source: str) -> list[str]:
    """The modality keys to use, in order: ``modalities`` checked against the arrays, or every key
    that is not a label or an extra; at least two."""
    keys = [str(k) for k in arrays]
    candidates = [k for k in keys if k not in _RESERVED_KEYS]
    if modalities is None:
        chosen = candidates
    else:
        chosen = [modalities] if isinstance(modalities, str) else list(modalities)
        for m in chosen:
            if m in _RESERVED_KEYS:
                raise ConfigError(
                    f"{m!r} cannot be a modality: in {source} it is reserved for "
                    f"{'labels' if m in LABEL_KEYS else 'per-sample extras'}. Choose modalities "
                    f"among {', '.join(map(repr, candidates)) or '(none)'}."
                )
            if m not in arrays:
                near = closest(m, candidates)
                raise ConfigError(
                    f"Unknown modality {m!r}: {source} has no array by that name; its modality "
                    f"keys are {', '.join(map(repr, candidates)) or '(none)'}."
                    + (f" Did you mean {near!r}?" if near else "")
                )
        dupes = sorted({m for m in chosen if chosen.count(m) > 1})
        if dupes:
            raise ConfigError(
                f"Modalities {', '.join(map(repr, dupes))} are listed more than once; expected "
                f"each modality once. Remove the duplicates."
            )
    if len(chosen) < 2:
        raise ConfigError(
            f"{source} has {_plural(len(chosen), 'modality')} "
            f"({', '.join(map(repr, chosen)) or 'none'}); expected at least 2. mmdiag compares "
            f"modalities with each other, so a single one leaves nothing to compare. Add another "
            f"modality array, or select at least two modalities."
        )
    return chosen


def _check_sample_axis(every: Mapping[str, np.ndarray], source: str) -> int:
    """The common number of samples of ``every`` array (numeric, one row per sample, at least one)."""
    scalars = [k for k, a in every.items() if a.ndim == 0]
    if scalars:
        raise EvidenceError(
            f"Array(s) {', '.join(map(repr, scalars))} in {source} are scalars; expected one row "
            f"per sample (first dimension = number of samples). Save per-sample arrays."
        )
    counts = {k: a.shape[0] for k, a in every.items()}
    if len(set(counts.values())) > 1:
        raise EvidenceError(
            f"Arrays in {source} disagree on the number of samples (first dimension): "
            f"{_counts_text(every)}; expected the same count for every modality, the labels and "
            f"extras. Check that they were saved from the same split, in the same order."
        )
    n = next(iter(counts.values()))
    if n == 0:
        raise EvidenceError(
            f"{source} is empty: every array has 0 samples; expected at least one. Check that the "
            f"right split was saved."
        )
    return n


def _validate_extras(extras_raw: Mapping[str, np.ndarray], n: int, source: str) -> dict[str, np.ndarray]:
    """``ood`` as one bool per sample and ``index`` as int64 ids, checked."""
    extras: dict[str, np.ndarray] = {}
    if "ood" in extras_raw:
        ood = extras_raw["ood"].reshape(n, -1) if extras_raw["ood"].ndim > 1 else extras_raw["ood"]
        if ood.ndim != 1 or not np.isin(ood, (0, 1)).all():
            raise EvidenceError(
                f"Array 'ood' in {source} must hold one flag per sample (bool or 0/1); found "
                f"shape {tuple(extras_raw['ood'].shape)} with values other than 0/1 or several per "
                f"sample. Save a boolean vector marking out-of-distribution samples."
            )
        extras["ood"] = ood.astype(bool)
    if "index" in extras_raw:
        idx = extras_raw["index"]
        if idx.dtype.kind == "f" and not (np.isfinite(idx).all() and (idx == np.round(idx)).all()):
            raise EvidenceError(
                f"Array 'index' in {source} holds non-integer values; expected one integer id per "
                f"sample. Save the sample ids as integers."
            )
        extras["index"] = idx.astype(np.int64, copy=False)
    return extras


def _finite_rows(mods: Mapping[str, np.ndarray], nan_policy: str, source: str) -> np.ndarray | None:
    """The rows to keep (None: every row) when inputs hold NaN or Inf: an error, or with ``skip``
    the finite rows."""
    bad_rows = {m: _nonfinite_rows(a) for m, a in mods.items()}
    bad_counts = {m: int(b.sum()) for m, b in bad_rows.items()}
    if not any(bad_counts.values()):
        return None
    n = len(next(iter(bad_rows.values())))
    per = ", ".join(f"{m}: {_plural(c, 'sample')}" for m, c in bad_counts.items() if c)
    if nan_policy == "error":
        raise EvidenceError(
            f"{source} has NaN or Inf values in its inputs ({per}, out of {n}); expected "
            f"finite numbers. Clean the data, or use `nan_policy='skip'` to drop those samples."
        )
    keep = ~np.logical_or.reduce(list(bad_rows.values()))
    if not keep.any():
        raise EvidenceError(
            f"{source} has NaN or Inf in every sample ({per}); with `nan_policy='skip'` nothing "
            f"is left. Clean the data before running mmdiag."
        )
    return keep


def dataset_from_arrays(
    arrays: Mapping[str, np.ndarray | torch.Tensor],
    modalities: Sequence[str] | None = None,
    nan_policy: str = "error",
    *,
    num_classes: int | None = None,
    source: str = "the arrays passed in",
) -> ArrayDataset:
    """Validate a mapping of per-sample arrays and wrap it as an :class:`ArrayDataset`.

    ``arrays`` holds one array per modality (first dimension = samples), labels under ``label`` or
    ``labels`` and optionally ``ood`` (0/1 flags) and ``index``. ``modalities`` picks and orders
    the modality keys (default: every other key). ``nan_policy`` is "error" or "skip" (drop the
    samples whose inputs hold NaN/Inf, counted in ``dataset.dropped``).
    """
    _check_nan_policy(nan_policy)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ConfigError(f"num_classes must be a positive integer, found {num_classes!r}.")
    if not isinstance(arrays, Mapping):
        raise ConfigError(
            f"Expected a mapping of names to arrays for {source}, found a "
            f"{type(arrays).__name__}. Pass a dict like {{'audio': ..., 'video': ..., 'label': ...}}."
        )
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    if label_key is None:
        raise EvidenceError(
            f"No labels: expected an array named 'label' or 'labels' in {source}; found keys "
            f"{', '.join(repr(str(k)) for k in arrays) or '(none)'}. Add the integer class of each sample "
            f"under 'label'."
        )
    chosen = _choose_modalities(arrays, modalities, source)

    mods = {m: _to_numpy(arrays[m], m, source) for m in chosen}
    raw_labels = _to_numpy(arrays[label_key], label_key, source)
    extras_raw = {k: _to_numpy(arrays[k], k, source) for k in EXTRA_KEYS if k in arrays}
    if label_key == "label" and "labels" in arrays:
        other = _to_numpy(arrays["labels"], "labels", source)
        if other.shape != raw_labels.shape or not np.array_equal(other, raw_labels):
            raise EvidenceError(
                f"{source} has both 'label' and 'labels' and they differ; expected one label "
                f"array. Keep only one of them."
            )
    for k, a in {**mods, **extras_raw}.items():
        if a.dtype.kind not in "biuf":
            raise EvidenceError(
                f"Array {k!r} in {source} has dtype {a.dtype}, which is not numeric; expected "
                f"numbers (float, int or bool) with one row per sample. Encode it as numbers "
                f"first (e.g. features or token ids)."
            )
    n = _check_sample_axis({**mods, label_key: raw_labels, **extras_raw}, source)
    labels = _validate_labels(raw_labels, label_key, source, num_classes)
    extras = _validate_extras(extras_raw, n, source)

    keep = _finite_rows(mods, nan_policy, source)
    dropped = 0
    if keep is not None:
        dropped = int(n - keep.sum())
        mods = {m: a[keep] for m, a in mods.items()}
        labels = labels[keep]
        extras = {k: a[keep] for k, a in extras.items()}
    mods = {m: np.ascontiguousarray(a, dtype=input_dtype(a.dtype)) for m, a in mods.items()}
    return ArrayDataset(
        mods, labels, extras, n_classes=num_classes, dropped=dropped, source=source
    )
