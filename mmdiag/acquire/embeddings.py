"""Per-modality gradient embeddings (BADGE's embedding, split by modality).

BADGE (Ash et al., ICLR 2020) embeds a sample by the gradient of the cross-entropy at the model's
own prediction ŷ with respect to the last layer's weights: g = (p − onehot(ŷ)) ⊗ h, h the
last layer's input. How mmdiag splits it by modality depends on the model (``method``):

* ``head_split`` (exact): the fusion head is one ``nn.Linear`` over the concatenated pooled
  encoder features [h_1; …; h_M], so its weight gradient splits into column blocks
  g_m = (p − onehot(ŷ)) ⊗ h_m, and sum_m ||g_m||² = ||g||² (BMMAL's split, methods.md §17.6).
* ``feature_gradient`` (any other fusion, encoders known): the head's weight gradient has no
  per-modality blocks, so mmdiag embeds modality m by the gradient of the same loss with respect
  to m's encoder output, g_m = ∂CE(z, ŷ)/∂h_m (pooled like the features). For a concat-linear head
  this would be W_mᵀ(p − onehot(ŷ)), a projection of BADGE's block. A change of method: warned.
* ``readout_gradient`` (black box, no encoders): g_m = softmax(z_m) − onehot(ŷ), the gradient of
  the cross-entropy at ŷ with respect to modality m's readout logits z_m (the others masked at the
  input). A change of method: warned.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdiag.collect.head_split import concat_head
from mmdiag.tensors import first_tensor, map_tensors

HEAD_SPLIT = "head_split"
FEATURE_GRADIENT = "feature_gradient"
READOUT_GRADIENT = "readout_gradient"


def choose_method(adapter: Any, sample: Mapping[str, Tensor]) -> tuple[str, str | None]:
    """(method, warning or None) for ``adapter`` after its :meth:`verify` on ``sample``."""
    if not adapter.has_encoders:
        return READOUT_GRADIENT, (
            "the gradient embeddings are not BADGE's: the model is driven as a black box, so each "
            "modality is embedded by the gradient of the cross-entropy at the predicted label with "
            "respect to its own readout's logits (softmax(z_m) - onehot(y_hat), the other modalities "
            "masked at the input). Name the encoders (`encoders={MODALITY: MODULE}`) for BADGE's embedding."
        )
    found = concat_head(adapter, sample)
    if not isinstance(found, str):
        return HEAD_SPLIT, None
    return FEATURE_GRADIENT, (
        f"the gradient embeddings are not BADGE's exact per-modality split: {found}, so the head's "
        "weight gradient has no block per modality. Each modality is embedded by the gradient of the "
        "cross-entropy at the predicted label with respect to its encoder output (pooled like the "
        "features). Name a Linear head over the concatenated features (`head`) if the model has one."
    )


def embed_batch(adapter: Any, method: str, inputs: Mapping[str, Tensor], logits: Tensor,
                feats: Mapping[str, Any] | None, readouts: Mapping[str, Tensor]) -> list[Tensor]:
    """[B, D_m] embedding of each modality for one batch (see the module docstring).

    ``logits``: the fused logits; ``feats``: the encoder outputs (None for a black box);
    ``readouts``: modality -> its m-only logits (used by ``readout_gradient``).
    """
    probs = torch.softmax(logits.double(), dim=1)
    onehot = F.one_hot(probs.argmax(dim=1), probs.shape[1]).double()
    residual = probs - onehot
    if method == READOUT_GRADIENT:
        return [torch.softmax(readouts[m].double(), dim=1) - onehot for m in adapter.modalities]
    assert feats is not None
    if method == HEAD_SPLIT:
        return [(residual[:, :, None] * adapter.pooled(m, feats[m]).double()[:, None, :]).flatten(1)
                for m in adapter.modalities]
    with torch.enable_grad():
        leaves = {m: map_tensors(lambda t: t.detach().float().requires_grad_(True), feats[m]) for m in adapter.modalities}
        z = adapter.head_forward(inputs, leaves).float()
        loss = F.cross_entropy(z, onehot.argmax(dim=1), reduction="sum")
        tensors = [first_tensor(leaves[m]) for m in adapter.modalities]
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [adapter.pooled(m, torch.zeros_like(t) if g is None else g).detach().double()
            for m, t, g in zip(adapter.modalities, tensors, grads)]
