"""The `mean` and `noise` masks use the data's statistics, never a silent zero.

References are computed by hand: the per-element mean of the rows, and a manual forward with the
absent modality replaced by it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmdiag.adapter import ModelAdapter
from mmdiag.errors import EvidenceError
from mmdiag.examples_data.synthetic import ToyNet
from mmdiag.fixes import FIXES
from mmdiag.runtime.mask_stats import MomentSums
from mmdiag.train import evaluate, fit
from tests.helpers.toys import DOMINANT, toy_split, trained_toy

MODS = ("audio", "visual")


def _inputs(data: dict, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    return {m: torch.as_tensor(np.asarray(data[m][rows]), dtype=torch.float32) for m in MODS}


@pytest.mark.parametrize("mask_at", ["input", "feature"])
def test_a_mean_mask_without_statistics_refuses_instead_of_zeros(mask_at: str) -> None:
    _, val = toy_split(DOMINANT)
    adapter = ModelAdapter(trained_toy(DOMINANT), MODS, mask="mean", mask_at=mask_at)
    with pytest.raises(EvidenceError, match="estimate_mask_stats"):
        adapter.subset_logits(_inputs(val, slice(0, 8)), ["audio"])


def test_moment_sums_match_numpy() -> None:
    x = np.random.default_rng(0).normal(size=(50, 3, 4))
    sums = MomentSums()
    sums.add({"a": torch.as_tensor(x[:20])}, 20)
    sums.add({"a": torch.as_tensor(x[20:])}, 30)
    stats = sums.stats()
    np.testing.assert_allclose(stats.mean["a"].numpy(), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.std["a"].numpy(), x.std(0), rtol=1e-5)
    assert sums.overall_std()["a"] == pytest.approx(float(x.std()), rel=1e-9)


def test_evaluate_with_a_mean_mask_uses_the_mean_of_the_evaluated_rows() -> None:
    _, val = toy_split(DOMINANT)
    model = trained_toy(DOMINANT)
    adapter = ModelAdapter(model, MODS, mask="mean", mask_at="input")
    got = evaluate(adapter, val, batch_size=64)
    x = _inputs(val)
    labels = torch.as_tensor(np.asarray(val["label"]))
    model.eval()
    with torch.no_grad():
        for m, other in (("audio", "visual"), ("visual", "audio")):
            masked = {m: x[m], other: x[other].mean(0, keepdim=True).expand_as(x[other])}
            want = float((model(masked).argmax(1) == labels).float().mean())
            assert got[f"unimodal_acc.{m}"] == pytest.approx(want)


def test_training_with_a_mean_mask_masks_with_the_training_rows_feature_means() -> None:
    """With one epoch (and no validation, which estimates on its own data), the statistics are those
    of the starting model's encoders on the training rows."""
    train, _ = toy_split(DOMINANT)
    torch.manual_seed(0)
    model = ToyNet(list(MODS))
    start = copy.deepcopy(model).eval()
    adapter = ModelAdapter(model, MODS, mask="mean", mask_at="feature")
    fit(adapter, train, fix=FIXES.get("modality_dropout")(), epochs=1, batch_size=32, lr=0.05)
    x = _inputs(train)
    with torch.no_grad():
        for m in MODS:
            want = start.encoders[m](x[m]).double().mean(0).float()
            torch.testing.assert_close(adapter.feature_stats.mean[m], want, rtol=1e-5, atol=1e-6)
