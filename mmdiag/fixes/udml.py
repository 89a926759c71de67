"""UDML: unbiased dynamic multimodal learning (Wei et al., CVPR 2026 Findings; arXiv 2603.19681), methods.md §12."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdiag.adapter import map_tensors
from mmdiag.fixes._common import check_range, mean_abs_logits, reduce_mean, require_encoders
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix


def noise_estimator(hidden: int = 256, dropout: float = 0.1) -> nn.Module:
    """UDML's noise-aware estimator: d → hidden → Dropout → 1 (input size read from the first batch).

    mmdiag standardises the input first (BatchNorm without affine parameters): a generic encoder's
    feature scale drifts during training, and exp(½ o) of an unnormalised MLP output overflows.
    """
    return nn.Sequential(nn.LazyBatchNorm1d(affine=False), nn.LazyLinear(hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, 1))


def target_weights(log_var: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse-uncertainty weights t_m = (1/σ̂_m²)/mean_k(1/σ̂_k²), per sample (mean 1 over modalities).

    Takes o_m = log σ̂_m² (the estimator's output) and computes t = M · softmax_m(−o_m), the same
    quantity without overflow when some σ̂ underflows. For two modalities this is UDML's
    t_a = 2σ̂_v²/(σ̂_a² + σ̂_v²).
    """
    mods = list(log_var)
    t = len(mods) * torch.softmax(-torch.stack([log_var[m] for m in mods]), dim=0)
    return {m: t[j] for j, m in enumerate(mods)}


def fusion_weights(t: Mapping[str, Tensor], dep: Mapping[str, float]) -> dict[str, Tensor]:
    """w_m = (t_m/dep_m) / mean_k(t_k/dep_k): inverse-uncertainty weights divided by the dependency bias."""
    raw = {m: t[m] / max(dep[m], 1e-12) for m in t}
    mean = torch.stack(list(raw.values())).mean(dim=0)
    return {m: v / mean for m, v in raw.items()}


def _per_sample(w: Tensor, like: Tensor) -> Tensor:
    """[B] weights shaped to broadcast against ``like`` ([B, ...])."""
    return w.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


@register_fix
@dataclass
class UDML(Fix):
    """UDML: residual feature scaling h_m(1 + w_m) with w ∝ inverse noise uncertainty / dependency bias.

    What it changes:
        * Dataset-side noise, done by the fix: a forward pre-hook on each encoder (installed in
          ``setup``, removed in ``teardown``, active only in training mode with gradients on)
          corrupts the encoder's first tensor input. Per batch a random half of the samples stays
          clean in every modality (level ℓ = 1); for the other half each modality draws its own
          level ℓ ∈ {1..L} (L = ``noise_levels`` = 11) and gets Gaussian noise of std
          ``noise_scale`` · (ℓ − 1)/(L − 1) · std(batch of that modality), so ℓ = 11 has the data's
          own std. UDML draws the levels once per
          sample at dataset construction; the fix draws them per batch. Noise starts at
          ``cycle_epoch`` (clean before), as UDML's clean-then-noisy schedule.
        * Noise-aware estimator per modality (auxiliary MLP d → 256 → Dropout 0.1 → 1 on the pooled,
          *detached* encoder output, UDML's pe=0 path, its input standardised by a BatchNorm without
          affine parameters because a generic encoder's feature scale drifts): o_m = log σ̂_m²,
          σ̂_m = exp(½ o_m), trained with ``noise_loss_weight`` · MSE(σ̂_m, ℓ_m).
        * Target weights t_m = (1/σ̂_m²)/mean_k(1/σ̂_k²) per sample (general-M form; UDML's
          t_a = 2σ̂_v²/(σ̂_a² + σ̂_v²) for two), computed as M · softmax_m(−o_m) so it stays finite,
          and forced to 1 before ``weight_warmup``.
        * Dependency bias dep_m = Σ_k mean_i |z_m,ik| of the modality-dropout readouts (R2, on the
          already rescaled features as in UDML — a feedback loop), recomputed every batch and used
          at the next one (initially 1 for every modality; UDML hard-codes 32 audio / 10 visual).
        * w_m = (t_m/dep_m)/mean_k(t_k/dep_k) (mean 1), fused logits = head(h_1(1+w_1), …, h_M(1+w_M))
          through the model's own head; during the warm-up the dependency correction stays active,
          as in UDML.
        * Loss: CE(z) + γ Σ_m CE(z_m) + noise_loss_weight · Σ_m MSE(σ̂_m, ℓ_m); gradient-norm
          clipping at ``clip_norm`` (UDML: 40) over the model and the estimators.

    Not included: UDML's probabilistic-embedding backbone (pe=1: μ/σ heads and the KL to a
    noise-level prior) changes the user's encoders; mmdiag uses the pe=0 form (β = 0, as UDML's
    Kinetics-Sounds script). At inference the user's model runs as is (w = 0); the estimator is
    a by-product kept in ``aux``.

    methods.md §20 pitfalls: UDML's spectrogram noise uses a fixed RNG seed (the same noise pattern at
    every call); mmdiag draws all noise from one generator seeded with ``seed`` and advanced per
    batch (its state is saved for resumption). The σ clamp ``args.max`` of the pe=1 audio branch is
    undefined in the released parser; mmdiag applies no clamp (and has no pe=1 branch).

    Defaults: γ = 4 (CREMA-D; KS 2.5), noise-loss weight 0.1, 11 levels, ``cycle_epoch`` = half the
    epochs (UDML: 50 of 100), ``weight_warmup`` = cycle_epoch + a tenth of the epochs (UDML: +10),
    clip 40.

    Cost: 1F + 1B per step, plus M+1 head calls, the estimators (tiny) and noise generation.

    Under torch.distributed the dependency bias is averaged over the processes (the per-sample
    weights stay local, as they are per sample), and each rank's noise generator is seeded with
    ``seed`` + 7919 · rank so that ranks do not share noise patterns.

    Source: shicaiwei123/UDML, ``models/basic_model.py`` (AVClassifier_AUXI_UDML),
    ``main_auxi_weight_udml.py``, ``dataset/CramedDataset.py``. Signals: ``w.<m>``, ``sigma.<m>``.
    """

    name: ClassVar[str] = "udml"
    summary: ClassVar[str] = ("residual feature scaling by inverse noise uncertainty / dependency bias, "
                              "with unimodal CEs")
    matches: ClassVar[str] = ("noise-dependent uncertainty plus a hard-to-learn modality penalised twice "
                              "(UDML σ̂ + dep)")
    targets: ClassVar[tuple[str, ...]] = ("noisy_modality",)

    gamma: float = 4.0
    noise_levels: int = 11
    noise_scale: float = 1.0
    clean_fraction: float = 0.5
    cycle_epoch: int | None = None
    weight_warmup: int | None = None
    noise_loss_weight: float = 0.1
    hidden: int = 256
    seed: int = 0
    clip_norm: float | None = 40.0
    _dep: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    _w: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    _sigma: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    _epoch: int = field(default=0, init=False, repr=False, compare=False)
    _epochs: int = field(default=0, init=False, repr=False, compare=False)
    _gen: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)
    _gen_state: Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _plan: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)
    _handles: list[Any] = field(default_factory=list, init=False, repr=False, compare=False)
    _step_sigma: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)
    _step_levels: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range(self.name, "gamma", self.gamma, 0)
        check_range(self.name, "noise_levels", self.noise_levels, 2, integer=True)
        check_range(self.name, "noise_scale", self.noise_scale, 0)
        check_range(self.name, "clean_fraction", self.clean_fraction, 0, 1)
        check_range(self.name, "cycle_epoch", self.cycle_epoch, 0, integer=True, optional=True)
        check_range(self.name, "weight_warmup", self.weight_warmup, 0, integer=True, optional=True)
        check_range(self.name, "noise_loss_weight", self.noise_loss_weight, 0)
        check_range(self.name, "hidden", self.hidden, 1, integer=True)
        check_range(self.name, "seed", self.seed, integer=True)
        check_range(self.name, "clip_norm", self.clip_norm, 0, low_open=True, optional=True)

    # ------------------------------------------------------------------ schedule
    def _cycle(self) -> int:
        return self.cycle_epoch if self.cycle_epoch is not None else self._epochs // 2

    def _warm(self) -> int:
        if self.weight_warmup is not None:
            return self.weight_warmup
        return self._cycle() + max(1, round(self._epochs / 10))

    # ------------------------------------------------------------------ hooks
    def setup(self, ctx: FixContext) -> None:
        require_encoders(ctx, self.name)
        self._epochs = ctx.epochs
        mods = ctx.modalities
        if set(self._dep) != set(mods):
            self._dep = {m: 1.0 for m in mods}
        self._gen = torch.Generator().manual_seed(self.seed + 7919 * ctx.rank)
        if self._gen_state is not None:
            self._gen.set_state(self._gen_state)
        for m in mods:
            key = f"udml_noise_{m}"
            if key not in ctx.aux:
                ctx.add_aux(key, noise_estimator(self.hidden))
            enc = ctx.adapter.encoder_module(m)
            self._handles.append(enc.register_forward_pre_hook(self._corrupt_hook(m, len(mods))))

    def _corrupt_hook(self, m: str, m_count: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not (module.training and torch.is_grad_enabled()) or not args or not isinstance(args[0], Tensor):
                return None
            x = args[0]
            if not x.is_floating_point():
                return None
            plan = self._plan
            if plan is None or m in plan["used"] or plan["size"] != x.shape[0]:
                plan = self._plan = self._draw_plan(x.shape[0])
            plan["used"].add(m)
            levels = plan["levels"][m]
            if self._epoch < self._cycle():
                levels.fill_(1)
            amp = self.noise_scale * (levels.to(x.dtype) - 1) / max(self.noise_levels - 1, 1)
            if not bool((amp > 0).any()):
                return None
            std = x.detach().float().std().to(x.dtype)
            noise = torch.randn(x.shape, generator=self._gen, dtype=x.dtype).to(x.device)
            noisy = x + _per_sample(amp.to(x.device), x) * std * noise
            return (noisy, *args[1:])

        return hook

    def _draw_plan(self, batch: int) -> dict[str, Any]:
        assert self._gen is not None
        clean = torch.zeros(batch, dtype=torch.bool)
        n_clean = int(round(self.clean_fraction * batch))
        clean[torch.randperm(batch, generator=self._gen)[:n_clean]] = True
        levels = {}
        for m in self._dep:
            lv = torch.randint(1, self.noise_levels + 1, (batch,), generator=self._gen)
            lv[clean] = 1
            levels[m] = lv
        return {"size": batch, "levels": levels, "used": set()}

    def forward(self, ctx: FixContext, step: Step) -> Tensor | None:
        if step.features is None:
            require_encoders(ctx, self.name)
        self._epoch = step.epoch
        mods = ctx.modalities
        batch = step.labels.shape[0]
        plan, self._plan = self._plan, None
        if plan is None or plan["size"] != batch:  # encoders ran without the hook (e.g. eval mode)
            levels = {m: torch.ones(batch, dtype=torch.long) for m in mods}
        else:
            levels = plan["levels"]
        self._step_levels = {m: levels[m].to(step.labels.device).float() for m in mods}
        self._step_sigma = {}
        log_var = {}
        for m in mods:
            log_var[m] = ctx.aux[f"udml_noise_{m}"](ctx.adapter.pooled(m, step.features[m]).detach().float()).squeeze(1)
            self._step_sigma[m] = torch.exp(0.5 * log_var[m])
        if step.epoch < self._warm():
            t = {m: torch.ones(batch, device=step.labels.device) for m in mods}
        else:
            t = target_weights({m: o.detach() for m, o in log_var.items()})
        w = fusion_weights(t, self._dep)
        # batch means over every rank's rows, so that every process logs the same signals
        means = reduce_mean(ctx, torch.stack([*(w[m].detach().mean() for m in mods),
                                              *(self._step_sigma[m].detach().mean() for m in mods)]).cpu()).tolist()
        self._w, self._sigma = dict(zip(mods, means[:len(mods)])), dict(zip(mods, means[len(mods):]))
        step.features = {
            m: map_tensors(lambda h, wm=w[m]: h * (1 + _per_sample(wm, h)), f) for m, f in step.features.items()
        }
        return ctx.adapter.head_forward(step.inputs, step.features)

    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert step.loss is not None
        readouts = {m: step.readout(ctx, [m]) for m in ctx.modalities}
        mods = ctx.modalities
        dep = reduce_mean(ctx, torch.tensor([mean_abs_logits(readouts[m]) for m in mods])).tolist()
        self._dep = dict(zip(mods, dep))
        aux = sum(F.cross_entropy(z, step.labels) for z in readouts.values())
        noise = sum(F.mse_loss(self._step_sigma[m], self._step_levels[m]) for m in ctx.modalities)
        step.logs.update(self.signals())
        self._step_sigma, self._step_levels = {}, {}
        return step.loss + self.gamma * aux + self.noise_loss_weight * noise

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, float]:
        self._epoch = epoch + 1
        return {**self.signals(), **{f"dep.{m}": v for m, v in self._dep.items()}}

    def teardown(self, ctx: FixContext) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._plan = None
        if self._gen is not None:
            self._gen_state = self._gen.get_state()

    def after_backward(self, ctx: FixContext, step: Step) -> None:
        ctx.sync_aux("udml_")  # every rank keeps the same noise estimators
        if self.clip_norm is not None:
            params = [*ctx.adapter.model.parameters(), *ctx.aux.parameters()]
            torch.nn.utils.clip_grad_norm_(params, self.clip_norm)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        gen = self._gen.get_state() if self._gen is not None else self._gen_state
        return {
            "dep": dict(self._dep),
            "w": dict(self._w),
            "sigma": dict(self._sigma),
            "epoch": self._epoch,
            "generator": gen.clone() if gen is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._dep = {str(m): float(v) for m, v in state.get("dep", {}).items()}
        self._w = {str(m): float(v) for m, v in state.get("w", {}).items()}
        self._sigma = {str(m): float(v) for m, v in state.get("sigma", {}).items()}
        self._epoch = int(state.get("epoch", 0))
        gen = state.get("generator")
        self._gen_state = gen.clone() if isinstance(gen, Tensor) else None
        if self._gen is not None and self._gen_state is not None:
            self._gen.set_state(self._gen_state)

    def signals(self) -> dict[str, float]:
        return {**{f"w.{m}": v for m, v in self._w.items()}, **{f"sigma.{m}": v for m, v in self._sigma.items()}}
