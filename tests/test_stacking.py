"""Stacked fusion-head calls: the logits of one call at a time, in fewer calls, and one call at a
time whenever stacking would not be exact."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from mmdiag.adapter import ModelAdapter
from mmdiag.collect import CollectSettings, collect
from mmdiag.collect.stacking import StackedHead
from mmdiag.loading import dataset_from_arrays

MODS = ("audio", "visual")


class TwoTower(nn.Module):
    """Two encoders and a head; ``mix`` makes the head mix rows (centres over the batch),
    ``batch_from_inputs`` reshapes by the inputs' batch size, ``pair`` returns a (features, extra) tuple."""

    def __init__(self, mix: bool = False, batch_from_inputs: bool = False, pair: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.audio_net = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.visual_net = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
        self.mix, self.batch_from_inputs, self.pair = mix, batch_from_inputs, pair
        self.head_calls = 0

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.head_calls += 1
        a = self.audio_net(batch["audio"])
        v = self.visual_net(batch["visual"])
        h = torch.cat([a, v], dim=1)
        if self.batch_from_inputs:
            h = h.reshape(batch["audio"].shape[0], -1)
        if self.mix:
            h = h - h.mean(dim=0, keepdim=True)
        return self.head(h)


def _data(n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"audio": torch.randn(n, 6, generator=g), "visual": torch.randn(n, 5, generator=g)}


def _feature_sets(model: TwoTower, inputs: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    with torch.no_grad():
        feats = {"audio": model.audio_net(inputs["audio"]), "visual": model.visual_net(inputs["visual"])}
    g = torch.Generator().manual_seed(2)
    sets = [{**feats, "audio": torch.zeros_like(feats["audio"])}, {**feats, "visual": torch.zeros_like(feats["visual"])}]
    sets += [{**feats, m: feats[m][torch.randperm(64, generator=g)]} for m in MODS for _ in range(3)]
    return sets


def _one_at_a_time(adapter: ModelAdapter, inputs: dict[str, torch.Tensor], sets: list[dict[str, Any]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [adapter.head_forward(inputs, f) for f in sets]


def _twice(model: TwoTower) -> tuple[StackedHead, int, int]:
    """Two ``logits`` calls on eight feature sets; both must equal one call per set. Returns the
    head, the number of sets and the model's calls in the second (after the first checked stacking)."""
    adapter = ModelAdapter(model, MODS, call="dict", encoders={"audio": "audio_net", "visual": "visual_net"})
    inputs = _data()
    sets = _feature_sets(model, inputs)
    expected = _one_at_a_time(adapter, inputs, sets)
    head = StackedHead(adapter)
    with torch.no_grad():
        first = head.logits(inputs, sets)
        model.head_calls = 0
        second = head.logits(inputs, sets)
    for got in (first, second):
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
    return head, len(sets), model.head_calls


def test_a_row_wise_head_is_stacked_with_the_same_logits() -> None:
    head, _, calls = _twice(TwoTower().eval())
    assert head.exact is True and calls == 1  # eight feature sets, one call


def test_a_head_that_mixes_rows_is_called_one_set_at_a_time() -> None:
    for model in (TwoTower(mix=True).eval(), TwoTower(batch_from_inputs=True).eval()):
        head, n_sets, calls = _twice(model)
        assert head.exact is False and calls == n_sets


def test_evidence_is_the_same_with_and_without_stacking(monkeypatch: Any) -> None:
    """The subsets and permutations kinds from stacked calls equal, bit for bit, those from one call
    at a time (the generator's draws stay in the same order), with a ``noise`` mask that draws."""
    g = np.random.default_rng(0)
    n = 300  # four batches of 64 and a last one of 44: a second shape, checked again
    arrays = {"audio": g.normal(size=(n, 6)).astype(np.float32), "visual": g.normal(size=(n, 5)).astype(np.float32),
              "label": g.integers(0, 3, n)}
    model = TwoTower().eval()

    def run() -> Any:
        adapter = ModelAdapter(model, MODS, call="dict", encoders={"audio": "audio_net", "visual": "visual_net"},
                               mask="noise")
        return collect(adapter, dataset_from_arrays(arrays, list(MODS)), {"subsets", "permutations"},
                       CollectSettings(batch_size=64, device="cpu"))

    stacked = run()
    stacked_calls, model.head_calls = model.head_calls, 0
    monkeypatch.setattr(StackedHead, "logits", lambda self, inputs, sets: [self.adapter.head_forward(inputs, f) for f in sets])
    single = run()
    # one call per set: 3 subsets + 10 permutations = 13 head calls a batch; stacked: 2 (one per
    # kind), plus the 13 of the check on the first batch of each shape (64 rows, then 44)
    assert model.head_calls - stacked_calls == 5 * 13 - (2 * (13 + 2) + 3 * 2)
    assert torch.equal(stacked.subsets, single.subsets)
    assert torch.equal(stacked.perm_correct, single.perm_correct) and torch.equal(stacked.perm_nll, single.perm_nll)


class _RowCountHead:
    """An adapter stand-in whose head rounds differently when a call holds fewer than 8 rows (as a
    CPU matrix product may): stacking is exact for 16-row batches and not for 4-row ones."""

    def __init__(self) -> None:
        self.calls = 0

    def head_forward(self, inputs: Any, features: Any, rows: int | None = None) -> torch.Tensor:
        self.calls += 1
        x = features["a"]
        return x * (1.0 + 1e-6) if x.shape[0] < 8 else x.clone()


def test_a_batch_of_another_size_is_checked_again() -> None:
    adapter = _RowCountHead()
    head = StackedHead(adapter)

    def sets(rows: int) -> list[dict[str, torch.Tensor]]:
        return [{"a": torch.full((rows, 2), float(k))} for k in range(1, 4)]

    for rows, expected_exact in ((16, True), (16, True), (4, False), (4, False), (16, True)):
        adapter.calls = 0
        got = head.logits({}, sets(rows))
        singles = [adapter.head_forward({}, f) for f in sets(rows)]
        assert all(torch.equal(a, b) for a, b in zip(got, singles))  # always the bits of one call per set
        assert head.checked[(rows, 3)] is expected_exact
    assert head.exact is False  # not every shape stacks exactly
    adapter.calls = 0
    head.logits({}, sets(16))
    assert adapter.calls == 1  # the 16-row shape still goes in one call
