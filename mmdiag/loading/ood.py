"""New data to score for distribution shift (``ood_data``): the same formats as the evaluation data,
labels optional, known out-of-distribution flags kept beside the inputs.

The ``ood`` diagnostic needs no labels of the new data (its scores compare features with the
reference data's class prototypes), so a dict of arrays or a data file may leave out ``label``.
Flags the data may carry, one 0/1 value per sample: ``is_ood`` (every modality; ``ood``, the
evaluation data's name for it, is read the same way) and ``is_ood_<modality>`` (that modality only,
taking precedence over ``is_ood`` for it). A dataset factory that returns a Dataset gives its items
as for the evaluation data (a ``label`` entry, any integer for unlabelled data) with an optional
per-sample ``ood`` flag.

Rows are identified by their position in the data (``Evidence.ood_rows``); the labels the model
pass sees are placeholders, so that unlabelled or single-class new data passes the pass's checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmdiag.errors import ConfigError, EvidenceError
from mmdiag.loading.arrays import LABEL_KEYS, _to_numpy, dataset_from_arrays
from mmdiag.loading.data import _load_npz, _load_pt_data, flatten_item, load_dataset
from mmdiag.registry import closest

__all__ = ["FLAG", "NewData", "load_new_data"]

#: the flag array that marks a sample out of distribution in every modality
FLAG = "is_ood"


@dataclass(frozen=True)
class NewData:
    """New data ready for the model pass.

    Attributes:
        dataset: a Dataset (placeholder labels, ``index`` = row position) or the user's DataLoader.
        flags: modality -> [n] bool known flags by row position, for the modalities that have any;
            None when the data carries none (a Dataset's per-item ``ood`` flags arrive with the pass).
        labelled: whether the data had labels (they are not used).
        source: where the data came from, for messages.
    """

    dataset: Any
    flags: dict[str, np.ndarray] | None
    labelled: bool
    source: str


class _PlaceholderLabels(Dataset):
    """Items of ``dataset`` with the label replaced by ``i % 2`` (never read: the scores need none)."""

    def __init__(self, dataset: Any, source: str) -> None:
        self.dataset, self.source = dataset, source

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        raw = self.dataset[i]
        item = dict(raw) if _unlabelled(raw) else flatten_item(raw, source=self.source)
        item["label"] = torch.tensor(i % 2, dtype=torch.int64)
        return item


def _unlabelled(item: Any) -> bool:
    return isinstance(item, Mapping) and not any(k in item for k in LABEL_KEYS)


def _flag(value: Any, key: str, n: int, source: str) -> np.ndarray:
    arr = _to_numpy(value, key, source)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or arr.shape[0] != n or not np.isin(arr, (0, 1)).all():
        raise EvidenceError(
            f"Array {key!r} in {source} must hold one 0/1 flag per sample ({n} samples); found shape "
            f"{tuple(arr.shape)}" + ("" if np.isin(arr, (0, 1)).all() else " with values other than 0 and 1")
            + ". Save a boolean vector marking the out-of-distribution samples.")
    return arr.astype(bool)


def split_flags(arrays: Mapping[str, Any], modalities: Sequence[str],
                source: str) -> tuple[dict[str, Any], dict[str, np.ndarray] | None, bool]:
    """(arrays for the dataset, flags per modality or None, whether labels were given).

    Takes ``is_ood``/``ood`` and ``is_ood_<modality>`` out of ``arrays``, adds placeholder labels
    when there are none and sets ``index`` to the row positions (the flags' order).
    """
    rest = {str(k): v for k, v in arrays.items()}
    mods = list(modalities)
    missing = [m for m in mods if m not in rest]
    if missing:
        raise ConfigError(f"The new data ({source}) has no modality {', '.join(map(repr, missing))}; it needs the "
                          f"evaluation data's modalities {', '.join(mods)}.")
    n = int(_to_numpy(rest[mods[0]], mods[0], source).shape[0])
    common = [k for k in (FLAG, "ood") if k in rest]
    if len(common) > 1:
        raise EvidenceError(f"{source} has both 'is_ood' and 'ood'; keep one flag array for every modality.")
    every = _flag(rest.pop(common[0]), common[0], n, source) if common else None
    flags = {m: every for m in mods} if every is not None else {}
    for key in [k for k in rest if k.startswith(FLAG + "_")]:
        m = key[len(FLAG) + 1:]
        if m not in mods:
            near = closest(m, mods)
            raise ConfigError(f"{source} has flags {key!r}, but {m!r} is not a modality; per-modality flags are "
                              f"named is_ood_<modality> with modalities {', '.join(mods)}."
                              + (f" Did you mean 'is_ood_{near}'?" if near else ""))
        flags[m] = _flag(rest.pop(key), key, n, source)
    labelled = any(k in rest for k in LABEL_KEYS)
    if not labelled:
        rest["label"] = np.zeros(n, dtype=np.int64)
    rest["index"] = np.arange(n, dtype=np.int64)  # the position of each row: the flags' order
    return rest, (flags or None), labelled


def _read(spec: str) -> Mapping[str, Any] | None:
    """The arrays of a .npz/.pt data file, or None for a dataset factory spec."""
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".pt", ".pth"):
        return None
    if not path.is_file():
        raise ConfigError(f"The new data file {path} does not exist; check the path given as `ood_data`.")
    return _load_npz(path) if suffix == ".npz" else _load_pt_data(path)


def load_new_data(data: Any, modalities: Sequence[str], *, nan_policy: str = "error",
                  kwargs: dict | None = None) -> NewData:
    """New data (``ood_data``) from a file or factory spec, a dict of arrays, a Dataset or a DataLoader.

    Labels are optional for arrays and files; flags are split off as the module doc says.
    """
    if isinstance(data, NewData):
        return data
    source = "the new data (`ood_data`)"
    arrays: Mapping[str, Any] | None = data if isinstance(data, Mapping) else None
    if isinstance(data, str):
        source = f"the new data {data}"
        arrays = _read(data.strip())
        if arrays is None:
            data, _ = load_dataset(data, list(modalities), kwargs=kwargs, nan_policy=nan_policy)
    if arrays is not None:
        rest, flags, labelled = split_flags(arrays, modalities, source)
        ds = dataset_from_arrays(rest, list(modalities), nan_policy, source=source)
        return NewData(_PlaceholderLabels(ds, source), flags, labelled, source)
    if isinstance(data, DataLoader):
        return NewData(data, None, True, source)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ConfigError(f"{source} is empty; expected at least one sample.")
        return NewData(_PlaceholderLabels(data, source), None, True, source)
    raise ConfigError(f"{source} must be a data file, a dataset factory, a dict of arrays, a Dataset or a "
                      f"DataLoader; found {type(data).__name__}.")
