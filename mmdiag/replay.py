"""Is replaying cached encoder outputs exact for this model? Checked on a real batch.

Feature-level masking swaps each encoder for a stub that returns a cached (or masked) output. That
is exact only when each modality reaches the rest of the network through its encoder alone, each
encoder runs once per forward, and its output can be rebuilt with a modality masked. The adapter
asks :func:`replay_mismatch` before it trusts the replay, and falls back to input masking, saying
why, when the answer is a reason.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from mmdiag.pooling import infer_layout
from mmdiag.tensors import map_tensors, tensor_leaves, unsupported_container


def replay_mismatch(adapter: Any, inputs: Mapping[str, Tensor], atol: float) -> str | None:
    """Why replaying cached encoder outputs is not exact on this batch, or None when it is.

    Checks, each against an independent reference: (0) every encoder output is a tree of
    tensors mmdiag can rebuild; (1) the replay with the raw inputs
    zeroed reproduces a copy of the model's own logits (every modality reaches the rest of the
    network only through its encoder); (2) for each modality, the replay with that modality's
    features zeroed equals a full forward in which a forward hook makes its encoder return
    zeros (the brute-force definition of feature masking). Sets ``adapter.layouts`` on the way.
    """
    logits, feats, layers = adapter._encode_recording(inputs)
    logits = logits.detach().clone()
    for m in adapter.modalities:
        bad = unsupported_container(feats[m])
        if bad:
            return (f"the encoder of {m} returns a {bad}, which mmdiag cannot rebuild with the "
                    "modality masked")
        if not tensor_leaves(feats[m]):
            return f"the encoder of {m} returned no tensor"
        batch, shape = next(iter(inputs.values())).shape[0], list(tensor_leaves(feats[m])[0].shape)
        if not shape or shape[0] != batch:
            return (f"the encoder of {m} returns a tensor of shape {shape}, whose first axis is not the "
                    f"batch ({batch} rows; a sequence-first RNN, say), so its rows cannot be told apart")
    adapter.layouts = {m: infer_layout(feats[m], layers[m]) for m in adapter.modalities}
    blank = {m: torch.zeros_like(t) for m, t in inputs.items()}

    def close(a: Tensor, b: Tensor) -> bool:
        return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=1e-4)

    if not close(adapter.head_forward(blank, feats), logits):
        if not close(adapter.call_model(inputs), logits):
            return "the model is not deterministic in eval mode (two forwards of one batch differ)"
        return ("replaying the encoders' outputs with the raw inputs zeroed does not reproduce the "
                "model's logits, so a modality reaches the head outside its encoder")
    for m in adapter.modalities:
        replay = adapter.head_forward(inputs, {**feats, m: map_tensors(torch.zeros_like, feats[m])})
        handle = adapter.encoder_module(m).register_forward_hook(
            lambda _mod, _inp, out: map_tensors(torch.zeros_like, out))
        try:
            reference = adapter.call_model(inputs)
        finally:
            handle.remove()
        if not close(replay, reference):
            return (f"masking {m} through its encoder's output does not match a forward in which "
                    "that encoder returns zeros")
    return None

