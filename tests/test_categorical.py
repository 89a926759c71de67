"""Integer (categorical) modalities: token ids fed to nn.Embedding beside a dense modality.

Masking at the input fills them with a stated index, udml corrupts them by replacing indices with
observed values, and Integrated Gradients attributes them at the encoder outputs (skipped, with the
reason, for a black box).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

import mmdiag
from mmdiag.adapter import ModelAdapter
from mmdiag.categorical import add_donors, corrupt_categorical, corruption_rate, is_categorical
from mmdiag.collect import CollectSettings, collect
from mmdiag.errors import ConfigError
from mmdiag.evidence import mask_of
from mmdiag.loading import dataset_from_arrays

# the black-box models here warn that they are black boxes: that is the point
pytestmark = pytest.mark.filterwarnings("ignore:the encoders were not found by name")

VOCAB, T, DENSE, CLASSES = 24, 6, 6, 3
ENCODERS = {"tokens": "tokens_enc", "dense": "dense_enc"}
FAST = CollectSettings(device="cpu", batch_size=128, max_noise_samples=120, max_attribution_samples=32,
                       stats_samples=256)


class TokenEncoder(nn.Module):
    """Embeds [B, T] token ids and mean-pools them over T."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.emb(tokens).mean(1)


class CatNet(nn.Module):
    """Token and dense encoders, concatenated, then a small non-linear head.

    ``named=False`` gives the encoders names that contain no modality name (a black box to mmdiag).
    """

    def __init__(self, named: bool = True) -> None:
        super().__init__()
        self.names = ("tokens_enc", "dense_enc") if named else ("left", "right")
        setattr(self, self.names[0], TokenEncoder())
        setattr(self, self.names[1], nn.Sequential(nn.Linear(DENSE, 8), nn.ReLU()))
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, CLASSES))

    def forward(self, tokens: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        t = getattr(self, self.names[0])(tokens)
        d = getattr(self, self.names[1])(dense)
        return self.head(torch.cat([t, d], dim=1))


@functools.lru_cache(maxsize=None)
def cat_data(n: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    # a row's tokens come mostly from its class's own range (like topic words in a document)
    topical = 1 + 7 * y[:, None] + torch.randint(0, 7, (n, T), generator=g)
    tokens = torch.where(torch.rand(n, T, generator=g) < 0.6, topical, torch.randint(1, VOCAB, (n, T), generator=g))
    dense = torch.randn(n, DENSE, generator=g) + 0.6 * nn.functional.one_hot(y, DENSE).float()
    return {"tokens": tokens.numpy(), "dense": dense.numpy(), "label": y.numpy()}


@functools.lru_cache(maxsize=None)
def trained(named: bool = True) -> CatNet:
    torch.manual_seed(0)
    model = CatNet(named)
    d = cat_data()
    x, v, y = torch.as_tensor(d["tokens"]), torch.as_tensor(d["dense"]), torch.as_tensor(d["label"])
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(80):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x, v), y).backward()
        opt.step()
    return model.eval()


def errors_of(report) -> list:
    return [f for f in report.failures if f.kind == "error"]


# ---------------------------------------------------------------- the corruption helper
def test_corruption_rate_is_clean_at_level_one_grows_and_stays_capped():
    rates = [corruption_rate(level, 0.2) for level in range(1, 12)]
    assert rates[0] == 0.0
    assert all(b > a for a, b in zip(rates, rates[1:]))
    assert all(0.0 <= r <= 1.0 for r in rates)
    # the rate that keeps as much signal as Gaussian noise of std f: 1 - 1/sqrt(1 + f^2)
    assert rates[5] == pytest.approx(1 - 1 / math.sqrt(2))
    assert corruption_rate(1000, 0.2) <= 1.0


def test_corrupted_fraction_is_near_the_rate_and_replacements_are_observed_values():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 1000, (4000, 5), generator=g)
    donors = torch.randint(2000, 3000, (500, 5), generator=g)  # values disjoint from x: every change shows
    for rate in (0.1, 0.4, 0.9):
        out = corrupt_categorical(x, rate, torch.Generator().manual_seed(0), donors)
        changed = out != x
        assert abs(changed.float().mean().item() - rate) < 0.02
        for col in range(x.shape[1]):  # drawn from the values observed at the same position
            allowed = set(donors[:, col].tolist())
            assert set(out[changed[:, col], col].tolist()) <= allowed
    # donors default to the rows themselves: replacements are values seen at that position
    per_column = torch.arange(5).repeat(300, 1) * 10 + torch.randint(0, 2, (300, 5), generator=g)
    out = corrupt_categorical(per_column, 0.7, torch.Generator().manual_seed(0))
    assert set((out // 10 - torch.arange(5)).unique().tolist()) == {0}
    assert out.dtype == per_column.dtype


def test_level_one_unchanged_and_deterministic_under_a_seed():
    x = torch.randint(0, 50, (64, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(corrupt_categorical(x, corruption_rate(1, 0.2), torch.Generator().manual_seed(0)), x)
    a = corrupt_categorical(x, 0.5, torch.Generator().manual_seed(3))
    b = corrupt_categorical(x, 0.5, torch.Generator().manual_seed(3))
    c = corrupt_categorical(x, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_donor_pool_caps_and_restarts_on_a_new_shape():
    pool = add_donors(None, torch.zeros(5, 3, dtype=torch.long), cap=8)
    pool = add_donors(pool, torch.ones(5, 3, dtype=torch.long), cap=8)
    assert pool.shape == (8, 3) and int(pool.sum()) == 9
    assert add_donors(pool, torch.ones(4, 3, dtype=torch.long), cap=8) is pool
    assert add_donors(pool, torch.ones(2, 4, dtype=torch.long), cap=8).shape == (2, 4)
    assert is_categorical(pool) and not is_categorical(pool.float())


# ---------------------------------------------------------------- end to end
def test_default_suite_runs_on_a_categorical_modality_with_encoders():
    report = mmdiag.analyze(trained(), cat_data(), modalities=["tokens", "dense"], encoders=ENCODERS,
                            bootstrap=50, collect_settings=FAST)
    assert not errors_of(report), report.failures
    assert {"udml", "attribution"} <= set(report.diagnostics), report.failures
    notes = " ".join(report.settings["adapter"]["notes"])
    assert "categorical corruption" in notes and "encoder outputs" in notes
    # the corruption shows in the token encoder's features, weakly: a replaced token is another
    # plausible token, so only the mix of topics in a row gives it away (dense: about 0.5)
    assert report.diagnostics["udml"].details["spearman"]["tokens"] > 0.1
    shares = report.diagnostics["attribution"].per_modality
    assert sum(shares.values()) == pytest.approx(1.0) and shares["tokens"] > 0


class TupleTokens(nn.Module):
    """A token encoder returning two tensors (mean and max over T), both read by the head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.emb(tokens)
        return e.mean(1), e.amax(1)


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens_enc, self.dense_enc = TupleTokens(), nn.Linear(DENSE, 8)
        self.head = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, CLASSES))

    def forward(self, tokens: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        mean, peak = self.tokens_enc(tokens)
        return self.head(torch.cat([mean, peak, self.dense_enc(dense)], dim=1))


@pytest.mark.parametrize("mask_at,mask,net", [("input", "zero", "cat"), ("feature", "zero", "cat"),
                                              ("feature", "mean", "cat"), ("input", "zero", "tuple")])
def test_attribution_at_encoder_outputs_is_complete(mask_at, mask, net):
    """Sum of the layer attributions = f_y(x) - f_y(baseline) up to the stored delta, with the
    baseline's logits those of the all-absent subset (subsets[0])."""
    torch.manual_seed(0)
    model = trained() if net == "cat" else TupleNet().eval()
    adapter = ModelAdapter(model, ("tokens", "dense"), encoders=dict(ENCODERS), mask_at=mask_at, mask=mask)
    ev = collect(adapter, dataset_from_arrays(cat_data()), {"attribution", "subsets"}, FAST)
    assert ev.attribution is not None and "attribution" not in ev.meta["unavailable"]
    rows = ev.attribution_rows.long()
    y = ev.labels[rows][:, None]
    gap = (ev.logits[rows].double().gather(1, y) - ev.subsets[0][rows].double().gather(1, y))[:, 0]
    total = ev.attribution_signed.double().sum(1)
    torch.testing.assert_close((total - gap).abs(), ev.attribution_delta.double(), atol=1e-4, rtol=1e-3)
    assert float((total - gap).abs().sum() / gap.abs().sum()) < 0.05
    assert (ev.attribution.double() >= ev.attribution_signed.double().abs() - 1e-6).all()


def test_black_box_skips_attribution_with_the_reason_and_never_errors():
    report = mmdiag.analyze(trained(named=False), cat_data(), modalities=["tokens", "dense"], mask_at="input",
                            bootstrap=50, collect_settings=FAST)
    assert not errors_of(report), report.failures
    failures = {f.diagnostic: f for f in report.failures}
    assert failures["attribution"].kind == "skipped"
    reason = failures["attribution"].error
    assert "integer inputs cannot be attributed at the input" in reason and "`encoders={MODALITY: MODULE}`" in reason
    assert failures["udml"].kind == "skipped"  # noise features need the encoders of a black box too
    assert "filled with index 0" in " ".join(report.settings["adapter"]["notes"])


def test_udml_with_input_masking_uses_categorical_corruption():
    adapter = ModelAdapter(trained(), ("tokens", "dense"), encoders=dict(ENCODERS), mask_at="input")
    ev = collect(adapter, dataset_from_arrays(cat_data()), {"noise_features", "attribution"}, FAST)
    assert ev.noise_features is not None and ev.attribution is not None, ev.meta["unavailable"]
    tokens = ev.noise_features["tokens"]  # [L, rows, d]
    drift = (tokens - tokens[:1]).abs().mean(dim=(1, 2))
    assert drift[0] == 0 and (drift[1:] > 0).all() and drift[-1] > drift[1]
    again = collect(ModelAdapter(trained(), ("tokens", "dense"), encoders=dict(ENCODERS), mask_at="input"),
                    dataset_from_arrays(cat_data()), {"noise_features"}, FAST)
    torch.testing.assert_close(again.noise_features["tokens"], tokens, rtol=0, atol=0)


@pytest.mark.parametrize("mask", ["mean", "noise"])
def test_mean_or_noise_mask_at_the_input_is_refused(mask):
    with pytest.raises(ConfigError, match=r"integer modalities are masked at the input with an index.*`mask='zero'`"):
        mmdiag.analyze(trained(named=False), cat_data(), modalities=["tokens", "dense"], mask=mask,
                       only=["unimodal"], bootstrap=20, collect_settings=FAST)
    with pytest.raises(ConfigError, match=r"'tokens'.*index 0"):
        mmdiag.analyze(trained(), cat_data(), modalities=["tokens", "dense"], encoders=ENCODERS, mask=mask,
                       mask_at="input", only=["unimodal"], bootstrap=20, collect_settings=FAST)


def test_feature_level_masking_takes_any_mask():
    report = mmdiag.analyze(trained(), cat_data(), modalities=["tokens", "dense"], encoders=ENCODERS, mask="mean",
                            only=["unimodal"], bootstrap=20, collect_settings=FAST)
    assert "unimodal" in report.diagnostics and not report.failures


@pytest.mark.parametrize("index", [0, 3])
def test_unimodal_accuracy_matches_a_manual_forward_with_the_mask_index(index):
    model, data = trained(named=False), cat_data()
    report, ev = mmdiag.analyze(model, data, modalities=["tokens", "dense"], mask_at="input", mask_index=index,
                                only=["unimodal"], bootstrap=20, collect_settings=FAST, return_evidence=True)
    tokens, dense = torch.as_tensor(data["tokens"]), torch.as_tensor(data["dense"])
    with torch.no_grad():
        manual = model(torch.full_like(tokens, index), dense)
    order = ev.index.long()
    # equal up to float32 rounding: the pass evaluates in batches, the manual forward all rows at once, and
    # a matrix product's summation order depends on the batch shape (differences of a few ulp on logits ~5)
    torch.testing.assert_close(ev.subsets[mask_of(["dense"], ev.modalities)], manual[order], atol=1e-5, rtol=1e-6)
    accuracy = float((manual.argmax(1) == torch.as_tensor(data["label"])).double().mean())
    assert report.diagnostics["unimodal"].per_modality["dense"] == pytest.approx(accuracy, abs=1e-6)
    assert f"filled with index {index}" in " ".join(report.settings["adapter"]["notes"])


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_mask_index_must_be_a_non_negative_integer(bad):
    with pytest.raises(ConfigError, match="mask index"):
        ModelAdapter(trained(), ("tokens", "dense"), mask_index=bad)
