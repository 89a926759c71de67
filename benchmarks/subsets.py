"""Table 2: all-subset logits through cached encoder features against one forward per subset."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from benchmarks.timing import median_timing
from benchmarks.workload import BenchNet, Sizes, adapter_for, in_memory, make_model
from mmdiag.adapter import ModelAdapter
from mmdiag.evidence import members

#: speedup wanted at M = 4
TARGET_SUBSET_M4 = 8.0


def naive_subsets(model: BenchNet, batch: Mapping[str, Tensor], m_names: Sequence[str]) -> Tensor:
    """[2^M, B, C]: one full forward per subset, the masked encoders' outputs zeroed by forward hooks."""
    out = []
    for mask in range(1 << len(m_names)):
        present = set(members(mask, m_names))
        handles = [model.encoders[m].register_forward_hook(lambda _mod, _inp, o: torch.zeros_like(o))
                   for m in m_names if m not in present]
        try:
            out.append(model(batch))
        finally:
            for h in handles:
                h.remove()
    return torch.stack(out)


def mmdiag_subsets(adapter: ModelAdapter, batch: Mapping[str, Tensor]) -> Tensor:
    """[2^M, B, C]: one encoder pass, then the head on cached (masked) features for every subset."""
    logits, feats = adapter.encode(batch)
    full = (1 << len(adapter.modalities)) - 1
    return torch.stack([logits if mask == full else adapter.subset_logits(batch, members(mask, adapter.modalities), feats)
                        for mask in range(full + 1)])


def bench_subsets(sizes: Sizes, device: torch.device, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for m_count in sizes.subset_m:
        model = make_model(m_count, sizes.image, train_steps=0).to(device)
        adapter = adapter_for(model)
        data = in_memory(sizes.subset_n, m_count, sizes.image)
        batches = [{k: v.to(device) for k, v in b.items() if k != "label"} for b in DataLoader(data, batch_size=256)]

        def run(fn: Callable[[Any], Tensor]) -> Tensor:
            with torch.no_grad():
                return torch.cat([fn(b) for b in batches], dim=1)

        a = run(lambda b: mmdiag_subsets(adapter, b))
        b = run(lambda b: naive_subsets(model, b, model.modalities))
        diff = float((a - b).abs().max())
        if not torch.allclose(a, b, atol=1e-5, rtol=1e-5):
            raise AssertionError(f"subset logits disagree at M={m_count}: max abs diff {diff}")
        _, fast = median_timing(lambda: run(lambda b: mmdiag_subsets(adapter, b)), sizes.repeats)
        _, slow = median_timing(lambda: run(lambda b: naive_subsets(model, b, model.modalities)), sizes.repeats)
        rows.append({"M": m_count, "subsets": 1 << m_count, "N": sizes.subset_n, "naive_s": slow.wall,
                     "mmdiag_s": fast.wall, "speedup": slow.wall / fast.wall, "cpu_speedup": slow.cpu / max(fast.cpu, 1e-9),
                     "max_abs_diff": diff})
        log(f"  subsets M={m_count}: naive {slow.wall:.3f}s, mmdiag {fast.wall:.3f}s ({slow.wall / fast.wall:.1f}x), "
            f"max |diff| {diff:.1e}")
    return rows
