"""analyze under two gloo processes: evidence sharded, gathered, equal to one process's."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mmdiag.adapter import ModelAdapter
from mmdiag.collect import CollectSettings, collect
from mmdiag.evidence import merge_evidence
from mmdiag.loading import dataset_from_arrays
from tests.helpers.toys import DOMINANT, toy_split, trained_toy

KINDS = {"subsets", "features", "grad_x_act"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    from mmdiag.runtime import join, leave

    join("cpu")
    try:
        model = trained_toy(DOMINANT, 0)
        data = dataset_from_arrays(toy_split(DOMINANT, 0)[1])
        ev = collect(ModelAdapter(model, ("audio", "visual")), data, KINDS, CollectSettings(device="cpu", batch_size=50))
        if rank == 0:
            ev.save(out)
    finally:
        leave()


def _by_index(ev, tensor):
    order = torch.argsort(ev.index)
    return tensor[..., order, :] if tensor.dim() == 3 else tensor[order]


@pytest.mark.slow
def test_two_process_evidence_equals_single_process(tmp_path):
    out = str(tmp_path / "ev.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    from mmdiag.evidence import Evidence

    sharded = Evidence.load(out)
    single = collect(ModelAdapter(trained_toy(DOMINANT, 0), ("audio", "visual")),
                     dataset_from_arrays(toy_split(DOMINANT, 0)[1]), KINDS, CollectSettings(device="cpu", batch_size=50))
    assert sharded.meta["shards"] == 2 and sharded.n_samples == single.n_samples
    assert sorted(sharded.index.tolist()) == sorted(single.index.tolist())
    torch.testing.assert_close(_by_index(sharded, sharded.subsets), _by_index(single, single.subsets))
    torch.testing.assert_close(_by_index(sharded, sharded.labels), _by_index(single, single.labels))
    assert sharded.features["audio"].shape == single.features["audio"].shape
    # the gradient subsample (fraction, floor and cap split between the processes) has the same size
    assert sharded.grad_rows.numel() == single.grad_rows.numel() == 128
    assert sharded.meta["subsample_rows"]["grad"] == single.meta["subsample_rows"]["grad"] == 128


def test_merge_shifts_subsample_rows():
    from mmdiag.evidence import Evidence

    def part(n, seed):
        g = torch.Generator().manual_seed(seed)
        return Evidence(modalities=("a", "b"), n_classes=3, labels=torch.randint(0, 3, (n,), generator=g),
                        logits=torch.randn(n, 3, generator=g), index=torch.arange(n) + 100 * seed,
                        features={"a": torch.randn(2, 4), "b": torch.randn(2, 4)}, feature_rows=torch.tensor([0, n - 1]))

    merged = merge_evidence([part(5, 1), part(3, 2)])
    assert merged.n_samples == 8
    assert merged.feature_rows.tolist() == [0, 4, 5, 7]
    assert torch.equal(merged.labels[merged.feature_rows][2:], part(3, 2).labels[[0, 2]])
