"""User data in, tensors out: one dataset coercer and one batch splitter for every entry point.

:func:`as_dataset` turns what a user passes (a Dataset, a DataLoader, a dict of arrays) into
something a loader can read; :func:`split_batch` turns one collated batch into (inputs, labels,
extras); :class:`Batches` fetches the batch of given row indices for a training loop that chooses
its own order (and so can resume at a row).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mmdiag.errors import ConfigError, EvidenceError
from mmdiag.loading.arrays import EXTRA_KEYS, LABEL_KEYS, MULTI_LABEL, collate, dataset_from_arrays

__all__ = ["Batches", "as_dataset", "split_batch"]


def as_dataset(data: Any, modalities: Sequence[str] | None = None, nan_policy: str = "error", *,
               what: str = "data", loaders: bool = True) -> Dataset | DataLoader:
    """Accept a Dataset, a DataLoader, or a mapping of arrays (modalities plus ``label``).

    Args:
        data: a Dataset, a DataLoader (when ``loaders``), any sized indexable collection of items,
            or a dict of per-sample arrays (validated by :func:`~mmdiag.loading.dataset_from_arrays`).
        modalities: the modality keys of a dict of arrays (default: every key but labels and extras).
        nan_policy: "error" or "skip", for a dict of arrays.
        what: what the data is, in messages ("training data").
        loaders: whether a DataLoader is accepted as it is. Training refuses one: its order cannot
            be replayed, so a resumed run could not continue exactly.

    Raises:
        ConfigError: the data is none of these, is empty, or is a DataLoader where none is accepted.
    """
    if isinstance(data, Mapping):
        return dataset_from_arrays(data, modalities, nan_policy=nan_policy, source=f"the {what}")
    if isinstance(data, DataLoader):
        if loaders:
            return data
    elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if hasattr(data, "__len__") and len(data) == 0:
            raise ConfigError(f"The {what} is empty; expected at least one sample.")
        return data  # type: ignore[return-value]
    kinds = "a torch Dataset, a DataLoader" if loaders else "a map-style Dataset of dict items"
    hint = "" if loaders else " A DataLoader cannot be resumed exactly: pass its dataset."
    raise ConfigError(
        f"The {what} must be {kinds} or a dict of arrays with a 'label' entry; found "
        f"{type(data).__name__}.{hint}"
    )


def split_batch(batch: Any, modalities: Sequence[str]) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
    """(inputs, labels, extras) from a batch that is a dict with 'label' or a (dict, labels) pair.

    Inputs keep their dtype; labels come back as a 1-D ``long`` tensor; extras are the per-sample
    ``ood`` and ``index`` entries the batch carries. Raises :class:`EvidenceError` for any other
    shape, a missing label or modality, and one-hot or multi-label rows.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Mapping):
        items, labels = dict(batch[0]), batch[1]
    elif isinstance(batch, Mapping):
        items = dict(batch)
        key = next((k for k in LABEL_KEYS if k in items), None)
        if key is None:
            raise EvidenceError(
                f"A data batch has keys {sorted(items)} but no 'label'; items must be (dict, label) "
                "pairs or dicts with a 'label' key."
            )
        labels = items.pop(key)
    else:
        raise EvidenceError(
            f"A data batch is a {type(batch).__name__}; expected (dict_of_tensors, labels) or a dict "
            "with modality tensors and 'label'."
        )
    missing = [m for m in modalities if m not in items]
    if missing:
        raise EvidenceError(
            f"The data has no modality {', '.join(map(repr, missing))}; its keys are "
            f"{sorted(k for k in items if k not in EXTRA_KEYS)}. Check `modalities`."
        )
    inputs = {m: torch.as_tensor(items[m]) for m in modalities}
    extras = {k: torch.as_tensor(items[k]) for k in EXTRA_KEYS if k in items}
    labels = torch.as_tensor(labels)
    if labels.dim() == 2 and labels.shape[1] > 1:
        # one-hot or multi-hot rows: reshape(-1) would silently make B x C labels of them
        raise EvidenceError(MULTI_LABEL.format(what="A batch's labels", shape=tuple(labels.shape))
                            if bool((labels.sum(1) != 1).any()) else
                            f"A batch's labels have shape {tuple(labels.shape)} (one-hot); expected one "
                            "class index per sample. Return label.argmax() from the dataset instead.")
    return inputs, labels.long().reshape(-1), extras


class Batches:
    """Fetches batches of given row indices (fast path for in-memory array datasets)."""

    def __init__(self, dataset: Dataset, modalities: Sequence[str], device: torch.device) -> None:
        self.dataset = dataset
        self.modalities = tuple(modalities)
        self.device = device
        tensors = getattr(dataset, "tensors", None)
        self._tensors: dict[str, Tensor] | None = tensors() if callable(tensors) else None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def get(self, idx: Sequence[int]) -> tuple[dict[str, Tensor], Tensor]:
        """The batch of rows ``idx``: (modality -> float32 inputs, long labels) on the device."""
        if self._tensors is not None:
            rows = torch.as_tensor(list(idx), dtype=torch.long)
            batch = {k: v[rows] for k, v in self._tensors.items() if k in self.modalities or k in LABEL_KEYS}
        else:
            batch = collate([self.dataset[int(i)] for i in idx])
        inputs, labels, _ = split_batch(batch, self.modalities)
        inputs = {m: t.to(device=self.device, dtype=torch.float32) for m, t in inputs.items()}
        return inputs, labels.to(self.device)
