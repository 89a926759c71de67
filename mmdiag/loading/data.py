"""Datasets from arrays, data files and user factories, with their checks."""

from __future__ import annotations

from operator import getitem
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from mmdiag.errors import ConfigError, EvidenceError, LoadError, call_user, user_location
from mmdiag.loading.checkpoints import _first_line, _quiet, _weights_only_refusal
from mmdiag.loading.models import _callable_name, call_factory
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
    keys = [str(k) for k in arrays]
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    if label_key is None:
        raise EvidenceError(
            f"No labels: expected an array named 'label' or 'labels' in {source}; found keys "
            f"{', '.join(map(repr, keys)) or '(none)'}. Add the integer class of each sample "
            f"under 'label'."
        )

    if modalities is None:
        chosen = [k for k in keys if k not in _RESERVED_KEYS]
    else:
        if isinstance(modalities, str):
            modalities = [modalities]
        chosen = list(modalities)
        candidates = [k for k in keys if k not in _RESERVED_KEYS]
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
    every = {**mods, label_key: raw_labels, **extras_raw}
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
    labels = _validate_labels(raw_labels, label_key, source, num_classes)

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

    bad_rows = {m: _nonfinite_rows(a) for m, a in mods.items()}
    bad_counts = {m: int(b.sum()) for m, b in bad_rows.items()}
    dropped = 0
    if any(bad_counts.values()):
        per = ", ".join(f"{m}: {_plural(c, 'sample')}" for m, c in bad_counts.items() if c)
        if nan_policy == "error":
            raise EvidenceError(
                f"{source} has NaN or Inf values in its inputs ({per}, out of {n}); expected "
                f"finite numbers. Clean the data, or use `nan_policy='skip'` to drop those samples."
            )
        keep = ~np.logical_or.reduce(list(bad_rows.values()))
        dropped = int(n - keep.sum())
        if not keep.any():
            raise EvidenceError(
                f"{source} has NaN or Inf in every sample ({per}); with `nan_policy='skip'` nothing "
                f"is left. Clean the data before running mmdiag."
            )
        mods = {m: a[keep] for m, a in mods.items()}
        labels = labels[keep]
        extras = {k: a[keep] for k, a in extras.items()}

    mods = {m: np.ascontiguousarray(a, dtype=input_dtype(a.dtype)) for m, a in mods.items()}
    return ArrayDataset(
        mods, labels, extras, n_classes=num_classes, dropped=dropped, source=source
    )


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, mmap_mode="r", allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}  # each member is read (decompressed) once
    except ValueError as e:
        if "allow_pickle" in str(e) or "pickle" in str(e).lower():
            raise EvidenceError(
                f"Data file {path} contains object (pickled) arrays, which mmdiag does not load; "
                f"expected numeric arrays only. Save numbers (e.g. np.float32 features and int "
                f"labels) with np.savez."
            ) from e
        raise LoadError(
            f"Data file {path} could not be read as .npz: {type(e).__name__}: {e}; the file may "
            f"be truncated or corrupted. Save it again with np.savez."
        ) from e
    except Exception as e:
        raise LoadError(
            f"Data file {path} could not be read as .npz: {type(e).__name__}: {e}; the file may "
            f"be truncated or corrupted. Save it again with np.savez."
        ) from e


def _load_pt_data(path: Path) -> dict[str, Any]:
    try:
        with _quiet():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if _weights_only_refusal(e):
            raise LoadError(
                f"Data file {path} holds Python objects other than tensors, which mmdiag will not "
                f"unpickle (it could run code); expected a dict of tensors saved with torch.save. "
                f"Convert numpy arrays with torch.from_numpy before saving, or use .npz."
            ) from e
        raise LoadError(
            f"Data file {path} could not be read with torch.load: {type(e).__name__}: "
            f"{_first_line(str(e))}; the file may be truncated or corrupted. Save it again."
        ) from e
    if not isinstance(obj, Mapping):
        raise LoadError(
            f"Data file {path} holds a {type(obj).__name__}; expected a dict of tensors with one "
            f"entry per modality and 'label'. Save a dict like {{'audio': x_a, 'video': x_v, "
            f"'label': y}}."
        )
    return dict(obj)


# ---- factory datasets -------------------------------------------------------------------------


def flatten_item(item: Any, *, source: str = "the dataset") -> dict[str, Any]:
    """A sample or batch as one flat dict: ``(inputs_dict, label)`` or a dict with ``label``.

    Works the same for single items and for batches from a DataLoader; ``labels`` is accepted as
    a synonym of ``label``. Raises :class:`EvidenceError` for any other shape.
    """
    if isinstance(item, Mapping):
        out = dict(item)
        if "label" not in out and "labels" in out:
            out["label"] = out.pop("labels")
        if "label" not in out:
            raise EvidenceError(
                f"No labels: an item of {source} is a dict with keys "
                f"{', '.join(map(repr, list(out)[:10]))}; expected a 'label' entry beside the "
                f"modality inputs. Add it, or return (inputs_dict, label) tuples."
            )
        return out
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Mapping):
        inputs, label = item
        if "label" in inputs:
            raise EvidenceError(
                f"An item of {source} is (inputs, label) but inputs also has a 'label' key; "
                f"expected labels in one place. Drop one of them."
            )
        out = dict(inputs)
        out["label"] = label
        return out
    shape = type(item).__name__
    if isinstance(item, (tuple, list)):
        shape += f" of {len(item)} ({', '.join(type(x).__name__ for x in item[:4])})"
    raise EvidenceError(
        f"Items of {source} are {shape}; expected (dict_of_modality_tensors, label) or a dict with "
        f"the modality tensors and a 'label' key. Make __getitem__ return one of those."
    )


def _check_first_item(
    flat: Mapping[str, Any], modalities: Sequence[str] | None, source: str, batched: bool
) -> tuple[str, ...]:
    candidates = [k for k in flat if k not in _RESERVED_KEYS]
    if modalities is None:
        chosen = list(candidates)
    else:
        chosen = [modalities] if isinstance(modalities, str) else list(modalities)
        for m in chosen:
            if m not in flat or m in _RESERVED_KEYS:
                near = closest(m, candidates)
                raise ConfigError(
                    f"Unknown modality {m!r}: the items of {source} have no input by that name; "
                    f"their modality keys are {', '.join(map(repr, candidates)) or '(none)'}."
                    + (f" Did you mean {near!r}?" if near else "")
                )
    if len(chosen) < 2:
        raise ConfigError(
            f"{source} yields {_plural(len(chosen), 'modality')} "
            f"({', '.join(map(repr, chosen)) or 'none'}); expected at least 2. mmdiag compares "
            f"modalities with each other, so a single one leaves nothing to compare."
        )
    for m in chosen:
        v = flat[m]
        t = v if isinstance(v, torch.Tensor) else None
        if t is None:
            try:
                t = torch.as_tensor(np.asarray(v))
            except Exception:
                t = None
        if t is None or t.dtype.is_complex or not (t.dtype.is_floating_point or t.dtype in (
            torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64
        )):
            raise EvidenceError(
                f"Input {m!r} of {source} is {type(v).__name__}"
                + (f" with dtype {t.dtype}" if t is not None else "")
                + "; expected a numeric tensor. Return tensors (or numeric arrays) per modality."
            )
    label = _label_tensor(flat["label"], source)
    if not batched and label.ndim != 0:
        raise EvidenceError(
            f"The label of an item of {source} has shape {tuple(label.shape)}; expected one "
            f"integer class index per sample. Return a plain int (or 0-d tensor)."
        )
    return tuple(chosen)


def _label_tensor(value: Any, source: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(value)
    except Exception as e:
        raise EvidenceError(
            f"A label of {source} is a {type(value).__name__}; expected an integer class index "
            f"({type(e).__name__}: {e}). Return ints or integer tensors as labels."
        ) from e
    if t.dtype.is_floating_point:
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise EvidenceError(
                f"A label of {source} is {t.tolist()!r}, not a whole number; expected integer "
                f"class indices 0..C-1. Return class indices, not probabilities."
            )
    elif t.dtype.is_complex or t.dtype not in (
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64
    ):
        raise EvidenceError(
            f"A label of {source} has dtype {t.dtype}; expected integer class indices 0..C-1."
        )
    t = t.to(torch.int64)
    if t.numel() and int(t.min()) < 0:
        raise EvidenceError(
            f"A label of {source} is negative ({int(t.min())}); expected class indices >= 0. "
            f"Remove or remap ignored samples (such as -1 / -100)."
        )
    return t


class DictDataset(Dataset):
    """Adapts a user's map-style Dataset so every item is one flat dict.

    Items become ``{modality: float32 tensor, ..., "label": int64 scalar, extras...}`` whether the
    wrapped dataset returns ``(inputs_dict, label)`` tuples or dicts with a ``label`` key; only
    the chosen modalities and the extras ``ood``/``index`` are kept. Each item is checked for
    NaN/Inf as it is read (``nan_policy="error"``); with ``"skip"`` the whole dataset is scanned
    once up front and the bad samples are left out (``dropped`` counts them).
    """

    collate = staticmethod(collate)

    def __init__(
        self,
        dataset: Any,
        modalities: Sequence[str],
        *,
        nan_policy: str = "error",
        num_classes: int | None = None,
        source: str = "the dataset",
    ) -> None:
        _check_nan_policy(nan_policy)
        self.dataset = dataset
        self.modalities: tuple[str, ...] = tuple(modalities)
        self.nan_policy = nan_policy
        self.source = source
        self._num_classes = num_classes
        self._labels: np.ndarray | None = None
        self._index: list[int] | None = None
        self.dropped: int = 0
        if nan_policy == "skip":
            keep = []
            for i in range(len(dataset)):
                raw = call_user(getitem, f"reading item {i} of {source}", dataset, i)
                if self._nonfinite(self._convert(raw)) is None:
                    keep.append(i)
            self.dropped = len(dataset) - len(keep)
            if not keep:
                raise EvidenceError(
                    f"{source} has NaN or Inf in every sample; with `nan_policy='skip'` nothing is "
                    f"left. Clean the data before running mmdiag."
                )
            self._index = keep

    def _convert(self, item: Any) -> dict[str, torch.Tensor]:
        flat = flatten_item(item, source=self.source)
        out: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            if m not in flat:
                raise EvidenceError(
                    f"An item of {self.source} has no input {m!r} (it has "
                    f"{', '.join(map(repr, flat))}); expected every item to hold the same "
                    f"modalities."
                )
            out[m] = _as_input_tensor(flat[m])
        out["label"] = _label_tensor(flat["label"], self.source)
        for k in EXTRA_KEYS:
            if k in flat:
                out[k] = torch.as_tensor(flat[k])
        return out

    def _nonfinite(self, item: Mapping[str, torch.Tensor]) -> str | None:
        for m in self.modalities:
            if not bool(torch.isfinite(item[m]).all()):
                return m
        return None

    def __len__(self) -> int:
        return len(self._index) if self._index is not None else len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = self._index[i] if self._index is not None else i
        item = self._convert(call_user(getitem, f"reading item {j} of {self.source}", self.dataset, j))
        bad = self._nonfinite(item)
        if bad is not None:
            raise EvidenceError(
                f"Sample {j} of {self.source} has NaN or Inf in input {bad!r}; expected finite "
                f"numbers. Clean the data, or use `nan_policy='skip'` to drop those samples."
            )
        return item

    @property
    def labels(self) -> np.ndarray:
        """Every label (int64). Read from ``.labels``/``.targets`` of the wrapped dataset when it
        has them, else by reading every item once (then cached)."""
        if self._labels is None:
            found = None
            for attr in ("labels", "targets"):
                v = getattr(self.dataset, attr, None)
                if v is not None and self._index is None:
                    try:
                        arr = np.asarray(v)
                    except Exception:
                        continue
                    if arr.ndim == 1 and len(arr) == len(self.dataset) and arr.dtype.kind in "iub":
                        found = arr.astype(np.int64)
                        break
            if found is None:
                found = np.array(
                    [int(self[i]["label"]) for i in range(len(self))], dtype=np.int64
                )
            self._labels = found
        return self._labels

    @property
    def n_classes(self) -> int:
        """``num_classes`` if given, else max label + 1 (reads :attr:`labels`)."""
        if self._num_classes is not None:
            return int(self._num_classes)
        labels = self.labels
        return int(labels.max()) + 1 if len(labels) else 0

    def __repr__(self) -> str:
        return f"DictDataset({len(self)} samples from {self.source}; modalities {self.modalities})"


def _from_factory(
    spec: str,
    modalities: Sequence[str] | None,
    kwargs: dict | None,
    nan_policy: str,
    num_classes: int | None,
) -> tuple[Any, tuple[str, ...]]:
    factory, obj = call_factory(spec, kwargs, "dataset", "a torch Dataset or DataLoader")
    name = _callable_name(factory, spec)
    source = f"the dataset from {spec!r}"
    if isinstance(obj, Mapping):
        ds = dataset_from_arrays(
            obj, modalities, nan_policy, num_classes=num_classes, source=source
        )
        return ds, ds.modalities
    if isinstance(obj, DataLoader):
        if nan_policy == "skip":
            raise ConfigError(
                f"{name} returned a DataLoader, from which mmdiag cannot drop samples, but "
                f"`nan_policy='skip'` was asked for. Return the Dataset instead (mmdiag batches it), "
                f"or clean the data and use `nan_policy='error'`."
            )
        try:
            first = next(iter(obj))
        except StopIteration:
            raise EvidenceError(
                f"{source} is empty: its DataLoader yields no batches; expected at least one. "
                f"Check the split and the dataset's length."
            ) from None
        except Exception as e:
            raise LoadError(
                f"Reading the first batch of {source} raised {type(e).__name__}{user_location(e)}: {e}. "
                f"Check that iterating the DataLoader works on its own."
            ) from e
        flat = flatten_item(first, source=source)
        return obj, _check_first_item(flat, modalities, source, batched=True)
    if isinstance(obj, IterableDataset) or not (
        hasattr(obj, "__getitem__") and hasattr(obj, "__len__")
    ):
        raise ConfigError(
            f"{name} returned a {type(obj).__name__}; expected a map-style torch Dataset (with "
            f"__len__ and __getitem__), a DataLoader, or a dict of arrays. Wrap an iterable "
            f"dataset in a DataLoader."
        )
    try:
        n = len(obj)
    except Exception as e:
        raise LoadError(f"len() of {source} raised {type(e).__name__}{user_location(e)}: {e}.") from e
    if n == 0:
        raise EvidenceError(
            f"{source} is empty (len() is 0); expected at least one sample. Check the split and "
            f"the paths the dataset reads."
        )
    try:
        first = obj[0]
    except Exception as e:
        raise LoadError(
            f"Reading item 0 of {source} raised {type(e).__name__}{user_location(e)}: {e}. Check that "
            f"indexing the dataset works on its own."
        ) from e
    chosen = _check_first_item(flatten_item(first, source=source), modalities, source, batched=False)
    return (
        DictDataset(obj, chosen, nan_policy=nan_policy, num_classes=num_classes, source=source),
        chosen,
    )


def load_dataset(
    spec: str,
    modalities: Sequence[str] | None = None,
    *,
    kwargs: dict | None = None,
    nan_policy: str = "error",
    num_classes: int | None = None,
) -> tuple[Dataset | DataLoader, tuple[str, ...]]:
    """Load the data named by ``spec`` and return it with its modality names.

    ``spec`` is a ``.npz`` file, a ``.pt`` file (dict of tensors), or a factory
    ``"file.py:name"`` / ``"package.module:name"`` called with ``kwargs`` that returns a Dataset,
    a DataLoader (returned unchanged) or a dict of arrays. Files come back as an
    :class:`ArrayDataset`, factory datasets as a :class:`DictDataset`.
    """
    _check_nan_policy(nan_policy)
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(
            f"Expected a data spec (a .npz or .pt file, or 'file.py:factory'), found {spec!r}."
        )
    spec = spec.strip()
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".npz", ".pt", ".pth"):
        if not path.is_file():
            raise LoadError(
                f"Data file {path} {'is a folder' if path.is_dir() else 'does not exist'} (looked "
                f"in {path.resolve()}). Expected a {suffix} file; check the path given as `data`."
            )
        if kwargs:
            raise ConfigError(
                f"Keyword arguments were given for the data file {path}, but only dataset "
                f"factories ('file.py:name') take them. Drop them or use a factory."
            )
        arrays = _load_npz(path) if suffix == ".npz" else _load_pt_data(path)
        ds = dataset_from_arrays(
            arrays, modalities, nan_policy, num_classes=num_classes, source=str(path)
        )
        return ds, ds.modalities
    if ":" in spec and not path.is_file():
        return _from_factory(spec, modalities, kwargs, nan_policy, num_classes)
    if path.exists():
        raise ConfigError(
            f"Data {path} is a {'folder' if path.is_dir() else repr(suffix or 'file without extension')}"
            f"; expected a .npz file, a .pt file holding a dict of tensors, or a dataset factory "
            f"'file.py:name'. Convert the data to .npz (np.savez) or write a factory."
        )
    raise LoadError(
        f"Data {spec!r} was not found: expected a .npz or .pt file, or a dataset factory like "
        f"'data.py:make_dataset' (with a colon). Check the path given as `data`."
    )
