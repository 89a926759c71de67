"""mmdiag.runtime.batching: the one dataset coercer and the one batch splitter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mmdiag.errors import ConfigError, EvidenceError
from mmdiag.loading import ArrayDataset
from mmdiag.runtime.batching import Batches, as_dataset, split_batch


def _arrays(n: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"audio": rng.normal(size=(n, 3)).astype(np.float32), "visual": rng.normal(size=(n, 2)).astype(np.float32),
            "label": np.arange(n) % 3, "index": np.arange(n)}


class Items:
    """A plain indexable collection of dict items (no torch Dataset base class)."""

    def __init__(self, ds: ArrayDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.ds[i]


def test_as_dataset_accepts_arrays_datasets_and_loaders() -> None:
    ds = as_dataset(_arrays(), ["visual", "audio"])
    assert isinstance(ds, ArrayDataset) and ds.modalities == ("visual", "audio") and len(ds) == 6
    assert as_dataset(ds) is ds
    items = Items(ds)
    assert as_dataset(items, what="training data", loaders=False) is items
    loader = DataLoader(ds, batch_size=2)
    assert as_dataset(loader) is loader
    with pytest.raises(ConfigError, match="training data.*cannot be resumed"):
        as_dataset(loader, what="training data", loaders=False)
    with pytest.raises(ConfigError, match="The validation data is empty"):
        as_dataset([], what="validation data")
    with pytest.raises(ConfigError, match="found int"):
        as_dataset(3)
    with pytest.raises(ConfigError, match="Unknown modality 'vidoe'.*the training data"):
        as_dataset(_arrays(), ["audio", "vidoe"], what="training data")


def test_split_batch_reads_both_item_shapes() -> None:
    batch = {"audio": torch.ones(2, 3), "visual": torch.zeros(2, 2), "labels": torch.tensor([1, 2]),
             "index": torch.tensor([5, 6])}
    inputs, labels, extras = split_batch(batch, ("audio", "visual"))
    assert list(inputs) == ["audio", "visual"] and labels.dtype == torch.long and labels.tolist() == [1, 2]
    assert extras["index"].tolist() == [5, 6] and "labels" not in inputs
    pair = ({"audio": torch.ones(2, 3), "visual": torch.zeros(2, 2)}, torch.tensor([[0], [1]]))
    assert split_batch(pair, ("audio", "visual"))[1].tolist() == [0, 1]


@pytest.mark.parametrize("batch, match", [
    ({"audio": torch.ones(2, 3), "visual": torch.ones(2, 2)}, "no 'label'"),
    ([torch.ones(2, 3), torch.ones(2)], "is a list"),
    ({"audio": torch.ones(2, 3), "label": torch.tensor([0, 1])}, "no modality 'visual'"),
    ({"audio": torch.ones(2, 3), "visual": torch.ones(2, 2), "label": torch.eye(2)}, "one-hot"),
])
def test_split_batch_says_what_is_wrong(batch, match: str) -> None:
    with pytest.raises(EvidenceError, match=match):
        split_batch(batch, ("audio", "visual"))


def test_batches_fast_path_matches_the_item_path() -> None:
    ds = as_dataset(_arrays())
    rows = [4, 0, 3]
    fast = Batches(ds, ("audio", "visual"), torch.device("cpu")).get(rows)
    slow = Batches(Items(ds), ("audio", "visual"), torch.device("cpu")).get(rows)
    for (a, b) in ((fast[0]["audio"], slow[0]["audio"]), (fast[0]["visual"], slow[0]["visual"]), (fast[1], slow[1])):
        assert torch.equal(a, b)
    assert fast[0]["audio"].dtype == torch.float32 and fast[1].tolist() == [1, 0, 0]
