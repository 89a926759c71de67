"""``noise_features``: pooled encoder features with one modality's input corrupted at a grid of
noise levels (UDML), on a seeded subsample of N/128 rows (``noise_fraction``; at least
:data:`NOISE_FLOOR`, at most ``max_noise_samples``).

Level l adds Gaussian noise of std ``noise_step * (l - 1)`` times the modality's data std (level 1
is clean); a categorical modality has its indices replaced by observed values at the matching
rate instead (see :mod:`mmdiag.categorical`).

Only what the features need runs: the clean level is the main pass's own features (level 1 adds
nothing), and the corrupted copies of a modality go through that modality's encoder alone, the
levels stacked into batches of about ``batch_size`` rows. Running the encoder alone is used when a
check on the first rows shows it exact (the model hands the encoder the raw input and nothing
else, and the encoder alone returns what it returned inside the model); otherwise the whole model
runs with the other encoders replaced by their cached clean outputs (exact whenever feature-level
replay is, which the adapter verifies). The draws come from a generator of their own.

The data's scale is estimated on the first ``stats_samples`` rows of the main pass (whole batches,
the rows the statistics pass would read), so no separate pass is needed: noise rows wait until the
estimate is complete, or until they fill a batch (the estimate then uses the rows seen so far).
When the statistics pass runs anyway (a ``mean`` or ``noise`` mask, or several processes, which
must share one scale), its estimate is used.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from mmdiag.categorical import add_donors, corrupt_categorical, corruption_rate, is_categorical
from mmdiag.collect.producer import Batch, Producer, register_producer
from mmdiag.collect.sampling import pick, rows_in, subsample_size, take
from mmdiag.evidence import EvidenceKind, FieldSpec
from mmdiag.runtime.mask_stats import MomentSums
from mmdiag.tensors import map_tensors, tensor_leaves

#: fewest rows corrupted at every noise level, whatever the fraction. The udml estimator is fitted
#: on 70% of them and read on the rest; with fewer rows its held-out Spearman comes out low (on the
#: demo data, visual, all 11 levels: 0.48 with 64 rows, 0.51 with 128, 0.61-0.64 with 192, 0.71 with
#: all 539; on the default 6 levels 0.59 with 192).
NOISE_FLOOR = 192


def noise_rows(run: Any) -> int:
    """Rows of the noise subsample (under torchrun, this process's share)."""
    s = run.settings
    rows = subsample_size(run.n_total, s.max_noise_samples, s.noise_fraction, -(-NOISE_FLOOR // run.world))
    return rows if run.n_total is None else min(rows, run.n_total)  # a floor above N: every row


def _same(a: Any, b: Any) -> bool:
    la, lb = tensor_leaves(a), tensor_leaves(b)
    return len(la) == len(lb) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.allclose(x.float(), y.float(), atol=1e-6, rtol=1e-5)
        for x, y in zip(la, lb))


def encoder_runs_alone(adapter: Any, sample: Mapping[str, Tensor], m: str) -> bool:
    """Whether ``encoder(inputs[m])`` gives modality m's features exactly, checked on ``sample``.

    True when, in a forward of the model, m's encoder is called with the very tensor ``inputs[m]``
    as its only argument (no preprocessing in between, no keyword or second input), and calling it
    alone on that tensor returns what it returned inside the model.
    """
    seen: dict[str, Any] = {}

    def record(_mod: Any, args: tuple, kwargs: dict) -> None:
        seen.setdefault("call", (args, kwargs))

    encoder = adapter.encoder_module(m)
    handle = encoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad(), adapter.capture() as captured:
            adapter.call_model(sample)
    finally:
        handle.remove()
    args, kwargs = seen.get("call", ((), {}))
    if kwargs or len(args) != 1 or args[0] is not sample[m]:
        return False
    with torch.no_grad():
        return _same(encoder(sample[m]), captured[m])


@register_producer
class NoiseProducer(Producer):
    kind = EvidenceKind(
        "noise_features", "pooled encoder features of inputs corrupted at a grid of noise levels (needs encoders)",
        (FieldSpec("noise_levels", "const"),
         FieldSpec("noise_features", "subsample", dim=1, rows="noise_rows", per_modality=True),
         FieldSpec("noise_rows", "rows")),
        present="noise_features", needs_encoders=True,
    )
    order = 70
    caps = ("max_noise_samples",)
    needs_stats = False  # the data's scale (which sets the noise std) is measured on the main pass

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.parts: dict[str, list[Tensor]] = {m: [] for m in run.adapter.modalities}
        self.rows: list[Tensor] = []
        self.donors: dict[str, Tensor] = {}
        self.alone: dict[str, bool] = {}
        self.pending: list[tuple[dict[str, Tensor], dict[str, Any], Tensor]] = []
        self.gen = torch.Generator().manual_seed(run.settings.seed + 14)
        # the scale comes from the main pass unless the statistics pass runs for the masks, or for
        # every process at once (each process sees different rows of the main pass)
        self.needs_stats = run.world > 1  # type: ignore[misc]
        self.scale_sums = MomentSums()

    def prepare(self, sample: Mapping[str, Tensor]) -> str | None:
        a = self.run.adapter
        self.alone = {m: encoder_runs_alone(a, sample, m) for m in a.modalities}
        return None

    def start(self) -> None:
        s = self.run.settings
        self.n_rows = noise_rows(self.run)
        self.chosen = pick(self.run.n_total, self.n_rows, s.seed + 13)

    def scale_ready(self) -> bool:
        """Whether the data's scale is known (measuring it on this pass's first rows until it is)."""
        return bool(self.run.data_std) or self.scale_sums.rows >= self.run.settings.stats_samples

    def finish_scale(self) -> None:
        """Each modality's data std: the std of all its values over the rows measured."""
        if not self.run.data_std and self.scale_sums.rows:
            self.run.data_std.update(self.scale_sums.overall_std())

    def accumulate(self, batch: Batch) -> None:
        if not self.scale_ready():
            self.scale_sums.add(batch.inputs, batch.size)
        r = rows_in(batch.offset, batch.size, self.chosen, self.n_rows)
        if r.numel() and batch.feats is not None:
            a = self.run.adapter
            inputs = take(batch.inputs, r)
            for m in a.modalities:
                if is_categorical(inputs[m]):  # category indices: replaced by observed values, not noised
                    self.donors[m] = add_donors(self.donors.get(m), inputs[m])
            self.pending.append((inputs, {m: take(batch.feats[m], r) for m in a.modalities}, r + batch.offset))
        s = self.run.settings
        held = sum(int(p[2].numel()) for p in self.pending)
        copies = held * sum(1 for level in s.noise_levels if level != 1)
        if held >= s.batch_size or (self.scale_ready() and copies >= s.batch_size):
            self.flush()

    def flush(self) -> None:
        """Corrupt and encode the held rows (their copies fill about one batch)."""
        if not self.pending:
            return
        self.finish_scale()
        modalities = self.run.adapter.modalities
        inputs = {m: torch.cat([p[0][m] for p in self.pending]) for m in modalities}
        feats = {m: _cat_trees([p[1][m] for p in self.pending]) for m in modalities}
        rows = torch.cat([p[2] for p in self.pending])
        self.pending = []
        with torch.no_grad():
            for m in modalities:
                self.parts[m].append(self.corrupted_features(m, inputs, feats))
        self.rows.append(rows)

    def corruption(self, m: str, x: Tensor, level: int) -> Tensor:
        """``x`` (modality m's input) corrupted at noise ``level``."""
        s = self.run.settings
        if is_categorical(x):
            return corrupt_categorical(x, corruption_rate(level, s.noise_step), self.gen, self.donors[m])
        scale = self.run.data_std.get(m, 1.0) or 1.0
        noise = torch.randn(x.shape, generator=self.gen).to(x.device)
        return (x.float() + noise * (s.noise_step * (level - 1) * scale)).to(x.dtype)

    def corrupted_features(self, m: str, inputs: Mapping[str, Tensor], feats: Mapping[str, Any]) -> Tensor:
        """[L, b, d] pooled features of m's encoder with m's input corrupted at every level."""
        a, s = self.run.adapter, self.run.settings
        b = int(inputs[m].shape[0])
        clean = a.pooled(m, feats[m]).float().cpu()
        noisy = [level for level in s.noise_levels if level != 1]
        per_forward = max(1, s.batch_size // max(b, 1))
        out: dict[int, Tensor] = {}
        for i in range(0, len(noisy), per_forward):
            group = noisy[i:i + per_forward]
            x = torch.cat([self.corruption(m, inputs[m], level) for level in group])
            pooled = a.pooled(m, self.encode(m, x, inputs, feats, len(group))).float().cpu()
            out.update(zip(group, pooled.split(b)))
        return torch.stack([clean if level == 1 else out[level] for level in s.noise_levels])

    def encode(self, m: str, x: Tensor, inputs: Mapping[str, Tensor], feats: Mapping[str, Any], copies: int) -> Any:
        """m's encoder output on ``x`` (``copies`` stacked copies of the rows of ``inputs``)."""
        a = self.run.adapter
        if self.alone.get(m):
            return a.encoder_module(m)(x)
        repeat = lambda t: t.repeat(copies, *([1] * (t.dim() - 1)))  # noqa: E731
        others = {k: map_tensors(repeat, feats[k]) for k in a.modalities if k != m}
        batch = {k: x if k == m else repeat(inputs[k]) for k in a.modalities}
        with a.capture() as captured:
            a.head_forward(batch, others)
        return captured[m]

    def finish(self) -> dict[str, Any]:
        if not self.rows:
            return {}
        return {"noise_levels": torch.tensor(self.run.settings.noise_levels),
                "noise_features": {m: torch.cat(v, dim=1) for m, v in self.parts.items()},
                "noise_rows": torch.cat(self.rows)}

    def meta(self) -> dict[str, Any]:
        return {"subsample_rows": {"noise": self.n_rows}}


def _cat_trees(parts: list[Any]) -> Any:
    """Row-wise concatenation of encoder outputs of one structure (tensors or trees of tensors)."""
    if len(parts) == 1:
        return parts[0]
    leaves = [tensor_leaves(p) for p in parts]
    joined = iter([torch.cat(group) for group in zip(*leaves)])
    return map_tensors(lambda _t: next(joined), parts[0])
