"""ModelAdapter: call conventions, outputs, encoder discovery, masking levels, fallbacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmdiag.adapter import ModelAdapter, detect_call_style, find_encoders
from mmdiag.errors import AdapterError, ConfigError


class Enc(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4, bias=bias)

    def forward(self, x):
        return self.lin(x)


class Positional(nn.Module):
    """Research-code style: positional forward, encoders named audio_net / visual_net."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.audio_net = Enc(bias)
        self.visual_net = Enc(bias)
        self.fusion_head = nn.Linear(8, 5)

    def forward(self, a, v):
        return self.fusion_head(torch.cat([self.audio_net(a), self.visual_net(v)], dim=1))


class Keywords(Positional):
    def forward(self, visual, audio):  # order differs from the modality order on purpose
        return {"logits": super().forward(audio, visual), "aux": torch.zeros(1)}


class DictIn(Positional):
    def forward(self, batch):
        return (super().forward(batch["audio"], batch["visual"]), None)


def batch(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(n, 3, generator=g), "visual": torch.randn(n, 3, generator=g)}


MODS = ("audio", "visual")


@pytest.mark.parametrize("cls,style", [(Positional, "positional"), (Keywords, "kwargs"), (DictIn, "dict")])
def test_call_style_detected_and_logits_extracted(cls, style):
    torch.manual_seed(0)
    model = cls()
    if cls is Positional:
        # forward(a, v) matches none of the data's names: a positional call would be a guess
        with pytest.raises(ConfigError, match=r"audio, visual.*\(a, v\).*positional"):
            detect_call_style(model, MODS)
        ad = ModelAdapter(model, MODS, call="positional")
    else:
        assert detect_call_style(model, MODS) == style
        ad = ModelAdapter(model, MODS)
    x = batch()
    expected = Positional.forward(model, x["audio"], x["visual"])
    torch.testing.assert_close(ad.call_model(x), expected)


def test_call_override_wins_and_wrong_override_fails_clearly():
    model = Positional()
    ad = ModelAdapter(model, MODS, call="kwargs")
    with pytest.raises(AdapterError, match="called with kwargs inputs .*`call="):
        ad.call_model(batch())
    with pytest.raises(ConfigError, match="`call` must be one of"):
        ModelAdapter(model, MODS, call="banana")  # type: ignore[arg-type]


def test_wrong_output_shape_is_an_adapter_error():
    class Bad(Positional):
        def forward(self, a, v):
            return super().forward(a, v)[:3]

    with pytest.raises(AdapterError, match=r"expected \[batch=6, classes\]"):
        ModelAdapter(Bad(), MODS, call="positional").call_model(batch())


def test_encoders_found_by_name_and_head_detected():
    ad = ModelAdapter(Positional(), MODS, call="positional")
    assert ad.encoders == {"audio": "audio_net", "visual": "visual_net"}
    assert ad.head == "fusion_head" and ad.mask_at == "feature"
    assert find_encoders(Positional(), ("audio", "depth")) is None


def test_explicit_encoder_errors_name_the_problem():
    with pytest.raises(ConfigError, match="Did you mean 'audio_net'"):
        ModelAdapter(Positional(), MODS, call="positional", encoders={"audio": "audio_nett", "visual": "visual_net"})
    with pytest.raises(ConfigError, match="missing: visual"):
        ModelAdapter(Positional(), MODS, call="positional", encoders={"audio": "audio_net"})
    with pytest.raises(ConfigError, match="at least 2"):
        ModelAdapter(Positional(), ("audio",))


def test_black_box_model_masks_inputs():
    class Blob(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(6, 5)

        def forward(self, a, v):
            return self.net(torch.cat([a, v], 1))

    ad = ModelAdapter(Blob(), MODS, call="positional")
    assert ad.encoders is None and ad.mask_at == "input"
    with pytest.raises(ConfigError, match="`mask_at='feature'`"):
        ModelAdapter(Blob(), MODS, call="positional", mask_at="feature")


def test_feature_and_input_masking_agree_for_bias_free_linear_encoders():
    """Zero input through a bias-free linear encoder is a zero feature: both levels must agree."""
    torch.manual_seed(0)
    model = Positional(bias=False)
    x = batch()
    feat = ModelAdapter(model, MODS, call="positional", mask_at="feature")
    inp = ModelAdapter(model, MODS, call="positional", mask_at="input")
    for present in ([], ["audio"], ["visual"], ["audio", "visual"]):
        torch.testing.assert_close(feat.subset_logits(x, present), inp.subset_logits(x, present))


def test_feature_masking_equals_manual_zeroing_of_encoder_output():
    torch.manual_seed(1)
    model = Positional()
    x = batch()
    ad = ModelAdapter(model, MODS, call="positional")
    manual = model.fusion_head(torch.cat([model.audio_net(x["audio"]), torch.zeros(6, 4)], 1))
    torch.testing.assert_close(ad.subset_logits(x, ["audio"]), manual)
    assert isinstance(model.audio_net, Enc) and isinstance(model.visual_net, Enc)  # stubs removed


def test_stubs_are_removed_after_an_exception():
    model = Positional()
    ad = ModelAdapter(model, MODS, call="positional")
    with pytest.raises(RuntimeError):
        with ad._swapped({"audio": torch.zeros(2, 4)}):
            raise RuntimeError("boom")
    assert isinstance(model.audio_net, Enc)


def test_verify_falls_back_when_a_modality_bypasses_its_encoder():
    class Bypass(Positional):
        def forward(self, a, v):
            return super().forward(a, v) + a.sum(1, keepdim=True)

    ad = ModelAdapter(Bypass(), MODS, call="positional")
    ad.verify(batch())
    assert ad.mask_at == "input" and ad.encoders is None
    assert any("outside its encoder" in w and "input" in w for w in ad.warnings)


def test_mean_and_noise_masks_use_stats():
    ad = ModelAdapter(Positional(), MODS, call="positional", mask="mean", mask_at="input")
    ad.input_stats.mean["visual"] = torch.full((3,), 2.0)
    ad.input_stats.std["visual"] = torch.zeros(3)
    x = batch()
    masked = ad.masked_inputs(x, ["audio"])
    assert torch.equal(masked["visual"], torch.full((6, 3), 2.0))
    ad.mask = "noise"
    ad.input_stats.std["visual"] = torch.ones(3)
    g = torch.Generator().manual_seed(0)
    noisy = ad.masked_inputs(x, ["audio"], g)["visual"]
    assert noisy.std() > 0.3 and abs(noisy.mean() - 2.0) < 0.8


def test_integer_token_inputs_run_end_to_end():
    """A text-like modality of token ids (embedding encoder) next to a float modality."""
    import numpy as np

    import mmdiag

    class TextImage(nn.Module):
        def __init__(self):
            super().__init__()
            self.text_net = nn.EmbeddingBag(20, 8)
            self.image_net = nn.Linear(4, 8)
            self.head = nn.Linear(16, 3)

        def forward(self, text, image):
            return self.head(torch.cat([self.text_net(text), self.image_net(image)], 1))

    rng = np.random.default_rng(0)
    data = {"text": rng.integers(0, 20, size=(40, 5)), "image": rng.normal(size=(40, 4)).astype(np.float32),
            "label": rng.integers(0, 3, size=40)}
    # mean/noise masks of integer inputs are refused (tests/test_categorical.py): index 0 fills them
    for mask in ("zero",):
        report = mmdiag.analyze(TextImage(), data, mask=mask, mask_at="input", bootstrap=10,
                                only=["shapley", "reliance", "unimodal", "combinations"],
                                collect_settings=mmdiag.CollectSettings(device="cpu"))
        assert set(report.diagnostics) == {"shapley", "reliance", "unimodal", "combinations"}
        assert not report.failures
