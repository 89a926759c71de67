"""Datasets from data files and user factories, with their checks (in-memory arrays: :mod:`mmdiag.loading.arrays`)."""

from __future__ import annotations

from operator import getitem
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from mmdiag.errors import ConfigError, EvidenceError, LoadError, call_user, user_location
from mmdiag.loading.arrays import (EXTRA_KEYS, _RESERVED_KEYS, _as_input_tensor, _check_nan_policy, _plural, collate,
                                   dataset_from_arrays)
from mmdiag.loading.checkpoints import _first_line, _quiet, _weights_only_refusal
from mmdiag.loading.models import _callable_name, call_factory
from mmdiag.registry import closest


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
