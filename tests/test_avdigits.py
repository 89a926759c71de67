"""Tests of the embedded AV-digits dataset, its loader and the demo model."""

from __future__ import annotations

import itertools
from importlib import resources

import numpy as np
import pytest
import torch

from mmdiag.examples_data.avdigits import VIEWS, load_avdigits, split_indices
from mmdiag.examples_data.demo_model import AVDigitsNet, train_plain
from mmdiag.errors import ConfigError

N = 1797


def test_shapes_dtypes_and_labels():
    d = load_avdigits(views=VIEWS)
    assert set(d) == {"audio", "visual", "top", "bottom", "label"}
    assert d["audio"].shape == (N, 1, 20, 20) and d["audio"].dtype == np.float32
    assert d["visual"].shape == (N, 1, 8, 8) and d["visual"].dtype == np.float32
    assert d["top"].shape == (N, 1, 4, 8) and d["top"].dtype == np.float32
    assert d["bottom"].shape == (N, 1, 4, 8) and d["bottom"].dtype == np.float32
    assert d["label"].shape == (N,) and d["label"].dtype == np.int64
    assert set(np.unique(d["label"]).tolist()) == set(range(10))
    assert np.bincount(d["label"]).min() >= 170
    assert d["visual"].min() == 0.0 and d["visual"].max() == 1.0
    for v in d.values():
        assert np.isfinite(v).all()


def test_clean_audio_is_standardised():
    a = load_avdigits(views=("audio",))["audio"]
    assert abs(float(a.mean())) < 1e-3
    assert abs(float(a.std()) - 1.0) < 1e-3


def test_default_views_and_selection():
    assert set(load_avdigits()) == {"audio", "visual", "label"}
    assert set(load_avdigits(views=("top", "bottom"))) == {"top", "bottom", "label"}


def test_unknown_or_empty_view_is_rejected():
    with pytest.raises(ConfigError):
        load_avdigits(views=("audio", "video"))
    with pytest.raises(ConfigError):
        load_avdigits(views=())
    with pytest.raises(ConfigError):
        load_avdigits(snr_db=float("nan"))


def test_halves_are_exactly_the_image_rows():
    d = load_avdigits(views=("visual", "top", "bottom"))
    np.testing.assert_array_equal(d["top"], d["visual"][:, :, :4, :])
    np.testing.assert_array_equal(d["bottom"], d["visual"][:, :, 4:, :])
    np.testing.assert_array_equal(np.concatenate([d["top"], d["bottom"]], axis=2), d["visual"])


def test_returned_arrays_are_independent_copies():
    d = load_avdigits(views=VIEWS)
    for k in d:
        d[k][...] = 0
    again = load_avdigits(views=VIEWS)
    assert again["visual"].max() == 1.0 and again["label"].max() == 9
    assert np.abs(again["audio"]).max() > 0


def test_noise_is_deterministic_per_seed():
    a = load_avdigits(snr_db=-5.0, seed=3, views=("audio",))["audio"]
    b = load_avdigits(snr_db=-5.0, seed=3, views=("audio",))["audio"]
    c = load_avdigits(snr_db=-5.0, seed=4, views=("audio",))["audio"]
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01


def test_noise_does_not_touch_images_or_labels():
    clean = load_avdigits(views=VIEWS)
    noisy = load_avdigits(snr_db=-10.0, seed=1, views=VIEWS)
    for k in ("visual", "top", "bottom", "label"):
        np.testing.assert_array_equal(clean[k], noisy[k])


def test_distortion_grows_as_snr_falls():
    clean = load_avdigits(views=("audio",))["audio"]
    diffs = [
        float(np.abs(load_avdigits(snr_db=s, seed=0, views=("audio",))["audio"] - clean).mean())
        for s in (10.0, -5.0, -10.0, -15.0)
    ]
    assert all(lo < hi for lo, hi in itertools.pairwise(diffs)), diffs
    assert diffs[0] > 0


def test_very_high_snr_is_close_to_clean():
    clean = load_avdigits(views=("audio",))["audio"]
    noisy = load_avdigits(snr_db=60.0, views=("audio",))["audio"]
    # Only the silent padding (at the log floor) sees the faint noise at all.
    assert float(np.abs(noisy - clean).mean()) < 0.05


def test_shipped_file_is_small():
    ref = resources.files("mmdiag.examples_data").joinpath("data", "avdigits.npz")
    with resources.as_file(ref) as path:
        assert path.stat().st_size < 3_000_000


def test_provenance_arrays_are_shipped():
    ref = resources.files("mmdiag.examples_data").joinpath("data", "avdigits.npz")
    with resources.as_file(ref) as path, np.load(path) as z:
        assert z["images"].dtype == np.uint8 and z["images"].max() == 16
        for k in ("voice_id", "variant_id", "speed", "pitch"):
            assert z[k].shape == (N,)
        assert len(z["words"]) == 10


def test_split_indices_partition_and_determinism():
    tr, va = split_indices(N, 0.3, seed=0)
    assert len(va) == round(N * 0.3) and len(tr) + len(va) == N
    assert np.intersect1d(tr, va).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(N))
    _, va2 = split_indices(N, 0.3, seed=0)
    np.testing.assert_array_equal(va, va2)
    _, va3 = split_indices(N, 0.3, seed=1)
    assert not np.array_equal(va, va3)
    with pytest.raises(ConfigError):
        split_indices(N, 1.0)
    with pytest.raises(ConfigError):
        split_indices(1)


def test_demo_model_shapes_and_structure():
    model = AVDigitsNet()
    d = load_avdigits()
    out = model(torch.as_tensor(d["audio"][:5]), torch.as_tensor(d["visual"][:5]))
    assert out.shape == (5, 10)
    assert model.fusion_head.in_features == 64 and model.fusion_head.out_features == 10
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.audio_net(torch.as_tensor(d["audio"][:5])).shape == (5, 32)
    assert model.visual_net(torch.as_tensor(d["visual"][:5])).shape == (5, 32)


def test_encoders_are_the_only_path_to_the_head():
    torch.manual_seed(0)
    model = AVDigitsNet().eval()
    d = load_avdigits()
    a, v = torch.as_tensor(d["audio"][:8]), torch.as_tensor(d["visual"][:8])

    def zero(mod, inp, out):
        return torch.zeros_like(out)

    h = model.audio_net.register_forward_hook(zero)
    with torch.no_grad():
        # With the audio feature zeroed, the audio input must not matter.
        np.testing.assert_array_equal(model(a, v).numpy(), model(torch.randn_like(a), v).numpy())
    h.remove()
    h = model.visual_net.register_forward_hook(zero)
    with torch.no_grad():
        np.testing.assert_array_equal(model(a, v).numpy(), model(a, torch.rand_like(v)).numpy())
    h.remove()


def test_train_plain_is_deterministic_and_learns():
    d = load_avdigits()
    tr, _ = split_indices(N, 0.3, seed=0)
    sub = {k: v[tr[:256]] for k, v in d.items()}
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = AVDigitsNet()
        runs.append(train_plain(model, sub, epochs=3, seed=0))
    assert runs[0] == runs[1]
    assert len(runs[0]) == 3 and runs[0][-1] < runs[0][0]
