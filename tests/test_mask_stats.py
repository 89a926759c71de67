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
from mmdiag.errors import EvidenceError, MmdiagWarning
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


class _AudioEncoder(torch.nn.Module):
    """Returns a (pooled, sequence) tuple, as many library encoders do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        return h, torch.stack([h, 2 * h + 1], dim=1)


class _VisualEncoder(torch.nn.Module):
    """Returns a dict, like a Hugging Face model output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pooler_output": self.lin(x) - 3.0}


class _Structured(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.audio, self.visual = _AudioEncoder(), _VisualEncoder()
        self.head = torch.nn.Linear(12, 3)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled, seq = self.audio(batch["audio"])
        v = self.visual(batch["visual"])
        return self.head(torch.cat([pooled, seq.mean(1), v["pooler_output"]], dim=1))


def _structured_model() -> _Structured:
    return _Structured().eval()


def test_mean_mask_has_one_statistic_per_tensor_of_a_structured_encoder_output() -> None:
    """A tuple- or dict-valued encoder output gets the per-element mean of each of its tensors
    (by hand: the mean over the rows of each tensor), and the masked logits are the model's with
    those means in place."""
    from mmdiag.runtime.mask_stats import estimate_mask_stats

    g = torch.Generator().manual_seed(3)
    inputs = {"audio": torch.randn(40, 6, generator=g), "visual": torch.randn(40, 5, generator=g)}
    model = _structured_model()
    adapter = ModelAdapter(model, MODS, call="dict", encoders={"audio": "audio", "visual": "visual"}, mask="mean")
    estimate_mask_stats(adapter, [inputs], max_rows=40)
    with torch.no_grad():
        pooled, seq = model.audio(inputs["audio"])
        visual = model.visual(inputs["visual"])
        _, feats = adapter.encode(inputs)
        masked = adapter.masked_features(feats, ["visual"])
        got = adapter.subset_logits(inputs, ["visual"])
        by_hand = model.head(torch.cat([pooled.mean(0).expand_as(pooled), seq.mean(0).expand_as(seq).mean(1),
                                        visual["pooler_output"]], dim=1))
    torch.testing.assert_close(masked["audio"][0], pooled.mean(0).expand_as(pooled), rtol=0, atol=1e-6)
    torch.testing.assert_close(masked["audio"][1], seq.mean(0).expand_as(seq), rtol=0, atol=1e-6)
    assert masked["visual"] is feats["visual"]
    torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-5)
    masked_visual = adapter.masked_features(feats, ["audio"])["visual"]
    torch.testing.assert_close(masked_visual["pooler_output"],
                               visual["pooler_output"].mean(0).expand_as(visual["pooler_output"]), rtol=0, atol=1e-6)


def test_noise_mask_runs_the_subset_diagnostics_on_structured_encoder_outputs() -> None:
    import mmdiag
    from mmdiag.loading import dataset_from_arrays

    g = np.random.default_rng(0)
    arrays = {"audio": g.normal(size=(120, 6)).astype(np.float32), "visual": g.normal(size=(120, 5)).astype(np.float32),
              "label": g.integers(0, 3, 120)}
    with pytest.warns(MmdiagWarning, match="chance"):  # an untrained model: the run says so
        report = mmdiag.analyze(_structured_model(), dataset_from_arrays(arrays, list(MODS)), call="dict",
                                encoders={"audio": "audio", "visual": "visual"}, mask="noise", bootstrap=20,
                                only=["shapley", "unimodal", "combinations"])
    assert not report.failures and {"shapley", "unimodal", "combinations"} <= set(report.diagnostics)
