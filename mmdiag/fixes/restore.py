"""restore: one-stage modality distillation, mmdiag's PROPOSED operationalisation (methods.md §17.4).

A translator learns to restore a missing modality's encoder output from the present ones, jointly
with the task, and the fusion head learns to use restored features; :mod:`mmdiag.deploy` applies it
at inference (a missing modality is restored, not zeroed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from mmdiag.errors import ConfigError
from mmdiag.fixes._combinations import all_masks, check_spec, combination_distribution, draw
from mmdiag.fixes._common import check_range, require_encoders
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix
from mmdiag.pooling import pool

#: the version of the translator's files (``restore.json``), bumped when their layout changes
FORMAT = 1


def mmd_rbf(x: Tensor, y: Tensor) -> Tensor:
    """Squared maximum mean discrepancy between samples ``x`` [n, d] and ``y`` [k, d].

    Gaussian kernel k(a, b) = exp(-||a - b||² / h) with the median bandwidth: h is the (lower)
    median of the squared distances between distinct points of x ∪ y, taken without gradient (1
    when it is 0). The biased estimate (V-statistic, diagonal terms included):
    MMD² = mean K(x, x) + mean K(y, y) - 2 mean K(x, y); it is >= 0 and 0 for identical samples.
    """
    z = torch.cat([x, y]).float()
    sq = (z * z).sum(1)
    off = 1.0 - torch.eye(z.shape[0], device=z.device, dtype=z.dtype)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0) * off
    with torch.no_grad():
        iu = torch.triu_indices(z.shape[0], z.shape[0], 1, device=z.device)
        h = d2[iu[0], iu[1]].median() if iu.shape[1] else torch.ones((), device=z.device)
        h = torch.where(h > 0, h, torch.ones_like(h))
    k = torch.exp(-d2 / h)
    n = x.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2.0 * k[:n, n:].mean()


class _Branch(LazyModuleMixin, nn.Module):
    """T_m: [B, D_in] -> Linear(hidden) -> ReLU -> Linear(numel) -> [B, *shape] (m's encoder output).

    Lazy until its first call (the sizes come from the first batch) unless ``in_features`` and
    ``shape`` are given; weights are drawn from a generator seeded with ``seed`` (nn.Linear's
    default ranges), so every process of a distributed run starts from the same translator.
    """

    cls_to_become = None

    def __init__(self, hidden: int, seed: int, in_features: int | None = None,
                 shape: Sequence[int] | None = None) -> None:
        super().__init__()
        self.hidden, self.seed = int(hidden), int(seed)
        if in_features is None or shape is None:
            self.w1, self.b1 = UninitializedParameter(), UninitializedParameter()
            self.w2, self.b2 = UninitializedParameter(), UninitializedParameter()
            self.register_buffer("shape", UninitializedBuffer(dtype=torch.long))
            return
        numel = math.prod(shape)
        self.w1 = nn.Parameter(torch.empty(self.hidden, int(in_features)))
        self.b1 = nn.Parameter(torch.empty(self.hidden))
        self.w2 = nn.Parameter(torch.empty(numel, self.hidden))
        self.b2 = nn.Parameter(torch.empty(numel))
        self.register_buffer("shape", torch.tensor(list(shape), dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.has_uninitialized_params():
            return
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
                bound = 1.0 / math.sqrt(w.shape[1]) if w.shape[1] else 0.0
                for p in (w, b):
                    p.copy_((torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)

    def initialize_parameters(self, x: Tensor, shape: Sequence[int] | None = None) -> None:  # type: ignore[override]
        if not self.has_uninitialized_params():
            return
        if shape is None:
            raise ConfigError("restore: this translator was never trained (its sizes are unknown); train it "
                              "with the restore fix, or load a saved one.")
        numel = math.prod(shape)
        with torch.no_grad():
            self.w1.materialize((self.hidden, x.shape[1]), device=x.device)
            self.b1.materialize((self.hidden,), device=x.device)
            self.w2.materialize((numel, self.hidden), device=x.device)
            self.b2.materialize((numel,), device=x.device)
            self.shape.materialize((len(shape),), device=x.device)
            self.shape.copy_(torch.tensor(list(shape), dtype=torch.long))
        self.reset_parameters()

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.shape.tolist())

    def forward(self, x: Tensor, shape: Sequence[int] | None = None) -> Tensor:
        out = F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)
        return out.view(x.shape[0], *self.out_shape)


class Translator(nn.Module):
    """One small MLP per modality m that restores m's encoder output from the other modalities'.

    Input of T_m: for each other modality k (in order) its encoder output as one vector per sample
    (flattened when it has at most ``flatten_limit`` elements per sample, else mean-pooled over the
    non-channel axes by the rank default of :mod:`mmdiag.pooling`), multiplied by k's presence
    (0 when absent), then the presence bits of the other modalities. Output: a tensor shaped like
    m's encoder output (any rank; a tuple or other container output is refused).

    ``inputs`` records each modality's input shape and dtype (per sample) seen in training, so that
    :func:`mmdiag.deploy.with_restoration` can hand the model a placeholder for a missing input.
    """

    def __init__(self, modalities: Sequence[str], hidden: int = 256, flatten_limit: int = 4096, seed: int = 0,
                 sizes: Mapping[str, tuple[int, Sequence[int]]] | None = None) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.hidden, self.flatten_limit, self.seed = int(hidden), int(flatten_limit), int(seed)
        self.inputs: dict[str, dict[str, Any]] = {}
        self.branches = nn.ModuleDict({
            m: _Branch(hidden, seed + j, *(sizes[m] if sizes is not None else (None, None)))
            for j, m in enumerate(self.modalities)})

    def vector(self, feature: Tensor) -> Tensor:
        """One float vector per sample of an encoder output (flattened, or pooled when large)."""
        if feature.dim() == 1:
            return feature[:, None].float()
        if feature[0].numel() <= self.flatten_limit:
            return feature.flatten(1).float()
        return pool(feature, None, "mean").float()

    def sources(self, m: str, features: Mapping[str, Any], keep: Tensor) -> Tensor:
        """T_m's input [B, D_in] from the other modalities' features and the presence ``keep`` [B, M]."""
        parts, bits = [], []
        for j, k in enumerate(self.modalities):
            if k == m:
                continue
            on = keep[:, j].float()[:, None]
            parts.append(self.vector(features[k]) * on)
            bits.append(on)
        return torch.cat(parts + bits, dim=1)

    def estimate(self, m: str, features: Mapping[str, Any], keep: Tensor, shape: Sequence[int] | None = None) -> Tensor:
        """T_m's estimate of m's encoder output [B, *shape] (float32), with gradient."""
        x = self.sources(m, features, keep)
        return self.branches[m](x, None if shape is None else tuple(shape))

    def restore(self, features: Mapping[str, Any], present: Sequence[str]) -> dict[str, Any]:
        """The features with every modality not in ``present`` (same for every row) restored."""
        present = tuple(present)
        if not present:
            raise ConfigError("restore: at least one modality must be present to restore the others from.")
        ref = features[present[0]]
        self._follow(ref.device)
        keep = torch.tensor([m in present for m in self.modalities], device=ref.device).expand(ref.shape[0], -1)
        out: dict[str, Any] = {}
        for m in self.modalities:
            if m in present:
                out[m] = features[m]
                continue
            like = features.get(m)
            dtype = like.dtype if isinstance(like, Tensor) and like.is_floating_point() else ref.dtype
            out[m] = self.estimate(m, features, keep).to(dtype)
        return out

    def forward(self, features: Mapping[str, Any], present: Sequence[str]) -> dict[str, Any]:
        return self.restore(features, present)

    def _follow(self, device: torch.device) -> None:
        p = next(iter(self.parameters()), None)
        if p is not None and not is_lazy(p) and p.device != device:
            self.to(device)

    @property
    def trained(self) -> bool:
        """Whether every branch has its sizes (it has seen a batch, or was loaded)."""
        return not any(b.has_uninitialized_params() for b in self.branches.values())

    def note_inputs(self, inputs: Mapping[str, Tensor]) -> None:
        """Record each modality's per-sample input shape and dtype (for deployment placeholders)."""
        for m in self.modalities:
            x = inputs.get(m)
            if isinstance(x, Tensor):
                self.inputs[m] = {"shape": list(x.shape[1:]), "dtype": str(x.dtype).replace("torch.", "")}

    def describe(self) -> dict[str, Any]:
        """JSON-safe description, enough to rebuild the translator (``restore.json``)."""
        if not self.trained:
            raise ConfigError("restore: the translator has no sizes yet (it never saw a batch); train it first.")
        return {
            "format": FORMAT,
            "architecture": "per modality m: Linear(in_features, hidden) -> ReLU -> Linear(hidden, prod(shape)), "
                            "reshaped to m's encoder output",
            "modalities": list(self.modalities),
            "hidden": self.hidden,
            "flatten_limit": self.flatten_limit,
            "seed": self.seed,
            "in_features": {m: int(b.w1.shape[1]) for m, b in self.branches.items()},
            "shapes": {m: list(b.out_shape) for m, b in self.branches.items()},
            "inputs": dict(self.inputs),
        }


def _check_feature(m: str, feature: Any, translator: Translator) -> Tensor:
    if not isinstance(feature, Tensor) or not feature.is_floating_point():
        kind = type(feature).__name__ if not isinstance(feature, Tensor) else f"a {feature.dtype} tensor"
        raise ConfigError(
            f"restore: the encoder of {m} returns {kind}; the translator restores one floating-point tensor "
            "per modality (any rank). Name as that modality's encoder (`encoders={MODALITY: MODULE}`) a "
            "submodule that returns a single tensor, such as its pooled output.")
    branch = translator.branches[m]
    if not branch.has_uninitialized_params() and tuple(feature.shape[1:]) != branch.out_shape:
        raise ConfigError(
            f"restore: the encoder output of {m} changed shape: first {list(branch.out_shape)} per sample, now "
            f"{list(feature.shape[1:])}. The translator needs a fixed shape; pad inputs to one length or name "
            "a pooled output as the encoder.")
    return feature


@register_fix
@dataclass
class Restore(Fix):
    """Restore missing modalities from the present ones: one-stage modality distillation (PROPOSED).

    mmdiag's operationalisation of the abstract of one-stage modality distillation (methods.md
    §17.4; no code or body text was available). Per step, each sample gets a combination of
    present modalities (uniform over the non-empty ones by default; per-modality ``missing`` rates
    or an explicit ``combinations`` distribution, read by :mod:`mmdiag.fixes._combinations` as for
    ``mmanet``); the :class:`Translator` estimates every modality m from the others' encoder
    outputs, masked by that combination, and the loss is

        CE(fused) + lambda_restored · CE(head on restored features)
                  + lambda_rec · Σ_m MSE(T_m(h_−m), sg(h_m)) + lambda_align · Σ_m MMD²(T_m(h_−m), sg(h_m))

    The restored features keep h_m where m is present and take T_m's estimate where it is missing;
    the reconstruction and alignment terms use every sample where some other modality is present.
    The targets are detached (sg); the translator's inputs are not, so the present encoders also
    learn to carry what a missing modality would have given (the "joint adaptation" of the
    abstract). MMD: :func:`mmd_rbf` (Gaussian kernel, median bandwidth).

    The translator lives in ``ctx.aux["restore"]``; ``rebalance`` saves it as
    ``restore.safetensors`` + ``restore.json``; :func:`mmdiag.deploy.with_restoration` uses it at
    inference and ``analyze(restore=DIR)`` evaluates the combinations with it.

    Signals: ``rec.<m>``, ``align.<m>`` (epoch means of the two terms) and ``acc.restored``
    (training accuracy of the head on restored features). Under torch.distributed the
    translator's gradients are averaged over the processes (it is not wrapped by DDP).

    Nothing is installed on the model, so ``teardown`` has nothing to remove.

    Cost: 1F + 1B per step, one extra fusion-head call, the translator (M small MLPs).
    """

    name: ClassVar[str] = "restore"
    summary: ClassVar[str] = ("learn to restore a missing modality's encoder output from the present ones, "
                              "and train the head on restored inputs (PROPOSED)")
    matches: ClassVar[str] = ("accuracy collapses when a modality is missing at deployment (per-combination or "
                              "deployment accuracy)")
    targets: ClassVar[tuple[str, ...]] = ("missing_modality",)
    needs_encoders: ClassVar[bool] = True

    lambda_rec: float = 1.0
    lambda_align: float = 0.1
    lambda_restored: float = 1.0
    hidden: int = 256
    flatten_limit: int = 4096
    missing: str | dict[str, float] | None = None
    combinations: str | dict[str, float] | None = None
    seed: int = 0
    _probs: list[float] = field(default_factory=list, init=False, repr=False, compare=False)
    _masks: list[tuple[bool, ...]] = field(default_factory=list, init=False, repr=False, compare=False)
    _mods: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    _sums: list[float] = field(default_factory=list, init=False, repr=False, compare=False)
    _last: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("lambda_rec", "lambda_align", "lambda_restored"):
            check_range(self.name, name, getattr(self, name), 0)
        check_range(self.name, "hidden", self.hidden, 1, integer=True)
        check_range(self.name, "flatten_limit", self.flatten_limit, 1, integer=True)
        check_range(self.name, "seed", self.seed, integer=True)
        check_spec(self.name, self.missing, self.combinations)

    # ------------------------------------------------------------------ hooks
    def setup(self, ctx: FixContext) -> None:
        require_encoders(ctx, self.name)
        self._mods = ctx.modalities
        self._masks = all_masks(self._mods)
        self._probs = combination_distribution(self.name, self._mods, self.missing, self.combinations)
        if len(self._sums) != 2 * len(self._mods) + 3:
            self._sums = [0.0] * (2 * len(self._mods) + 3)
        if "restore" not in ctx.aux:
            ctx.add_aux("restore", Translator(self._mods, self.hidden, self.flatten_limit, self.seed))

    def draw(self, batch: int, device: torch.device) -> Tensor:
        """The presence mask [batch, M] (bool) of one step: one combination per sample, drawn from
        torch's global generator (saved and restored by the reference loop)."""
        return draw(self._probs, self._masks, batch, device)[1]

    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert step.loss is not None
        if step.features is None:
            require_encoders(ctx, self.name)
        translator: Translator = ctx.aux["restore"]  # type: ignore[assignment]
        feats = {m: _check_feature(m, step.features[m], translator) for m in self._mods}  # type: ignore[index]
        translator.note_inputs(step.inputs)
        keep = self.draw(step.labels.shape[0], step.labels.device)
        restored, rec, align = {}, [], []
        for j, m in enumerate(self._mods):
            est = translator.estimate(m, feats, keep, feats[m].shape[1:])
            rows = torch.cat([keep[:, :j], keep[:, j + 1:]], dim=1).any(dim=1)
            if bool(rows.any()):
                e, t = est[rows].flatten(1), feats[m].detach()[rows].flatten(1).float()
                rec.append(F.mse_loss(e, t))
                align.append(mmd_rbf(e, t))
            else:
                rec.append(est.sum() * 0.0)
                align.append(est.sum() * 0.0)
            on = keep[:, j].view(-1, *([1] * (feats[m].dim() - 1)))
            restored[m] = torch.where(on, feats[m], est.to(feats[m].dtype))
        z = ctx.adapter.head_forward(step.inputs, restored)
        ce = F.cross_entropy(z, step.labels)
        self._accumulate(rec, align, z, step.labels)
        step.logs.update({"restored_ce": float(ce.detach()), "rec": float(sum(rec).detach()),
                          "align": float(sum(align).detach())})
        return (step.loss + self.lambda_restored * ce + self.lambda_rec * sum(rec)
                + self.lambda_align * sum(align))

    def after_backward(self, ctx: FixContext, step: Step) -> None:
        ctx.sync_aux("restore")  # every rank keeps the same translator

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, float]:
        total = ctx.all_reduce_sum(torch.tensor(self._sums, dtype=torch.float64)).tolist()
        self._last = self._means(total) or self._last
        self._sums = [0.0] * len(self._sums)
        return dict(self._last)

    # ------------------------------------------------------------------ signals and state
    def _accumulate(self, rec: list[Tensor], align: list[Tensor], z: Tensor, labels: Tensor) -> None:
        n = len(self._mods)
        values = torch.stack([torch.stack(rec), torch.stack(align)]).detach().double().flatten().tolist()
        for i, v in enumerate(values):
            self._sums[i] += v
        self._sums[2 * n] += 1.0
        self._sums[2 * n + 1] += float((z.detach().argmax(1) == labels).sum())
        self._sums[2 * n + 2] += float(labels.shape[0])

    def _means(self, sums: Sequence[float]) -> dict[str, float]:
        n = len(self._mods)
        if len(sums) != 2 * n + 3 or sums[2 * n] <= 0:
            return {}
        steps = sums[2 * n]
        out = {f"rec.{m}": sums[j] / steps for j, m in enumerate(self._mods)}
        out.update({f"align.{m}": sums[n + j] / steps for j, m in enumerate(self._mods)})
        if sums[2 * n + 2] > 0:
            out["acc.restored"] = sums[2 * n + 1] / sums[2 * n + 2]
        return out

    def signals(self) -> dict[str, float]:
        return self._means(self._sums) or dict(self._last)

    def state_dict(self) -> dict[str, Any]:
        return {"modalities": list(self._mods), "sums": list(self._sums), "last": dict(self._last)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._mods = tuple(str(m) for m in state.get("modalities", self._mods))
        self._sums = [float(v) for v in state.get("sums", [])]
        self._last = {str(k): float(v) for k, v in state.get("last", {}).items()}
