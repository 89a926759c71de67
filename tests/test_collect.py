"""collect: evidence equals brute-force masking, leaves the model untouched, handles bad data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmdiag.adapter import ModelAdapter
from mmdiag.collect import CollectSettings, collect, subsample_size
from mmdiag.errors import ConfigError, EvidenceError
from mmdiag.evidence import members
from mmdiag.loading import dataset_from_arrays
from mmdiag.examples_data.synthetic import ToyNet, make_toy
from tests.helpers.toys import ALL_KINDS, toy_split, trained_toy

CPU = dict(device="cpu", batch_size=64, max_attribution_samples=16, max_noise_samples=32, ig_steps=8)


def _setup(m_count=2, n=150):
    strength = (3.0, 0.8) if m_count == 2 else tuple([2.0] + [1.0] * (m_count - 1))
    model = trained_toy(strength)
    test = toy_split(strength)[1]
    test = {k: v[:n] for k, v in test.items()}
    return model, test, [k for k in test if k != "label"]


def test_subset_logits_match_brute_force_masking():
    model, test, names = _setup(3)
    ev = collect(ModelAdapter(model, tuple(names)), dataset_from_arrays(test), {"subsets"}, CollectSettings(**CPU))
    x = {m: torch.as_tensor(test[m])[ev.index] for m in names}
    torch.testing.assert_close(ev.labels, torch.as_tensor(test["label"])[ev.index])
    with torch.no_grad():
        feats = {m: model.encoders[m](x[m]) for m in names}
        for mask in range(1 << 3):
            present = members(mask, names)
            cat = torch.cat([feats[m] if m in present else torch.zeros_like(feats[m]) for m in names], 1)
            torch.testing.assert_close(ev.subsets[mask], model.head(cat), atol=1e-5, rtol=1e-5)


def test_head_split_readout_relation():
    """R2 (feature zero-masking) = R1 (head split) + b (M-1)/M for a linear concat head."""
    model, test, names = _setup(2)
    ev = collect(ModelAdapter(model, tuple(names)), dataset_from_arrays(test), {"subsets"}, CollectSettings(**CPU))
    assert ev.head_split is not None and ev.meta["head_split"]
    b = model.head.bias.detach()
    for j, m in enumerate(names):
        torch.testing.assert_close(ev.subset_logits([m]), ev.head_split[j] + b / 2, atol=1e-5, rtol=1e-5)


def test_model_is_left_untouched():
    model, test, names = _setup(2)
    model = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = collect(ModelAdapter(model, tuple(names)), dataset_from_arrays(test), set(ALL_KINDS), CollectSettings(**CPU))
    assert ev.grad_x_act is not None and ev.grad_cosine is not None and ev.attribution is not None
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks and not mod._backward_hooks
    assert type(model.encoders["audio"]).__name__ == "Sequential"


def test_grad_x_act_matches_autograd_by_hand():
    model, test, names = _setup(2, n=20)
    ev = collect(ModelAdapter(model, tuple(names)), dataset_from_arrays(test), {"grad_x_act"}, CollectSettings(**CPU))
    x = {m: torch.as_tensor(test[m])[ev.index[ev.grad_rows]] for m in names}
    y = ev.labels[ev.grad_rows]
    for column, target in (("grad_x_act", "margin"), ("grad_x_loss", "loss")):
        feats = {m: model.encoders[m](x[m]).detach().requires_grad_(True) for m in names}
        z = model.head(torch.cat([feats[m] for m in names], 1))
        if target == "loss":
            torch.nn.functional.cross_entropy(z, y, reduction="sum").backward()
        else:
            for i in range(len(y)):  # z_y - mean_k z_k, one row at a time
                (z[i, y[i]] - z[i].mean()).backward(retain_graph=True)
        for j, m in enumerate(names):
            ref = (feats[m].grad * feats[m]).sum(1).abs()
            torch.testing.assert_close(getattr(ev, column)[:, j], ref, atol=1e-5, rtol=1e-4)


def test_rows_are_shuffled_and_mapped_back():
    data = make_toy(n=100, strength=(1, 1))
    data["label"] = np.sort(data["label"])  # a label-sorted file
    model = ToyNet(["audio", "visual"]).eval()
    ev = collect(ModelAdapter(model, ("audio", "visual")), dataset_from_arrays(data), {"subsets"}, CollectSettings(**CPU))
    assert sorted(ev.index.tolist()) == list(range(100))
    assert not torch.equal(ev.index, torch.arange(100))
    assert torch.equal(ev.labels, torch.as_tensor(data["label"])[ev.index])


def test_same_seed_same_evidence_different_seed_different_order():
    model, test, names = _setup(2)
    ds = dataset_from_arrays(test)
    a = collect(ModelAdapter(model, tuple(names)), ds, {"subsets", "permutations"}, CollectSettings(**CPU))
    b = collect(ModelAdapter(model, tuple(names)), ds, {"subsets", "permutations"}, CollectSettings(**CPU))
    c = collect(ModelAdapter(model, tuple(names)), ds, {"subsets"}, CollectSettings(**{**CPU, "seed": 5}))
    assert torch.equal(a.subsets, b.subsets) and torch.equal(a.perm_correct, b.perm_correct)
    assert not torch.equal(a.index, c.index)


def test_nan_logits_and_label_range_are_evidence_errors():
    class NanNet(ToyNet):
        def forward(self, inputs):
            return super().forward(inputs) * float("nan")

    data = make_toy(n=20, strength=(1, 1))
    with pytest.raises(EvidenceError, match="NaN or Inf logits for 20 of"):
        collect(ModelAdapter(NanNet(["audio", "visual"]), ("audio", "visual")), dataset_from_arrays(data),
                {"subsets"}, CollectSettings(**CPU))
    data["label"][0] = 9
    with pytest.raises(EvidenceError, match="Labels go up to 9"):
        collect(ModelAdapter(ToyNet(["audio", "visual"]), ("audio", "visual")), dataset_from_arrays(data),
                {"subsets"}, CollectSettings(**CPU))


def test_too_many_subsets_refused_unless_allowed():
    names = [f"m{j}" for j in range(9)]
    data = make_toy(n=8, strength=[1.0] * 9, modalities=names)
    ad = ModelAdapter(ToyNet(names), tuple(names))
    with pytest.raises(ConfigError, match="512 subsets.*`max_subsets`"):
        collect(ad, dataset_from_arrays(data), {"subsets"}, CollectSettings(**CPU))
    ev = collect(ad, dataset_from_arrays(data), {"subsets"}, CollectSettings(**{**CPU, "max_subsets": 512}))
    assert ev.subsets.shape[0] == 512


def test_black_box_skips_encoder_kinds_with_reason():
    class Blob(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(16, 4)

        def forward(self, a, v):
            return self.net(torch.cat([a, v], 1))

    data = make_toy(n=30, strength=(1, 1))
    ev = collect(ModelAdapter(Blob(), ("audio", "visual"), call="positional"), dataset_from_arrays(data),
                 {"subsets", "features"}, CollectSettings(**CPU))
    reason = ev.meta["unavailable"]["features"]
    assert ev.features is None and "black box" in reason and "not found by name" in reason
    assert any("black box" in w for w in ev.meta["warnings"])
    assert ev.subsets is not None


def test_evidence_save_load_round_trip(tmp_path):
    model, test, names = _setup(2)
    ev = collect(ModelAdapter(model, tuple(names)), dataset_from_arrays(test), {"subsets", "features"}, CollectSettings(**CPU))
    ev.save(tmp_path / "ev.pt")
    back = type(ev).load(tmp_path / "ev.pt")
    assert torch.equal(back.subsets, ev.subsets) and back.modalities == ev.modalities
    assert torch.equal(back.features["audio"], ev.features["audio"])


# ------------------------------------------------------------------------------------ subsample sizes
def test_subsample_size_is_a_fraction_between_floor_and_cap():
    assert subsample_size(1000, 2048, 0.25, 256) == 256      # the floor
    assert subsample_size(5000, 2048, 0.25, 256) == 1250     # the fraction (ceil)
    assert subsample_size(5001, 2048, 0.25, 256) == 1251
    assert subsample_size(100_000, 2048, 0.25, 256) == 2048  # the cap
    assert subsample_size(100, 16, 0.25, 256) == 16          # a cap below the floor wins
    assert subsample_size(None, 300, 0.25, 256) == 300       # unknown N: the cap
    assert subsample_size(1000, 300, 1.0, 256) == 300        # fraction 1: the cap alone
    for bad in ({"grad_fraction": 0.0}, {"attribution_fraction": 1.5}, {"param_grad_fraction": -0.1}, {"noise_fraction": 0.0},
                {"ig_max_steps": 4},
                {"ig_tolerance": -0.1}):
        with pytest.raises(ConfigError):
            CollectSettings(**bad)


def test_gradient_and_attribution_subsamples_follow_the_fractions():
    model, test, names = _setup(2, n=400)
    settings = CollectSettings(device="cpu", batch_size=128, grad_fraction=0.75, attribution_fraction=0.2,
                               max_attribution_samples=50, ig_steps=8)
    ev = collect(ModelAdapter(model, tuple(names)), dataset_from_arrays(test),
                 {"grad_x_act", "param_grads", "attribution"}, settings)
    assert ev.grad_rows.numel() == 300 and ev.attribution_rows.numel() == 50  # 0.75 x 400; 0.2 x 400 capped at 50
    # parameter gradients: 400 / 32 = 13 rows, raised to the floor of 80
    assert ev.meta["subsample_rows"] == {"grad": 300, "param_grad": 80, "attribution": 50}
    assert int(ev.grad_batch_sizes.sum()) == 80 and ev.grad_cosine.shape == (ev.grad_batch_sizes.numel(), 2)
    assert len(set(ev.grad_rows.tolist())) == 300
    # 80 rows need all four batches, so they are spread over them: a pick from the feature-gradient
    # rows' permutation (slices of 16 rows in a subset of the batches: tests/test_param_grad_slices.py)
    from mmdiag.collect import pick as _pick

    assert _pick(400, 80, 12) <= _pick(400, 300, 12)
    wide = collect(ModelAdapter(model, tuple(names)), dataset_from_arrays(test), {"param_grads"},
                   CollectSettings(device="cpu", batch_size=128, grad_fraction=0.75, param_grad_fraction=0.5))
    assert int(wide.grad_batch_sizes.sum()) == 200 and wide.meta["subsample_rows"]["param_grad"] == 200
    capped = collect(ModelAdapter(model, tuple(names)), dataset_from_arrays(test), {"param_grads"},
                     CollectSettings(device="cpu", batch_size=128, grad_fraction=0.25, param_grad_fraction=0.5))
    assert int(capped.grad_batch_sizes.sum()) == 128  # never more than the feature-gradient rows (0.25 x 400 -> floor 128)


class SharpNet(torch.nn.Module):
    """Logits with a steep sigmoid along the IG path: a few Gauss-Legendre steps miss the jump."""

    def forward(self, inputs):
        s = torch.sigmoid(40 * (inputs["audio"].sum(1) - 1.0)) + torch.tanh(inputs["visual"].sum(1))
        return torch.stack([s, -s], dim=1)


def _sharp_data(n=40):
    rng = np.random.default_rng(0)
    return {"audio": rng.uniform(0, 0.6, size=(n, 4)).astype(np.float32),
            "visual": rng.normal(size=(n, 3)).astype(np.float32), "label": rng.integers(0, 2, n)}


def test_integrated_gradients_refines_unconverged_rows_only():
    from captum.attr import IntegratedGradients

    data = _sharp_data()
    adapter = ModelAdapter(SharpNet(), ("audio", "visual"))
    base = dict(device="cpu", batch_size=64, max_attribution_samples=40, attribution_fraction=1.0, ig_steps=8)
    fixed = collect(adapter, dataset_from_arrays(data), {"attribution"}, CollectSettings(**base, ig_max_steps=8))
    adaptive = collect(adapter, dataset_from_arrays(data), {"attribution"}, CollectSettings(**base, ig_max_steps=512))
    assert fixed.meta["ig_steps_used"] == {"8": 40}
    used = adaptive.meta["ig_steps_used"]
    assert used.get("8", 0) > 0 and sum(v for k, v in used.items() if k != "8") > 0  # some rows refined, not all
    assert sum(used.values()) == 40
    # every row meets the tolerance against its own gap (or the batch median gap), the fixed run did not
    gap = (adaptive.attribution_signed.sum(1) - adaptive.attribution_delta).abs()
    scale = torch.maximum(gap, gap.median())
    assert bool((adaptive.attribution_delta <= 0.05 * scale + 1e-6).all())
    assert float(fixed.attribution_delta.max()) > 0.05 * float(scale.max())
    # each row equals a direct captum call at the steps that row ended with
    x = {m: torch.as_tensor(data[m])[adaptive.index] for m in ("audio", "visual")}
    y = torch.as_tensor(data["label"])[adaptive.index]
    ig = IntegratedGradients(lambda a, v: SharpNet()({"audio": a, "visual": v}))
    matched = torch.zeros(40, dtype=torch.long)
    for steps in (8, 32, 128, 512):
        attrs = ig.attribute((x["audio"], x["visual"]), target=y, n_steps=steps,
                             baselines=(torch.zeros_like(x["audio"]), torch.zeros_like(x["visual"])))
        signed = torch.stack([t.flatten(1).sum(1) for t in attrs], 1)
        mass = torch.stack([t.abs().flatten(1).sum(1) for t in attrs], 1)
        same = ((adaptive.attribution_signed - signed).abs() <= 1e-5 + 1e-4 * signed.abs()).all(1)
        same &= ((adaptive.attribution - mass).abs() <= 1e-5 + 1e-4 * mass).all(1)
        matched[same & (matched == 0)] = steps
    assert bool((matched > 0).all())
    assert {str(k): v for k, v in zip(*(t.tolist() for t in torch.unique(matched, return_counts=True)))} == used


# ------------------------------------------------------------------------------------ noise features
class ScaledToy(torch.nn.Module):
    """A ToyNet that rescales the audio input before its encoder (so the encoder cannot run alone)."""

    def __init__(self, toy):
        super().__init__()
        self.encoders, self.head = toy.encoders, toy.head

    def forward(self, inputs):
        return self.head(torch.cat([self.encoders["audio"](2.0 * inputs["audio"]),
                                    self.encoders["visual"](inputs["visual"])], dim=1))


@pytest.mark.parametrize("scaled", [False, True])
def test_noise_features_match_full_forwards_on_the_corrupted_inputs(monkeypatch, scaled):
    from mmdiag.collect import noise

    model, test, names = _setup(2, n=300)
    model = ScaledToy(model) if scaled else model
    adapter = ModelAdapter(model, tuple(names))
    calls = []
    corruption, corrupted = noise.NoiseProducer.corruption, noise.NoiseProducer.corrupted_features

    def record_corruption(self, m, x, level):
        calls[-1]["noisy"][level] = out = corruption(self, m, x, level)
        return out

    def record_features(self, m, inputs, feats):
        calls.append({"m": m, "inputs": inputs, "noisy": {}, "alone": self.alone[m]})
        calls[-1]["out"] = out = corrupted(self, m, inputs, feats)
        return out

    monkeypatch.setattr(noise.NoiseProducer, "corruption", record_corruption)
    monkeypatch.setattr(noise.NoiseProducer, "corrupted_features", record_features)
    ev = collect(adapter, dataset_from_arrays(test), {"noise_features"},
                 CollectSettings(device="cpu", batch_size=64, noise_levels=(1, 3, 6)))
    # 300 / 128 rows is under the floor: the floor's rows, at most every row
    assert ev.meta["subsample_rows"]["noise"] == min(noise.NOISE_FLOOR, 300) == ev.noise_rows.numel()
    assert {c["m"]: c["alone"] for c in calls} == {"audio": not scaled, "visual": True}
    for c in calls:
        for j, level in enumerate((1, 3, 6)):
            x = dict(c["inputs"])
            if level != 1:
                x[c["m"]] = c["noisy"][level]
            with torch.no_grad(), adapter.capture() as captured:
                adapter.call_model(x)
            torch.testing.assert_close(c["out"][j], captured[c["m"]].float(), rtol=1e-5, atol=1e-6)
    wide = collect(ModelAdapter(model, tuple(names)), dataset_from_arrays(test), {"noise_features"},
                   CollectSettings(device="cpu", batch_size=64, noise_fraction=0.8, noise_levels=(1, 2)))
    expected = min(max(noise.NOISE_FLOOR, 240), 300)  # the fraction's 0.8 x 300 rows, raised to the floor, within N
    assert wide.noise_rows.numel() == expected and len(set(wide.noise_rows.tolist())) == expected


def test_feature_gradients_sum_over_every_tensor_of_a_structured_output():
    from mmdiag.collect.gradients import feature_gradients

    class Enc(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            seq = self.lin(x)
            return seq, seq.tanh()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.text_model = Enc(torch.nn.Linear(4, 6))
            self.image_net = torch.nn.Linear(5, 6)
            self.head = torch.nn.Linear(12, 3)

        def forward(self, batch):
            _, pooled = self.text_model(batch["text"])
            return self.head(torch.cat([pooled, self.image_net(batch["image"])], 1))

    model = Net().eval()
    inputs = {"text": torch.randn(10, 4), "image": torch.randn(10, 5)}
    labels = torch.randint(0, 3, (10,))
    adapter = ModelAdapter(model, ("text", "image"), call="dict",
                           encoders={"text": "text_model", "image": "image_net"})
    adapter.verify(inputs)
    got = feature_gradients(adapter, inputs, labels)["grad_x_act"]
    # by hand: the head reads the pooled tensor only, so text's term is |d margin / d pooled . pooled|
    _, pooled = model.text_model(inputs["text"])
    pooled = pooled.detach().requires_grad_(True)
    image = model.image_net(inputs["image"]).detach().requires_grad_(True)
    z = model.head(torch.cat([pooled, image], 1))
    margin = (z.gather(1, labels[:, None])[:, 0] - z.mean(1)).sum()
    g_text, g_image = torch.autograd.grad(margin, [pooled, image])
    expected = torch.stack([(g_text * pooled).sum(1).abs(), (g_image * image).sum(1).abs()], 1)
    assert torch.allclose(got, expected.detach(), atol=1e-6) and bool((got[:, 0] > 0).all())
