"""collect: the only place that runs the model for diagnosis.

One streaming pass over the evaluation data gathers every kind of evidence the requested
diagnostics need (see :data:`mmdiag.evidence.EVIDENCE_KINDS`):

* clean logits, and with feature-level masking the encoder outputs of the batch, which are then
  reused for all 2^M subsets and for the permutations (fusion-head calls, not full forwards);
* on seeded random subsamples (caps in :class:`CollectSettings`): pooled features, gradients of the
  fused loss with respect to the encoder outputs and parameters (``torch.autograd.grad``: no
  ``.grad`` is written and no parameter changes), inputs corrupted at a grid of noise levels, and
  Integrated-Gradients attributions. The gradient, parameter-gradient and attribution subsamples
  are a fixed fraction of the data (with a floor and a cap), so their cost stays proportional to
  one evaluation pass whatever N is; Integrated Gradients refines its step count per row until the
  completeness gap is small.

Rows are visited in a seeded shuffled order (so within-batch permutations mix classes even when
the file is sorted by label); ``Evidence.index`` maps each row back to the dataset index. An
optional evidence kind that fails (say, parameter gradients of a frozen encoder) does not stop
the pass: the reason is stored in ``meta['unavailable']`` and the diagnostics that need it fail
with that reason. A kind that the setup rules out (attribution of a black box with integer inputs)
is also listed in ``meta['skipped_kinds']``: a skip, not an error.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mmdiag.adapter import (
    MaskStats,
    ModelAdapter,
    first_tensor,
    map_tensors,
    pool,
    unwrap,
)
from mmdiag.categorical import (add_donors, attribution_path, check_categorical, corrupt_categorical,
                                 corruption_rate, is_categorical)
from mmdiag.distributed import resolve_device
from mmdiag.errors import AdapterError, ConfigError, EvidenceError, user_iteration
from mmdiag.evidence import (
    ENCODER_KINDS,
    EVIDENCE_KINDS,
    Evidence,
    members,
    merge_evidence,
)
from mmdiag.loading.data import MULTI_LABEL
from mmdiag.pooling import check_mode
from mmdiag.tensors import as_class_logits
from mmdiag.stats import true_class_margin
from mmdiag.validation import COLLECT, check_fields

#: progress(stage, done, total) is called as batches finish; total may be None.
ProgressFn = Callable[[str, int, "int | None"], None]

#: fewest rows of feature-gradient evidence, of parameter gradients and of attributions, whatever
#: the fraction.
GRAD_FLOOR = 128
PARAM_GRAD_FLOOR = 64
ATTRIBUTION_FLOOR = 32
#: rows of the first batch that the adapter checks and the head-split detection run on.
VERIFY_ROWS = 16

_EXTRA_KEYS = ("ood", "index")


@dataclass(frozen=True)
class CollectSettings:
    """How evidence is gathered. Defaults keep the default suite within a few evaluation passes.

    Attributes:
        batch_size: rows per batch.
        num_workers: DataLoader worker processes.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seed: seeds the row order, subsamples, masks, permutations and noise.
        max_feature_samples: cap on rows whose pooled features are kept (probes, prototypes, MDI entropy).
        max_grad_samples: cap on rows used for gradient evidence.
        grad_fraction: fraction of the rows whose feature gradients (``grad_x_act``: fusion-head
            backwards on cached features, cheap) are taken (at least :data:`GRAD_FLOOR` rows, at
            most ``max_grad_samples``); 1 = up to the cap.
        param_grad_fraction: fraction of the rows whose encoder-parameter gradients
            (``param_grads``: an encoder forward and two encoder backwards per row, the costlier
            kind) are taken (at least :data:`PARAM_GRAD_FLOOR` rows, at most ``max_grad_samples``,
            and never more than the feature-gradient rows, which they are drawn from).
        max_noise_samples: cap on rows corrupted at every noise level (UDML).
        max_attribution_samples: cap on rows attributed with Integrated Gradients.
        attribution_fraction: fraction of the rows attributed (at least :data:`ATTRIBUTION_FLOOR`
            rows, at most ``max_attribution_samples``); 1 = up to the cap.
        stats_samples: rows used to estimate the mean/std masks and the data scale.
        permutations: K, permutations per modality for the perceptual score.
        noise_levels: integer noise levels; level 1 is clean.
        noise_step: noise std at level l is ``noise_step * (l - 1)`` times the modality's data std.
        ig_steps: Integrated-Gradients steps of the first pass over each attributed row.
        ig_max_steps: most steps a row is refined to (steps grow 4x per round).
        ig_tolerance: a row is converged when its completeness gap |sum of attributions -
            (f(x) - f(baseline))| is at most this fraction of max(|f(x) - f(baseline)|, the
            median of that over the rows attributed together). Fixed steps: ``ig_max_steps = ig_steps``.
        max_subsets: refuse more than this many subsets (2^M) unless raised.
        pool: how encoder outputs of rank 3 and more become one vector per sample for the feature
            diagnostics: ``mean`` over the non-channel axes, ``first`` position, or ``flatten``
            (see :mod:`mmdiag.pooling`).
    """

    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    seed: int = 0
    max_feature_samples: int = 2000
    max_grad_samples: int = 2048
    grad_fraction: float = 0.125
    param_grad_fraction: float = 0.0625
    max_noise_samples: int = 1000
    max_attribution_samples: int = 256
    attribution_fraction: float = 1 / 64
    stats_samples: int = 2048
    permutations: int = 5
    noise_levels: tuple[int, ...] = tuple(range(1, 12))
    noise_step: float = 0.2
    ig_steps: int = 8
    ig_max_steps: int = 128
    ig_tolerance: float = 0.05
    max_subsets: int = 256
    pool: str = "mean"

    def __post_init__(self) -> None:
        # types and ranges from the one settings schema (the same checks as [collect] and the flags)
        checked = check_fields(asdict(self), COLLECT, lambda name: f"CollectSettings.{name}")
        object.__setattr__(self, "noise_levels", checked["noise_levels"])
        if int(self.ig_max_steps) < int(self.ig_steps):
            raise ConfigError(f"ig_max_steps ({self.ig_max_steps}) must be at least ig_steps ({self.ig_steps}).")


def split_batch(batch: Any, modalities: Sequence[str]) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
    """(inputs, labels, extras) from a batch that is a dict with 'label' or a (dict, labels) pair."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Mapping):
        items, labels = dict(batch[0]), batch[1]
    elif isinstance(batch, Mapping):
        items = dict(batch)
        key = "label" if "label" in items else "labels" if "labels" in items else None
        if key is None:
            raise EvidenceError(
                f"A data batch has keys {sorted(items)} but no 'label'; items must be (dict, label) "
                "pairs or dicts with a 'label' key."
            )
        labels = items.pop(key)
    else:
        raise EvidenceError(
            f"A data batch is a {type(batch).__name__}; expected (dict_of_tensors, labels) or a dict "
            "with modality tensors and 'label'."
        )
    missing = [m for m in modalities if m not in items]
    if missing:
        raise EvidenceError(
            f"The data has no modality {', '.join(map(repr, missing))}; its keys are "
            f"{sorted(k for k in items if k not in _EXTRA_KEYS)}. Check --modalities."
        )
    inputs = {m: torch.as_tensor(items[m]) for m in modalities}
    extras = {k: torch.as_tensor(items[k]) for k in _EXTRA_KEYS if k in items}
    labels = torch.as_tensor(labels)
    if labels.dim() == 2 and labels.shape[1] > 1:
        # one-hot or multi-hot rows: reshape(-1) would silently make B x C labels of them
        raise EvidenceError(MULTI_LABEL.format(what="A batch's labels", shape=tuple(labels.shape))
                            if bool((labels.sum(1) != 1).any()) else
                            f"A batch's labels have shape {tuple(labels.shape)} (one-hot); expected one "
                            "class index per sample. Return label.argmax() from the dataset instead.")
    return inputs, labels.long().reshape(-1), extras


def make_loader(data: Dataset | DataLoader, settings: CollectSettings, rows: Sequence[int] | None = None) -> tuple[DataLoader, list[int] | None]:
    """A loader over ``data`` in a seeded shuffled order (or over ``rows``); DataLoaders pass through."""
    if isinstance(data, DataLoader):
        return data, None
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError("The dataset has no length; pass a DataLoader or a map-style Dataset.") from None
    if rows is None:
        g = torch.Generator().manual_seed(settings.seed)
        rows = torch.randperm(n, generator=g).tolist()
    loader = DataLoader(
        data, batch_size=settings.batch_size, sampler=list(rows), num_workers=settings.num_workers
    )
    return loader, list(rows)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) when torch.distributed is initialised (e.g. under torchrun), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _per_rank(s: CollectSettings, world: int) -> CollectSettings:
    """Split the subsample caps between processes so the total stays the same."""
    caps = ("max_feature_samples", "max_grad_samples", "max_noise_samples", "max_attribution_samples")
    return CollectSettings(**{**s.__dict__, **{c: -(-getattr(s, c) // world) for c in caps}})


def gather_evidence(ev: Evidence, world: int) -> Evidence:
    """Every process's evidence, merged in rank order (the result is the same on every rank)."""
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, ev.to_dict())
    return merge_evidence([Evidence.from_dict(p) for p in parts])


def subsample_size(n: int | None, cap: int, fraction: float, floor: int) -> int:
    """Rows of a subsampled evidence kind: ``ceil(fraction * n)``, at least ``floor``, at most ``cap``.

    A fixed share of the data keeps the kind's cost a fixed share of one evaluation pass (a fixed
    row count would dominate the analysis of a small set and vanish in a large one); the floor
    keeps small sets usable and the cap bounds large ones. Unknown n: the cap.
    """
    if n is None or fraction >= 1.0:
        return cap
    return min(cap, max(floor, math.ceil(fraction * n)))


def _pick(n: int | None, cap: int, seed: int) -> set[int] | None:
    """A seeded random set of ``cap`` row numbers out of ``n`` (None: all rows; n unknown: the first).

    The rows are the first ``cap`` of one seeded permutation, so a smaller cap with the same seed
    picks a subset of a larger one's rows.
    """
    if n is None:
        return set(range(cap))
    if cap >= n:
        return None
    g = torch.Generator().manual_seed(seed)
    return set(torch.randperm(n, generator=g)[:cap].tolist())


def _rows_in(offset: int, size: int, chosen: set[int] | None, cap: int) -> Tensor:
    """Positions within a batch whose global row number is in ``chosen`` (all when None)."""
    if cap == 0:
        return torch.zeros(0, dtype=torch.long)
    if chosen is None:
        return torch.arange(size)
    return torch.tensor([i for i in range(size) if offset + i in chosen], dtype=torch.long)


def _take(obj: Any, rows: Tensor) -> Any:
    return map_tensors(lambda t: t[rows.to(t.device)], obj)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration; the previous train/eval flags of every submodule are restored."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _check_finite(logits: Tensor, what: str) -> None:
    bad = ~torch.isfinite(logits).all(dim=1)
    if bad.any():
        raise EvidenceError(
            f"The model produced NaN or Inf logits for {int(bad.sum())} of {logits.shape[0]} samples "
            f"({what}). Check the inputs' scale, the checkpoint, and the mask (--mask zero|mean|noise)."
        )


def _check_labels(labels: Tensor, n_classes: int, output_kind: str | None = None) -> None:
    if labels.numel() and (int(labels.max()) >= n_classes or int(labels.min()) < 0) and output_kind == "binary":
        raise EvidenceError(
            f"The model returns one logit per sample (a binary classifier), but the labels go from "
            f"{int(labels.min())} to {int(labels.max())}; a binary classifier needs labels 0 and 1. "
            "Check the label column, or return [batch, classes] logits for more classes."
        )
    if labels.numel() and (int(labels.max()) >= n_classes or int(labels.min()) < 0):
        raise EvidenceError(
            f"Labels go up to {int(labels.max())} but the model outputs {n_classes} classes "
            "(labels must be 0..C-1). Check the label column or the model's number of classes."
        )


class _Collector:
    """State of one collection pass; :func:`collect` is its public face."""

    def __init__(self, adapter: ModelAdapter, needs: set[str], settings: CollectSettings,
                 progress: ProgressFn | None) -> None:
        self.adapter = adapter
        self.needs = needs
        self.s = settings
        self.progress = progress
        self.device = resolve_device(settings.device)
        self.gen = torch.Generator().manual_seed(settings.seed + 1)
        self.unavailable: dict[str, str] = {}
        self.data_std: dict[str, float] = {}
        self.head_split_cols: list[tuple[int, int]] | None = None
        self.world = 1
        self.skipped: set[str] = set()  # evidence kinds this setup rules out (skips, not errors)
        self.donors: dict[str, Tensor] = {}  # observed rows of each categorical modality (udml noise)

    # -------------------------------------------------------------- helpers
    def _tick(self, stage: str, done: int, total: int | None) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def _fail(self, kind: str, exc: Exception) -> None:
        self.needs.discard(kind)
        self.unavailable[kind] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (EvidenceError, AdapterError)) else str(exc)

    def _batches(self, loader: DataLoader, limit: int | None = None) -> Iterator[tuple[int, dict[str, Tensor], Tensor, dict[str, Tensor]]]:
        offset = 0
        for batch in user_iteration(loader, "reading a batch of the data (the dataset's __getitem__)"):
            inputs, labels, extras = split_batch(batch, self.adapter.modalities)
            inputs = {m: t.to(self.device) for m, t in inputs.items()}
            yield offset, inputs, labels.to(self.device), extras
            offset += labels.shape[0]
            if limit is not None and offset >= limit:
                return

    # -------------------------------------------------------------- stats pass
    def estimate_stats(self, loader: DataLoader) -> None:
        """Per-element mean/std of inputs (and encoder outputs) for the mean/noise masks and noise scale."""
        a = self.adapter
        sums: dict[str, list[Any]] = {}
        count = 0
        feat_sums: dict[str, list[Tensor]] = {}
        with torch.no_grad():
            for _, inputs, _, _ in self._batches(loader, self.s.stats_samples):
                for m, x in inputs.items():
                    xf = x.double()
                    acc = sums.setdefault(m, [0.0, 0.0])
                    acc[0] = acc[0] + xf.sum(0)
                    acc[1] = acc[1] + (xf * xf).sum(0)
                if a.mask_at == "feature" and a.needs_stats():
                    _, feats = a.encode(inputs)
                    for m, f in feats.items():
                        if isinstance(f, Tensor):
                            ff = f.double()
                            acc2 = feat_sums.setdefault(m, [0.0, 0.0])  # type: ignore[list-item]
                            acc2[0] = acc2[0] + ff.sum(0)
                            acc2[1] = acc2[1] + (ff * ff).sum(0)
                count += next(iter(inputs.values())).shape[0]
        if count == 0:
            raise EvidenceError("The dataset is empty: there is nothing to evaluate.")

        def finish(acc: list[Any]) -> tuple[Tensor, Tensor]:
            mean = acc[0] / count
            var = (acc[1] / count - mean * mean).clamp_min(0.0)
            return mean.float(), var.sqrt().float()

        a.input_stats = MaskStats()
        for m, acc in sums.items():
            mean, std = finish(acc)
            a.input_stats.mean[m], a.input_stats.std[m] = mean, std
            total_mean = acc[0].sum() / (count * mean.numel())
            total_var = acc[1].sum() / (count * mean.numel()) - total_mean**2
            self.data_std[m] = float(total_var.clamp_min(0.0).sqrt())
        a.feature_stats = MaskStats()
        for m, acc in feat_sums.items():
            mean, std = finish(acc)
            a.feature_stats.mean[m], a.feature_stats.std[m] = mean, std

    # -------------------------------------------------------------- head split
    def detect_concat_linear_head(self, inputs: Mapping[str, Tensor]) -> None:
        """Enable OGM's head split when the head is one Linear layer over the concatenated pooled features."""
        a = self.adapter
        if not a.encoders or a.head is None:
            return
        head = dict(unwrap(a.model).named_modules())[a.head]
        if not isinstance(head, torch.nn.Linear):
            return
        seen: dict[str, Tensor] = {}
        handle = head.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
        try:
            with torch.no_grad():
                _, feats = a.encode(inputs)
        finally:
            handle.remove()
        if "x" not in seen:
            return
        pooled = [a.pooled(m, feats[m]) for m in a.modalities]
        cat = torch.cat(pooled, dim=1)
        if seen["x"].shape == cat.shape and torch.allclose(seen["x"], cat, atol=1e-5):
            cols, start = [], 0
            for p in pooled:
                cols.append((start, start + p.shape[1]))
                start += p.shape[1]
            self.head_split_cols = cols
            self.head_module = head

    def head_split(self, feats: Mapping[str, Any]) -> Tensor:
        """[M, B, C] R1 readouts z_m = W_m h_m + b / M of a linear concat head."""
        w, b = self.head_module.weight, self.head_module.bias
        m_count = len(self.adapter.modalities)
        out = []
        for (lo, hi), m in zip(self.head_split_cols or [], self.adapter.modalities):
            z = self.adapter.pooled(m, feats[m]) @ w[:, lo:hi].T
            if b is not None:
                z = z + b / m_count
            if self.adapter.output_kind == "binary":  # one logit: readouts [0, z_m] add up to [0, z]
                z = as_class_logits(z, z.shape[0])[0]
            out.append(z)
        return torch.stack(out)

    # -------------------------------------------------------------- per-batch pieces
    def subsets(self, inputs: Mapping[str, Tensor], feats: Mapping[str, Any] | None, logits: Tensor) -> Tensor:
        a = self.adapter
        full = (1 << len(a.modalities)) - 1
        out = []
        for mask in range(full + 1):
            if mask == full:
                out.append(logits)
                continue
            z = a.subset_logits(inputs, members(mask, a.modalities), feats, self.gen)
            _check_finite(z, f"modalities present: {'+'.join(members(mask, a.modalities)) or 'none'}")
            out.append(z)
        return torch.stack(out)

    def permutations(self, inputs: Mapping[str, Tensor], feats: Mapping[str, Any] | None,
                     labels: Tensor) -> tuple[Tensor, Tensor]:
        a = self.adapter
        b = labels.shape[0]
        correct = torch.zeros(self.s.permutations, len(a.modalities), b, dtype=torch.bool)
        nll = torch.zeros(self.s.permutations, len(a.modalities), b)
        for k in range(self.s.permutations):
            for j, m in enumerate(a.modalities):
                perm = torch.randperm(b, generator=self.gen).to(labels.device)
                if a.mask_at == "feature" and feats is not None:
                    shuffled = dict(feats)
                    shuffled[m] = map_tensors(lambda t: t[perm], feats[m])
                    z = a.head_forward(inputs, shuffled)
                else:
                    shuffled_in = dict(inputs)
                    shuffled_in[m] = inputs[m][perm]
                    z = a.call_model(shuffled_in)
                correct[k, j] = (z.argmax(-1) == labels).cpu()
                nll[k, j] = F.cross_entropy(z.float(), labels, reduction="none").cpu()
        return correct, nll

    def feature_gradients(self, inputs: Mapping[str, Tensor], labels: Tensor,
                          feats: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """[b, M] gradient x activation of each encoder output, for the true-class margin
        (``grad_x_act``) and the fused cross-entropy (``grad_x_loss``).

        ``feats``: the encoder outputs of these rows from the main pass, when it has them (saves an
        encoder forward: only the fusion head runs, forward and backward).
        """
        a = self.adapter
        out: dict[str, Tensor] = {}
        with torch.enable_grad():
            if feats is None:
                with torch.no_grad():
                    _, feats = a.encode(inputs)
            leaves = {m: map_tensors(lambda t: t.detach().float().requires_grad_(True), feats[m]) for m in a.modalities}
            z = a.head_forward(inputs, leaves).float()
            tensors = [first_tensor(leaves[m]) for m in a.modalities]
            # Two first-order targets, both head-only backwards on the cached features: the
            # centred true-class logit margin z_y - mean_k z_k (mdi's default: it does not vanish
            # on confidently correct samples) and the fused cross-entropy (the literal proposal).
            margin = true_class_margin(z, labels).sum()
            loss = F.cross_entropy(z, labels, reduction="sum")
            for key, target in (("grad_x_act", margin), ("grad_x_loss", loss)):
                grads = torch.autograd.grad(target, tensors, allow_unused=True, retain_graph=key == "grad_x_act")
                gxa = [torch.zeros(h.shape[0], device=h.device) if g is None else (g * h).flatten(1).sum(1).abs()
                       for h, g in zip(tensors, grads)]
                out[key] = torch.stack(gxa, dim=1).detach().cpu()
        return out

    def parameter_gradients(self, inputs: Mapping[str, Tensor], labels: Tensor) -> tuple[Tensor, list[Tensor]]:
        """([M] cosine of the fused-loss and m-only-loss gradients on each encoder's parameters,
        the flattened fused-loss gradient of each encoder)."""
        a = self.adapter
        with torch.enable_grad():
            z, feats = a.encode(inputs)
            fused = F.cross_entropy(z.float(), labels)
            cos, fused_grads = [], []
            per_modality = {m: [p for p in a.encoder_module(m).parameters() if p.requires_grad] for m in a.modalities}
            for m, params in per_modality.items():
                if not params:
                    raise EvidenceError(
                        f"The encoder of {m!r} has no trainable parameters (frozen), so parameter "
                        "gradients are undefined."
                    )
            flat = [p for m in a.modalities for p in per_modality[m]]
            all_fused = torch.autograd.grad(fused, flat, retain_graph=True, allow_unused=True)
            only = {m: F.cross_entropy(a.head_forward(inputs, a.masked_features(feats, [m], self.gen)).float(),
                                       labels) for m in a.modalities}
            if len({id(p) for p in flat}) == len(flat):
                # The m-only loss reaches encoder m alone (every other modality is replaced by a
                # constant baseline), so one backward of their sum gives every encoder its own
                # unimodal gradient: 2 backwards in all instead of M + 1.
                all_only = torch.autograd.grad(sum(only.values()), flat, allow_unused=True)
            else:  # encoders share parameters: one backward per modality keeps them apart
                all_only = tuple(g for m in a.modalities for g in torch.autograd.grad(
                    only[m], per_modality[m], retain_graph=True, allow_unused=True))
            start = 0
            for m in a.modalities:
                params = per_modality[m]
                g_f = all_fused[start:start + len(params)]
                g_u = all_only[start:start + len(params)]
                start += len(params)
                vf = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(g_f, params)])
                vu = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(g_u, params)])
                denom = vf.norm() * vu.norm()
                cos.append(float((vf @ vu) / denom) if denom > 0 else 0.0)
                fused_grads.append(vf.detach().cpu())
        return torch.tensor(cos), fused_grads

    def noise_features(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """modality -> [L, b, d] pooled features of that modality's encoder with its input corrupted
        (Gaussian noise; a categorical modality: indices replaced, see :mod:`mmdiag.categorical`)."""
        a = self.adapter
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for m in a.modalities:
                scale = self.data_std.get(m, 1.0) or 1.0
                if is_categorical(inputs[m]):  # category indices: replaced by observed values, not noised
                    self.donors[m] = add_donors(self.donors.get(m), inputs[m])
                levels = []
                for level in self.s.noise_levels:
                    noisy = dict(inputs)
                    if is_categorical(inputs[m]):
                        rate = corruption_rate(level, self.s.noise_step)
                        noisy[m] = corrupt_categorical(inputs[m], rate, self.gen, self.donors[m])
                    else:
                        x = inputs[m].float()
                        noise = torch.randn(x.shape, generator=self.gen).to(x.device)
                        noisy[m] = (x + noise * (self.s.noise_step * (level - 1) * scale)).to(inputs[m].dtype)
                    with a.capture() as captured:
                        a.call_model(noisy)
                    levels.append(a.pooled(m, captured[m]).float().cpu())
                out[m] = torch.stack(levels)
        return out

    def attribution(self, inputs: Mapping[str, Tensor], labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """[b, M] summed |IG attribution| and [b, M] summed signed IG attribution per modality,
        [b] convergence deltas (captum) and [b] steps each row took.

        Every row starts at ``ig_steps`` Gauss-Legendre steps; rows whose completeness gap exceeds
        ``ig_tolerance`` (see :class:`CollectSettings`) are attributed again with 4x the steps,
        up to ``ig_max_steps``. Smooth models converge at the first round (a quarter of the cost
        of a fixed 32 steps); models whose gradient changes sharply along the path get the steps
        they need, and only on the rows that need them.
        """
        from captum.attr import IntegratedGradients

        a, s = self.adapter, self.s
        # at the inputs, or (a categorical modality) at the encoder outputs: see attribution_path
        path = attribution_path(a, inputs, self.gen)
        ig = IntegratedGradients(path.forward)

        def attribute(rows: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
            xs, baselines, extra = path.take(rows)
            with torch.enable_grad():
                attrs, delta = ig.attribute(
                    xs, baselines=baselines, target=labels[rows], additional_forward_args=extra,
                    n_steps=steps, internal_batch_size=s.batch_size, return_convergence_delta=True,
                )
            mass, signed = path.per_modality(attrs, absolute=True), path.per_modality(attrs, absolute=False)
            return mass, signed, delta.detach().reshape(-1)

        steps = int(s.ig_steps)
        everything = torch.arange(labels.shape[0], device=labels.device)
        mass, signed, delta = attribute(everything, steps)
        used = torch.full((labels.shape[0],), steps, dtype=torch.long)
        todo = everything
        while steps < s.ig_max_steps and todo.numel():
            # captum's delta = sum of attributions - (f(x) - f(baseline)), so the gap is recoverable
            gap = (signed.sum(1) - delta).abs()
            scale = torch.maximum(gap, gap.median()).clamp_min(1e-12)
            todo = torch.nonzero(delta.abs() > s.ig_tolerance * scale).flatten()
            if not todo.numel():
                break
            steps = min(steps * 4, int(s.ig_max_steps))
            mass[todo], signed[todo], delta[todo] = attribute(todo, steps)
            used[todo.cpu()] = steps
        return mass.cpu(), signed.cpu(), delta.abs().cpu(), used


def collect(
    adapter: ModelAdapter,
    data: Dataset | DataLoader,
    needs: Iterable[str],
    settings: CollectSettings | None = None,
    progress: ProgressFn | None = None,
) -> Evidence:
    """Run the model over ``data`` once and gather the evidence kinds in ``needs``.

    Args:
        adapter: drives the model (its modalities, call convention, encoders, masking).
        data: a map-style Dataset of dict items (visited in a seeded shuffled order) or a DataLoader.
        needs: evidence kinds (keys of :data:`~mmdiag.evidence.EVIDENCE_KINDS`).
        settings: caps, seeds, batch size and device.
        progress: optional callback ``progress(stage, done, total)``.

    Returns:
        The :class:`~mmdiag.evidence.Evidence`. The model's parameters, gradients, train/eval
        flags and hooks are left as they were.
    """
    s = settings or CollectSettings()
    wanted = set(needs)
    unknown = wanted - set(EVIDENCE_KINDS)
    if unknown:
        raise ConfigError(f"Unknown evidence kinds {sorted(unknown)}; known: {sorted(EVIDENCE_KINDS)}.")
    m_count = len(adapter.modalities)
    if "subsets" in wanted and (1 << m_count) > s.max_subsets:
        raise ConfigError(
            f"{m_count} modalities give {1 << m_count} subsets, more than the limit {s.max_subsets}. "
            "Raise --max-subsets if you accept the cost, or skip shapley/combinations/reliance/unimodal."
        )
    adapter.pool_mode = check_mode(s.pool)
    col = _Collector(adapter, wanted, s, progress)
    rank, world = distributed_rank()
    if world > 1 and not isinstance(data, DataLoader):
        # each process evaluates every world-th row of the shuffled order; caps are split too
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(s.seed)).tolist()  # type: ignore[arg-type]
        loader, rows = make_loader(data, s, order[rank::world])
        stats_loader, _ = make_loader(data, s, order[: s.stats_samples])  # the same rows on every rank
        col.s = s = _per_rank(s, world)
        col.world = world
    else:
        loader, rows = make_loader(data, s)
        stats_loader = loader
    n_total = len(rows) if rows is not None else None
    model = adapter.model
    original_device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.to(col.device)
    try:
        with eval_mode(model):
            first = next(iter(col._batches(loader)), None)
            if first is None:
                raise EvidenceError("The dataset is empty: there is nothing to evaluate.")
            # The adapter checks and the head detection look at a few rows: on the whole first
            # batch they would cost two extra batch forwards, half a pass on a 1k-row set.
            sample = _take(first[1], torch.arange(min(VERIFY_ROWS, int(first[2].shape[0]))))
            adapter.verify(sample)
            if not adapter.has_encoders:
                for kind in sorted(wanted & ENCODER_KINDS):
                    col.unavailable[kind] = (
                        "needs each modality's encoder output, and the model is driven as a black box: "
                        f"{adapter.black_box_reason or 'no encoders are known'}"
                    )
                wanted -= ENCODER_KINDS
            for kind, reason in check_categorical(adapter, sample, wanted).items():
                col.unavailable[kind] = reason
                col.skipped.add(kind)
                wanted.discard(kind)
            if adapter.needs_stats() or "noise_features" in wanted:
                col.estimate_stats(stats_loader)
            col.detect_concat_linear_head(sample)
            ev = _main_pass(col, loader, rows, n_total)
            if world > 1 and not isinstance(data, DataLoader):
                ev = gather_evidence(ev, world)
            return ev
    finally:
        model.to(original_device)


def _main_pass(col: _Collector, loader: DataLoader, rows: list[int] | None, n_total: int | None) -> Evidence:
    a, s, wanted = col.adapter, col.s, col.needs
    pick_feat = _pick(n_total, s.max_feature_samples, s.seed + 11)
    # under torchrun each process holds 1/world of the rows: its caps and floors are split alike
    n_grad = subsample_size(n_total, s.max_grad_samples, s.grad_fraction, -(-GRAD_FLOOR // col.world))
    # parameter gradients (an encoder forward and two encoder backwards a row) on a smaller share,
    # drawn from the same permutation, so their rows are among the feature-gradient rows
    n_param = min(n_grad, subsample_size(n_total, s.max_grad_samples, s.param_grad_fraction,
                                         -(-PARAM_GRAD_FLOOR // col.world)))
    n_attr = subsample_size(n_total, s.max_attribution_samples, s.attribution_fraction,
                            -(-ATTRIBUTION_FLOOR // col.world))
    pick_grad = _pick(n_total, n_grad, s.seed + 12)
    pick_param = _pick(n_total, n_param, s.seed + 12)
    pick_noise = _pick(n_total, s.max_noise_samples, s.seed + 13)
    pick_attr = _pick(n_total, n_attr, s.seed + 14)
    acc: dict[str, list[Any]] = {k: [] for k in (
        "labels", "logits", "index", "ood", "subsets", "feat_rows", "grad_rows", "gxa", "gxl", "cos", "cos_n",
        "noise_rows", "attr_rows", "attr", "attr_signed", "delta", "ig_steps", "perm_correct", "perm_nll", "split")}
    feats_acc: dict[str, list[Tensor]] = {m: [] for m in a.modalities}
    noise_acc: dict[str, list[Tensor]] = {m: [] for m in a.modalities}
    fused_grad_sum: list[Tensor] | None = None
    grad_rows_seen = 0
    # Attributed rows wait until they fill one Integrated-Gradients batch (rows x steps = batch
    # size): a few rows per evaluation batch would each pay captum's per-call cost. At most that
    # many rows of inputs are held.
    attr_buffer: list[tuple[dict[str, Tensor], Tensor, Tensor]] = []
    attr_chunk = max(1, s.batch_size // s.ig_steps)

    def flush_attribution() -> None:
        if not attr_buffer or "attribution" not in wanted:
            attr_buffer.clear()
            return
        sub_in = {k: torch.cat([x[0][k] for x in attr_buffer]) for k in attr_buffer[0][0]}
        sub_y = torch.cat([x[1] for x in attr_buffer])
        rows = torch.cat([x[2] for x in attr_buffer])
        attr_buffer.clear()
        try:
            mass, signed, delta, steps = col.attribution(sub_in, sub_y)
            acc["ig_steps"].append(steps)
            acc["attr"].append(mass)
            acc["attr_signed"].append(signed)
            acc["delta"].append(delta)
            acc["attr_rows"].append(rows)
        except (EvidenceError, AdapterError, RuntimeError, AssertionError) as exc:
            col._fail("attribution", exc)
    with torch.no_grad():
        for offset, inputs, labels, extras in col._batches(loader):
            b = labels.shape[0]
            if a.has_encoders:
                logits, feats = a.encode(inputs)
            else:
                logits, feats = a.call_model(inputs), None
            _check_finite(logits, "all modalities present")
            _check_labels(labels, logits.shape[1], a.output_kind)
            acc["labels"].append(labels.cpu())
            acc["logits"].append(logits.float().cpu())
            if "index" in extras:
                acc["index"].append(extras["index"].long().reshape(-1))
            elif rows is not None:
                acc["index"].append(torch.tensor(rows[offset:offset + b]))
            else:
                acc["index"].append(torch.arange(offset, offset + b))
            if "ood" in extras:
                acc["ood"].append(extras["ood"].bool().reshape(-1))
            if "subsets" in wanted:
                acc["subsets"].append(col.subsets(inputs, feats, logits).float().cpu())
            if col.head_split_cols is not None and feats is not None:
                acc["split"].append(col.head_split(feats).float().cpu())
            if "permutations" in wanted:
                c, n = col.permutations(inputs, feats, labels)
                acc["perm_correct"].append(c)
                acc["perm_nll"].append(n)
            if "features" in wanted and feats is not None:
                r = _rows_in(offset, b, pick_feat, s.max_feature_samples)
                if r.numel():
                    for m in a.modalities:
                        feats_acc[m].append(a.pooled(m, _take(feats[m], r)).float().cpu())
                    acc["feat_rows"].append(r + offset)
            r = _rows_in(offset, b, pick_grad, n_grad)
            if r.numel() and "grad_x_act" in wanted:
                try:
                    sub_feats = None if feats is None else {m: _take(feats[m], r) for m in a.modalities}
                    g = col.feature_gradients(_take(inputs, r), labels[r.to(labels.device)], sub_feats)
                    acc["gxa"].append(g["grad_x_act"])
                    acc["gxl"].append(g["grad_x_loss"])
                    acc["grad_rows"].append(r + offset)
                except (EvidenceError, AdapterError, RuntimeError) as exc:
                    col._fail("grad_x_act", exc)
            r = _rows_in(offset, b, pick_param, n_param)
            if r.numel() and "param_grads" in wanted:
                try:
                    cos, fused_grads = col.parameter_gradients(_take(inputs, r), labels[r.to(labels.device)])
                    acc["cos"].append(cos)
                    acc["cos_n"].append(r.numel())
                    weighted = [v * r.numel() for v in fused_grads]
                    fused_grad_sum = weighted if fused_grad_sum is None else [x + y for x, y in zip(fused_grad_sum, weighted)]
                    grad_rows_seen += r.numel()
                except (EvidenceError, AdapterError, RuntimeError) as exc:
                    col._fail("param_grads", exc)
            r = _rows_in(offset, b, pick_noise, s.max_noise_samples)
            if r.numel() and "noise_features" in wanted:
                try:
                    for m, f in col.noise_features(_take(inputs, r)).items():
                        noise_acc[m].append(f)
                    acc["noise_rows"].append(r + offset)
                except (EvidenceError, AdapterError, RuntimeError) as exc:
                    col._fail("noise_features", exc)
            r = _rows_in(offset, b, pick_attr, n_attr)
            if r.numel() and "attribution" in wanted:
                attr_buffer.append((_take(inputs, r), labels[r.to(labels.device)], r + offset))
                if sum(int(x[2].numel()) for x in attr_buffer) >= attr_chunk:
                    flush_attribution()
            col._tick("evaluating", offset + b, n_total)
        flush_attribution()

    def cat(key: str) -> Tensor | None:
        return torch.cat(acc[key]) if acc[key] else None

    labels = cat("labels")
    assert labels is not None
    logits = cat("logits")
    n_classes = int(logits.shape[1])  # type: ignore[union-attr]
    if torch.unique(labels).numel() < 2:
        raise EvidenceError(
            f"The evaluation data has only one class (label {int(labels[0])}): accuracy-based "
            "contributions are undefined. Evaluate on data with at least two classes."
        )
    ev = Evidence(
        modalities=a.modalities,
        n_classes=n_classes,
        labels=labels,
        logits=logits,  # type: ignore[arg-type]
        index=cat("index"),  # type: ignore[arg-type]
        subsets=torch.cat(acc["subsets"], dim=1) if acc["subsets"] else None,
        features={m: torch.cat(v) for m, v in feats_acc.items()} if acc["feat_rows"] else None,
        feature_rows=cat("feat_rows"),
        grad_x_act=cat("gxa"),
        grad_x_loss=cat("gxl"),
        grad_rows=cat("grad_rows"),
        param_grad_norm=(torch.stack([g.norm() / max(grad_rows_seen, 1) for g in fused_grad_sum])
                         if fused_grad_sum is not None else None),
        grad_cosine=torch.stack(acc["cos"]) if acc["cos"] else None,
        grad_batch_sizes=torch.tensor(acc["cos_n"]) if acc["cos_n"] else None,
        perm_correct=torch.cat(acc["perm_correct"], dim=2) if acc["perm_correct"] else None,
        perm_nll=torch.cat(acc["perm_nll"], dim=2) if acc["perm_nll"] else None,
        noise_levels=torch.tensor(s.noise_levels) if acc["noise_rows"] else None,
        noise_features={m: torch.cat(v, dim=1) for m, v in noise_acc.items()} if acc["noise_rows"] else None,
        noise_rows=cat("noise_rows"),
        attribution=cat("attr"),
        attribution_signed=cat("attr_signed"),
        attribution_delta=cat("delta"),
        attribution_rows=cat("attr_rows"),
        ood=cat("ood"),
        meta={
            **a.describe(),
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
            "device": str(col.device),
            "head_split": col.head_split_cols is not None,
            "unavailable": dict(col.unavailable),
            "skipped_kinds": sorted(col.skipped),
            "data_std": dict(col.data_std),
            "subsample_rows": {"grad": n_grad, "param_grad": n_param, "attribution": n_attr},
            **({"ig_steps_used": {str(k): v for k, v in zip(*(t.tolist() for t in torch.unique(cat("ig_steps"), return_counts=True)))}}
               if acc["ig_steps"] else {}),
        },
    )
    if acc["split"]:
        ev.head_split = torch.cat(acc["split"], dim=1)
    return ev
