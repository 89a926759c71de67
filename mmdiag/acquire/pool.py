"""The one pass over a pool: fused logits, the logits of every modality subset and the
per-modality gradient embeddings, read from the modality inputs only (never from labels)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mmdiag.acquire.embeddings import choose_method, embed_batch
from mmdiag.adapter import ModelAdapter
from mmdiag.collect.checks import eval_mode
from mmdiag.collect.run import VERIFY_ROWS
from mmdiag.collect.settings import CollectSettings
from mmdiag.errors import ConfigError, EvidenceError
from mmdiag.evidence import members
from mmdiag.runtime.device import resolve_device
from mmdiag.runtime.mask_stats import estimate_mask_stats

ProgressFn = Callable[[str, int, "int | None"], None]

#: most modalities whose 2^M subsets a pool pass evaluates (2^8 = 256 head calls per batch)
MAX_MODALITIES = 8


@dataclass
class PoolPass:
    """What one pass over the pool gives.

    Attributes:
        logits: [N, K] fused logits.
        subsets: [2^M, N, K] logits of every subset (bit j = modality j present; the last is all).
        embeddings: per modality, [N, D_m] gradient embeddings (see :mod:`mmdiag.acquire.embeddings`).
        method: how the embeddings were made; warnings: changes of method, with their causes.
    """

    modalities: tuple[str, ...]
    logits: np.ndarray
    subsets: np.ndarray
    embeddings: list[np.ndarray]
    method: str
    warnings: list[str] = field(default_factory=list)

    def singleton(self, j: int) -> np.ndarray:
        """[N, K] logits with only modality j present."""
        return self.subsets[1 << j]


def pool_inputs(pool: Any, modalities: Sequence[str]) -> dict[str, Tensor]:
    """Modality -> [N, ...] tensor of the pool, reading only the modality entries.

    ``pool``: a mapping of arrays (a ``label`` entry may be there or not: it is not read), a
    dataset with ``arrays`` (mmdiag's ArrayDataset), or any sized dataset of dict items.
    """
    if isinstance(pool, Mapping) or hasattr(pool, "arrays"):
        source = pool if isinstance(pool, Mapping) else pool.arrays
        missing = [m for m in modalities if m not in source]
        if missing:
            raise ConfigError(f"The pool has no array for modality {', '.join(missing)}; expected one per "
                              f"modality ({', '.join(modalities)}).")
        out = {m: torch.as_tensor(np.asarray(source[m])) for m in modalities}
    else:
        items = [pool[i] for i in range(len(pool))]
        if not items:
            raise ConfigError("The pool is empty; expected at least one sample.")
        out = {m: torch.stack([torch.as_tensor(item[m]) for item in items]) for m in modalities}
    sizes = {m: int(t.shape[0]) for m, t in out.items()}
    if len(set(sizes.values())) != 1:
        raise ConfigError(f"The pool's modality arrays have different numbers of rows: {sizes}.")
    if next(iter(sizes.values())) == 0:
        raise ConfigError("The pool is empty; expected at least one sample.")
    for m, t in out.items():
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise EvidenceError(f"The pool's {m} array holds NaN or Inf; expected finite inputs. Drop those rows.")
    return out


def prepare_adapter(adapter: ModelAdapter, inputs: Mapping[str, Tensor], batch_size: int, device: torch.device) -> None:
    """Verify the adapter on a few rows and estimate the mean/noise mask statistics of these
    inputs if the mask needs them (on the first ``stats_samples`` rows, as ``collect`` does for the
    data it evaluates)."""
    sample = {m: t[:VERIFY_ROWS].to(device) for m, t in inputs.items()}
    adapter.verify(sample)
    if adapter.needs_stats():
        rows = min(next(iter(inputs.values())).shape[0], CollectSettings().stats_samples)
        batches = ({m: t[start:start + batch_size].to(device) for m, t in inputs.items()}
                   for start in range(0, rows, batch_size))
        estimate_mask_stats(adapter, batches, rows)


def pool_pass(adapter: ModelAdapter, pool: Any, *, batch_size: int = 256, device: str = "auto", seed: int = 0,
              progress: ProgressFn | None = None) -> PoolPass:
    """Run the model over the pool once (eval mode, no label read) and gather :class:`PoolPass`.

    Cost: one forward per row, plus 2^M − 1 fusion-head calls per row with feature-level masking
    (2^M − 1 full forwards with input masking), plus one head backward per row for the
    ``feature_gradient`` embedding.
    """
    mods = adapter.modalities
    if len(mods) > MAX_MODALITIES:
        raise ConfigError(f"A pool pass evaluates all 2^M modality subsets; {len(mods)} modalities give "
                          f"{1 << len(mods)}, more than 2^{MAX_MODALITIES}. Select at most {MAX_MODALITIES} `modalities`.")
    inputs = pool_inputs(pool, mods)
    dev = resolve_device(device)
    n = next(iter(inputs.values())).shape[0]
    model = adapter.model
    original = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.to(dev)
    gen = torch.Generator().manual_seed(seed + 1)
    logits, subsets, embeds = [], [], [[] for _ in mods]
    try:
        with eval_mode(model):
            prepare_adapter(adapter, inputs, batch_size, dev)
            method, warning = choose_method(adapter, {m: t[:VERIFY_ROWS].to(dev) for m, t in inputs.items()})
            for start in range(0, n, batch_size):
                batch = {m: t[start:start + batch_size].to(dev) for m, t in inputs.items()}
                with torch.no_grad():
                    z, feats = adapter.encode(batch) if adapter.has_encoders else (adapter.call_model(batch), None)
                    subs = [adapter.subset_logits(batch, members(s, mods), feats, gen) if s != (1 << len(mods)) - 1
                            else z for s in range(1 << len(mods))]
                readouts = {m: subs[1 << j] for j, m in enumerate(mods)}
                for j, g in enumerate(embed_batch(adapter, method, batch, z, feats, readouts)):
                    embeds[j].append(g.cpu().numpy())
                logits.append(z.double().cpu().numpy())
                subsets.append(torch.stack(subs).double().cpu().numpy())
                if progress is not None:
                    progress("scoring the pool", min(n, start + batch_size), n)
    finally:
        model.to(original)
    warnings = list(adapter.warnings) + ([warning] if warning else [])
    return PoolPass(mods, np.concatenate(logits), np.concatenate(subsets, axis=1),
                    [np.concatenate(e) for e in embeds], method, warnings)
