"""collect: the only place that runs the model for diagnosis.

One streaming pass over the evaluation data gathers every kind of evidence the requested
diagnostics need. Each evidence kind is one producer module here (see :mod:`.producer`):

* ``subsets``: logits of every modality subset (fusion-head calls on cached encoder outputs);
* ``head_split``: OGM's readouts of a linear concat head (whenever the head allows it);
* ``permutations``: correctness and loss with one modality permuted;
* ``features``: pooled encoder features of a subsample;
* ``grad_x_act``: gradient x activation at the encoder outputs;
* ``param_grads``: fused and unimodal gradients on each encoder's parameters;
* ``noise_features``: features with one modality's input corrupted (UDML);
* ``attribution``: Integrated-Gradients attribution mass per modality.

The gradient, parameter-gradient and attribution subsamples are a fixed fraction of the data (with
a floor and a cap), so their cost stays proportional to one evaluation pass whatever N is.
"""

from __future__ import annotations

from mmdiag.collect import (  # noqa: F401 - importing a producer registers its kind
    attribution,
    features,
    gradients,
    head_split,
    noise,
    param_grads,
    permutations,
    subsets,
)
from mmdiag.collect.attribution import ATTRIBUTION_FLOOR
from mmdiag.collect.gradients import GRAD_FLOOR
from mmdiag.collect.param_grads import PARAM_GRAD_FLOOR
from mmdiag.collect.producer import PRODUCERS, Batch, Producer, register_producer
from mmdiag.collect.run import VERIFY_ROWS, collect
from mmdiag.collect.sampling import make_loader, pick, subsample_size
from mmdiag.collect.settings import CollectSettings, ProgressFn

_pick = pick  # the name the older tests use

__all__ = [
    "ATTRIBUTION_FLOOR", "GRAD_FLOOR", "PARAM_GRAD_FLOOR", "PRODUCERS", "VERIFY_ROWS", "Batch",
    "CollectSettings", "Producer", "ProgressFn", "collect", "make_loader", "pick", "register_producer",
    "subsample_size",
]
