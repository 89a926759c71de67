"""DMRNet: robust multimodal learning via representation decoupling (Wei et al., ECCV 2024), methods.md §14."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from mmdiag.errors import ConfigError
from mmdiag.fixes._combinations import all_masks, check_spec, combination_distribution, draw, mask_name, mixed_features
from mmdiag.fixes._common import check_range, require_encoders
from mmdiag.fixes._fused import fused_input, head_module, single
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix

AUX_KEY = "dmrnet_logvar"


class LogVarHead(LazyModuleMixin, nn.Module):
    """log sigma^2 = gamma * standardise_batch(W u + b) + beta, D -> D, sized at its first call.

    DMRNet's ``logvar_dul_backbone`` (Linear then BatchNorm1d), applied, as there, to the raw fused
    representation u. The batch standardisation (its statistics differentiated, as BatchNorm's in
    training) makes the output, and so the gradient it sends back, independent of the scale of u.
    It keeps no running statistics (the module only runs in training, and ranks stay identical),
    and a batch of one sample is only shifted and scaled.
    """

    cls_to_become = None

    def __init__(self) -> None:
        super().__init__()
        self.weight = UninitializedParameter()
        self.bias = UninitializedParameter()
        self.gamma = UninitializedParameter()
        self.beta = UninitializedParameter()

    def reset_parameters(self) -> None:
        if self.has_uninitialized_params():
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
        bound = 1 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.ones_(self.gamma)
        nn.init.zeros_(self.beta)

    def initialize_parameters(self, u: Tensor) -> None:  # type: ignore[override]
        if self.has_uninitialized_params():
            d = u.shape[1]
            with torch.no_grad():
                self.weight.materialize((d, d), device=u.device, dtype=u.dtype)
                for p in (self.bias, self.gamma, self.beta):
                    p.materialize((d,), device=u.device, dtype=u.dtype)
                self.reset_parameters()

    def forward(self, u: Tensor) -> Tensor:
        h = F.linear(u, self.weight, self.bias)
        if h.shape[0] > 1:
            h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
        return h * self.gamma + self.beta


def standardise(u: Tensor) -> tuple[Tensor, Tensor]:
    """(mu, s): u in batch-standardised coordinates, mu = (u - mean_batch(u)) / s, s the per-dimension
    batch standard deviation (+1e-5), as a BatchNorm without scale and shift computes them in training.

    DMRNet's Gaussian mean comes out of a BatchNorm; the user's representation has its own scale per
    dimension (a weak modality's features are often much smaller), so the noise is drawn in these
    coordinates, u + s * sigma * eps = mean + s * (mu + sigma * eps).

    ``s`` keeps its gradient: scaling u up scales the noise with it, so growing the representation
    cannot buy a better signal-to-noise ratio (with s held fixed within a step, the gradient always
    asked for a larger spread and the representation grew without bound). ``mu`` is returned without
    gradient, for the KL's mean term: in DMRNet the gradient of mu^2 is exactly zero below the
    BatchNorm (mean and spread are normalised away; it only shrinks the BatchNorm's scale and shift,
    which the user's representation does not have), whereas differentiating mu with the statistics
    held fixed pulls every sample toward the batch mean with a force of mu / s that grows as the
    spread shrinks, and collapsed the audio branch of AV-digits (docs/fixes/dmrnet.md). A batch of
    one sample keeps its own coordinates (mean 0, s = 1)."""
    if u.shape[0] < 2:
        return u.detach(), torch.ones_like(u)
    mean = u.mean(dim=0, keepdim=True)
    scale = u.std(dim=0, unbiased=False, keepdim=True) + 1e-5
    return ((u - mean) / scale).detach(), scale.expand_as(u)


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) = mean_i sum_d 1/2 (sigma^2 + mu^2 - log sigma^2 - 1)."""
    return (0.5 * (logvar.exp() + mu ** 2 - logvar - 1)).sum(dim=1).mean()


@register_fix
@dataclass
class DMRNet(Fix):
    """DMRNet: combination dropout with a Gaussian fused representation and a hard-combination CE.

    What it changes:
        * Every training sample draws one non-empty combination (uniform over the 2^M - 1 by default,
          as DMRNet's 1/3 each for two modalities; ``missing`` rates or an explicit ``combinations``
          distribution); absent modalities are masked at the encoder output (the adapter's baseline)
          and the head re-run, as :mod:`mmdiag.fixes.mmanet` does.
        * The fused representation u of each sample (the input of the adapter's head: a forward
          pre-hook active only during the fix's own head call; without a known head, the
          concatenated flattened encoder outputs) is replaced by z = u + s * sigma(u) * eps,
          eps ~ N(0, I), s the per-dimension batch standard deviation of u (see
          :func:`standardise`), with log sigma^2 from an auxiliary D -> D head on u
          (``ctx.aux["dmrnet_logvar"]``, Linear + batch standardisation as DMRNet's BatchNorm
          branch): the mean of the Gaussian is the model's own deterministic representation, so at
          inference (z = u) the user's model is unchanged and nothing of the fix remains in it.
        * L_KL = mean_i sum_d 1/2 (sigma^2 + mu^2 - log sigma^2 - 1), the KL to N(0, I) in the
          batch-standardised coordinates mu = (u - mean) / s; its mu^2 term sends no gradient to u,
          as none passes DMRNet's BatchNorm (see :func:`standardise`), so the KL acts on sigma only.
        * Hard combination: over the first ``detect_epochs`` epochs the mean predicted variance
          (sigma^2 averaged over the dimensions) is accumulated per drawn combination; the hard one
          is the proper combination of the distribution's support (all of them, not only single
          modalities; for two modalities the same thing) with the largest mean. From then on
          L_hard = sum of the CE of the samples that drew it, divided by the batch size.
        * Loss: CE(z) + alpha L_KL + beta L_hard.

    Defaults: alpha 1e-3, beta 0.2 (DMRNet's CREMA-D script; argument default 0.5), detect_epochs
    min(5, max(1, epochs // 4)) (DMRNet: epochs 0-5 of 100).

    Cost: one head call per step for the dropout outputs plus the auxiliary D x D layer; the
    auxiliary head holds D^2 + 3D parameters (D = size of the fused representation). Under
    torch.distributed the auxiliary head's gradients are averaged over the processes.

    Source: shicaiwei123/ECCV2024-DMRNet, ``audio-visual classification/main.py`` (train_epoch:
    KL, weak-modality selection, hard loss), ``models/fusion_modules.py`` (ConcatFusion with pme),
    ``models/basic_model.py`` (modality_drop), ``cramed.sh``. Signals: ``var.<combination>``,
    ``weak``, ``weak_var``; logs ``kl``, ``hard``.
    """

    name: ClassVar[str] = "dmrnet"
    summary: ClassVar[str] = ("combination dropout with a Gaussian fused representation (KL to N(0, I)) + CE on "
                              "the hard combination")
    matches: ClassVar[str] = "accuracy drops when a modality is missing at deployment (deployment accuracy)"
    targets: ClassVar[tuple[str, ...]] = ("missing_modality",)

    alpha: float = 1e-3
    beta: float = 0.2
    detect_epochs: int | None = None
    missing: str | dict[str, float] | None = None
    combinations: str | dict[str, float] | None = None
    _s: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _bits: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _pending: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range(self.name, "alpha", self.alpha, 0)
        check_range(self.name, "beta", self.beta, 0)
        check_range(self.name, "detect_epochs", self.detect_epochs, 1, integer=True, optional=True)
        check_spec(self.name, self.missing, self.combinations)
        self._s = _fresh_state()

    # ------------------------------------------------------------------ hooks
    def setup(self, ctx: FixContext) -> None:
        require_encoders(ctx, self.name)
        mods = ctx.modalities
        masks = all_masks(mods)
        probs = combination_distribution(self.name, mods, self.missing, self.combinations)
        s = self._s
        if len(s["var_sum"]) != len(masks):
            s.update({"var_sum": [0.0] * len(masks), "var_count": [0.0] * len(masks)})
        s.update(_epoch_counters(len(masks)))
        s["names"] = [mask_name(k, mods) for k in masks]
        if s["detect"] < 1:  # a resumed run keeps the detection length it started with (load_state_dict)
            s["detect"] = self.detect_epochs if self.detect_epochs is not None else min(5, max(1, ctx.epochs // 4))
        if AUX_KEY not in ctx.aux:
            ctx.add_aux(AUX_KEY, LogVarHead())
        self._bits = {"masks": masks, "probs": probs, "head": head_module(ctx.adapter)}

    def _sample(self, ctx: FixContext, record: dict[str, Tensor]):
        """z = u + s * sigma * eps, in the batch-standardised coordinates of u (see :func:`standardise`)."""
        def transform(u: Tensor) -> Tensor:
            mu, scale = standardise(u.float())
            logvar = ctx.aux[AUX_KEY](u.float())
            record["mu"], record["logvar"] = mu, logvar
            return u + (scale * torch.exp(0.5 * logvar) * torch.randn_like(logvar)).to(u.dtype)
        return transform

    def _encoder_level(self, ctx: FixContext, step: Step, mixed: Mapping[str, Any],
                       record: dict[str, Tensor]) -> Tensor:
        """No head known: the representation is the concatenated flattened encoder outputs."""
        mods = ctx.modalities
        bad = [m for m in mods if not (isinstance(mixed[m], Tensor) and mixed[m].is_floating_point())]
        if bad:
            raise ConfigError(
                f"dmrnet perturbs the fused representation, but no fusion head is known and the encoder output of "
                f"{bad[0]} is not one floating-point tensor. Name the head (`head=MODULE`, the module that receives "
                "the fused features)."
            )
        b = step.labels.shape[0]
        flat = torch.cat([mixed[m].reshape(b, -1) for m in mods], dim=1)
        z = self._sample(ctx, record)(flat)
        out, offset = {}, 0
        for m in mods:
            n = mixed[m][0].numel() if mixed[m].dim() > 1 else 1
            out[m] = z[:, offset:offset + n].reshape(mixed[m].shape)
            offset += n
        return ctx.adapter.head_forward(step.inputs, out)

    def forward(self, ctx: FixContext, step: Step) -> Tensor | None:
        if step.features is None:
            require_encoders(ctx, self.name)
        s, bits = self._s, self._bits
        b = step.labels.shape[0]
        index, keep = draw(bits["probs"], bits["masks"], b, step.labels.device)
        mixed = mixed_features(ctx.adapter, step.features, keep)
        record: dict[str, Tensor] = {}
        if bits["head"] is not None:
            with fused_input(bits["head"], self._sample(ctx, record)) as seen:
                logits = ctx.adapter.head_forward(step.inputs, mixed)
            single(seen, "model")
        else:
            logits = self._encoder_level(ctx, step, mixed, record)
        kl = kl_standard_normal(record["mu"], record["logvar"])
        step.logs["kl"] = float(kl.detach())
        extra = self.alpha * kl
        if step.epoch < s["detect"]:
            with torch.no_grad():
                var = record["logvar"].detach().exp().mean(dim=1).double().cpu()
                idx = index.cpu()
                k = len(s["epoch_sum"])
                s["epoch_sum"] = (torch.tensor(s["epoch_sum"], dtype=torch.float64)
                                  + torch.bincount(idx, weights=var, minlength=k)).tolist()
                s["epoch_count"] = (torch.tensor(s["epoch_count"], dtype=torch.float64)
                                    + torch.bincount(idx, minlength=k)).tolist()
        elif s["weak"] >= 0 and self.beta > 0:
            sel = index == s["weak"]
            hard = F.cross_entropy(logits[sel], step.labels[sel], reduction="sum") / b if bool(sel.any()) \
                else logits.sum() * 0.0
            step.logs["hard"] = float(hard.detach())
            extra = extra + self.beta * hard
        self._pending = extra
        return logits

    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert step.loss is not None
        extra, self._pending = self._pending, None
        return step.loss if extra is None else step.loss + extra

    def after_backward(self, ctx: FixContext, step: Step) -> None:
        ctx.sync_aux(AUX_KEY)  # every rank keeps the same log-variance head

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, Any]:
        s = self._s
        k = len(s["epoch_sum"])
        if epoch < s["detect"]:
            red = ctx.all_reduce_sum(torch.tensor(s["epoch_sum"] + s["epoch_count"], dtype=torch.float64)).tolist()
            s["var_sum"] = [a + b for a, b in zip(s["var_sum"], red[:k])]
            s["var_count"] = [a + b for a, b in zip(s["var_count"], red[k:])]
            if epoch == s["detect"] - 1:
                self._choose()
        s.update(_epoch_counters(k))
        return self.signals()

    def _choose(self) -> None:
        s, bits = self._s, self._bits
        cands = [j for j, p in enumerate(bits["probs"])
                 if p > 0 and not all(bits["masks"][j]) and s["var_count"][j] > 0]
        if cands:
            means = {j: s["var_sum"][j] / s["var_count"][j] for j in cands}
            s["weak"] = max(cands, key=lambda j: (means[j], -j))
            s["weak_var"] = means[s["weak"]]

    def teardown(self, ctx: FixContext) -> None:
        self._pending = None

    # ------------------------------------------------------------------ state, signals
    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._s)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        s = _fresh_state()
        for key in s:
            if key in state:
                s[key] = copy.deepcopy(state[key])
        s["weak"], s["detect"] = int(s["weak"]), int(s["detect"])
        self._s = s

    def signals(self) -> dict[str, Any]:
        s = self._s
        out: dict[str, Any] = {f"var.{s['names'][j]}": s["var_sum"][j] / c
                               for j, c in enumerate(s["var_count"]) if c > 0 and s["names"]}
        if s["weak"] >= 0 and s["names"]:
            out["weak"] = s["names"][s["weak"]]
            out["weak_var"] = float(s["weak_var"])
        return out


def _epoch_counters(k: int) -> dict[str, list[float]]:
    return {"epoch_sum": [0.0] * k, "epoch_count": [0.0] * k}


def _fresh_state() -> dict[str, Any]:
    return {"names": [], "var_sum": [], "var_count": [], "weak": -1, "weak_var": 0.0, "detect": 0,
            **_epoch_counters(0)}
