"""mmdiag performance harness: what an analysis costs, and where the time goes.

Measures, in one run, side by side (medians of ``--repeats`` runs; wall-clock and process CPU time):

1. **Analysis cost ratio**: ``mmdiag.analyze`` (the default suite without ``udml`` and ``probe``,
   and the full default suite) divided by one plain evaluation pass (forward only, no grad, same
   batch size, same DataLoader) of the same model over the same data, for M modalities and N
   samples; plus each evidence kind's marginal collection time (``collect`` with that kind alone,
   minus ``collect`` with no extra kind) and each diagnostic's ``compute`` time, and a cProfile of
   the analysis.
2. **Subset evaluation**: logits of all 2^M modality subsets the mmdiag way (one encoder pass, then
   the fusion head on cached features through encoder stubs, ``ModelAdapter.subset_logits``) versus
   the naive way (one full forward per subset with a forward hook zeroing the masked encoders'
   outputs); the values must agree (checked with ``allclose``; max abs difference reported).
3. **Fix overhead**: time per training step of every registered fix (``fix_step`` + backward +
   ``after_backward`` + ``optimizer.step``) over a plain step (fix ``none``) on the same model and batch.
4. **Scaling**: analyze wall time and peak memory as N grows, streaming a map-style Dataset that
   generates samples on the fly (nothing held in memory); each size runs in a fresh process so the
   peak RSS is its own; bytes of evidence per sample.
5. **GPU**: sections 1, 2 and 4 on CUDA with throughput and utilisation, when a GPU is visible.

    python benchmarks/run.py                 # default sizes (a few minutes on two CPU cores)
    python benchmarks/run.py --quick         # tiny sizes (smoke test)
    python benchmarks/run.py --out DIR       # results.md, results.png, results.json in DIR

Benchmarks are not tests: nothing here asserts a timing; targets are reported as met or missed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


def _cap_native_threads(argv: Sequence[str]) -> None:
    """``--threads N`` caps numpy's BLAS and OpenMP pools too, not only torch's (set before numpy
    loads: the pools read these variables once). Without it numpy's BLAS threads keep spinning
    after the analysis's small matrix products and their busy-wait is billed to whatever runs next."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else (
            argv[i + 1] if arg == "--threads" and i + 1 < len(argv) else None)
        if value:
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ.setdefault(var, value)


if __name__ == "__main__":
    _cap_native_threads(sys.argv[1:])

import numpy as np  # noqa: E402
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import mmdiag
from mmdiag.adapter import ModelAdapter
from mmdiag.api import select_diagnostics, build_diagnostics
from mmdiag.collect import CollectSettings, collect
from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.evidence import members
from mmdiag.fixes import FIXES
from mmdiag.fixes.base import FixContext, fix_step
from mmdiag.stats import shared_resamples

HERE = Path(__file__).resolve().parent
TARGET_COST = 3.0
TARGET_SUBSET_M4 = 8.0
FIX_TARGETS = {"ogm_ge": 1.10, "arl": 1.10, "cal": 1.10, "agm": 1.5, "mmpareto": 1.5, "udml": 1.5}
HEADERS = ("## 1. Analysis cost ratio", "## 2. Subset evaluation", "## 3. Fix overhead", "## 4. Scaling", "## 5. GPU")


# ============================================================================ sizes
@dataclass
class Sizes:
    #: (M, N) pairs of table 1: every M in 2..4 at every N in 1k, 5k, 20k
    cost_grid: tuple[tuple[int, int], ...] = tuple((m, n) for m in (2, 3, 4) for n in (1000, 5000, 20000))
    #: runs of the one-off columns (full suite, no bootstrap) and of the breakdown
    extra_repeats: int = 1
    subset_m: tuple[int, ...] = (2, 3, 4, 5, 6)
    subset_n: int = 1024
    #: steps per fix and round (fixes take turns for max(repeats, 5) rounds)
    fix_steps: int = 10
    fix_batch: int = 64
    scaling_n: tuple[int, ...] = (1000, 10000, 100000)
    repeats: int = 3
    image: int = 16
    fix_image: int = 32
    scaling_image: int = 8
    profile: bool = True
    subprocess_scaling: bool = True
    #: Adam steps (batch 64) that train the analysed models before they are measured
    train_steps: int = 60
    #: bootstrap resamples of the analyses (1000 = mmdiag's default)
    bootstrap: int = 1000
    #: CollectSettings overrides (none: mmdiag's defaults)
    caps: tuple[tuple[str, Any], ...] = ()

    def collect_settings(self, device: torch.device | str) -> CollectSettings:
        return CollectSettings(device=str(device), **dict(self.caps))


#: tiny sizes and caps for the smoke test: the numbers mean nothing, the code paths all run
QUICK = Sizes(cost_grid=((2, 64),), subset_m=(2, 4), subset_n=64, fix_steps=1, fix_batch=8,
              scaling_n=(32, 64), repeats=1, image=8, fix_image=8, scaling_image=8, profile=False,
              subprocess_scaling=False, bootstrap=20, train_steps=2,
              caps=(("max_attribution_samples", 8), ("ig_steps", 4), ("max_noise_samples", 16),
                    ("noise_levels", (1, 2, 3)), ("max_feature_samples", 64), ("max_grad_samples", 16),
                    ("permutations", 1)))


# ============================================================================ model and data
def conv_encoder(size: int, feat: int) -> nn.Sequential:
    """1 x size x size -> feat: two 3x3 conv blocks, global pooling, a linear layer."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4, feat), nn.ReLU(),
    )


class BenchNet(nn.Module):
    """M convolutional encoders (``encoders.<m>``) and a linear concat head; takes one dict."""

    def __init__(self, modalities: Sequence[str], size: int = 16, feat: int = 32, n_classes: int = 4) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.encoders = nn.ModuleDict({m: conv_encoder(size, feat) for m in self.modalities})
        self.head = nn.Linear(len(self.modalities) * feat, n_classes)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.head(torch.cat([self.encoders[m](inputs[m]) for m in self.modalities], dim=1))


def names(m_count: int) -> tuple[str, ...]:
    return tuple(f"m{j}" for j in range(m_count))


def strengths(m_count: int) -> list[float]:
    """The first modality carries the most label signal (a dominance to find)."""
    return [2.0] + [0.8] * (m_count - 1)


class StreamingDataset(Dataset):
    """A map-style Dataset that makes sample ``i`` on the fly (class prototype + noise, seeded by i).

    Nothing but the prototypes is held in memory, so the dataset can be as long as wanted.
    """

    def __init__(self, n: int, m_count: int, size: int, n_classes: int = 4, seed: int = 0) -> None:
        self.n, self.size, self.n_classes, self.seed = n, size, n_classes, seed
        self.modalities = names(m_count)
        g = torch.Generator().manual_seed(seed)
        self.protos = torch.randn(n_classes, m_count, 1, size, size, generator=g)
        self.scale = torch.tensor(strengths(m_count)).view(1, m_count, 1, 1, 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        y = int(torch.randint(self.n_classes, (1,), generator=g))
        x = self.scale[0] * self.protos[y] + torch.randn(len(self.modalities), 1, self.size, self.size, generator=g)
        return {**{m: x[j] for j, m in enumerate(self.modalities)}, "label": torch.tensor(y)}


def in_memory(n: int, m_count: int, size: int, seed: int = 0) -> Dataset:
    """The same samples materialised as arrays, wrapped the way ``mmdiag.analyze`` wraps a dict of arrays."""
    from mmdiag.loading import dataset_from_arrays

    stream = StreamingDataset(n, m_count, size, seed=seed)
    batch = next(iter(DataLoader(stream, batch_size=n)))
    arrays = {k: v.numpy() for k, v in batch.items()}
    return dataset_from_arrays(arrays, list(stream.modalities))


def make_model(m_count: int, size: int, seed: int = 0, train_steps: int = 60) -> BenchNet:
    """A briefly trained BenchNet (so that the diagnostics see a model that has learned something)."""
    torch.manual_seed(seed)
    model = BenchNet(names(m_count), size=size)
    if train_steps:
        data = StreamingDataset(64 * train_steps, m_count, size, seed=seed + 99)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for batch in DataLoader(data, batch_size=64):
            y = batch.pop("label")
            loss = F.cross_entropy(model(batch), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def adapter_for(model: BenchNet) -> ModelAdapter:
    return ModelAdapter(model, tuple(model.modalities), call="dict",
                        encoders={m: f"encoders.{m}" for m in model.modalities}, head="head")


# ============================================================================ timing helpers
@dataclass
class Timing:
    wall: float
    cpu: float


def timed(fn: Callable[[], Any]) -> tuple[Any, Timing]:
    sync()
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return out, Timing(time.perf_counter() - w, time.process_time() - c)


#: seconds after which a measurement is not repeated further (its median is over the runs done)
BUDGET_S = 40.0


#: seconds after which the breakdown's rounds (every evidence kind once) stop repeating
BREAKDOWN_BUDGET_S = 180.0

#: short measurements repeat until their runs add up to this many seconds (at most SHORT_RUNS runs)
SHORT_TOTAL_S = 2.0
SHORT_RUNS = 15


def interleaved_timings(fns: Sequence[Callable[[], Any]], repeats: int,
                        budget_s: float | None = None) -> list[tuple[Any, Timing]]:
    """Median wall and CPU time of each of ``fns``, run in turns (one run of each per round).

    Turns, not one function's runs and then the next's: the functions then share the machine's
    state (other load, CPU clocks, and the C allocator's, whose free list after a large free makes
    small-tensor forwards up to 1.5x faster), so their ratio does not depend on which ran first.
    ``repeats`` rounds or more: like timeit's autorange, rounds whose runs are short repeat until
    each function's runs add up to ``SHORT_TOTAL_S`` (at most ``SHORT_RUNS`` rounds), because the
    median of three 0.1 s runs moves with every scheduler hiccup on a shared machine. No new round
    starts once ``budget_s`` is spent. ``repeats = 1`` means one round.
    """
    budget = BUDGET_S if budget_s is None else budget_s
    outs: list[Any] = [None] * len(fns)
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    while True:
        for j, fn in enumerate(fns):
            outs[j], t = timed(fn)
            walls[j].append(t.wall)
            cpus[j].append(t.cpu)
        rounds = len(walls[0])
        short = min(sum(w) for w in walls) >= SHORT_TOTAL_S or rounds >= SHORT_RUNS
        if (rounds >= max(1, repeats) and (repeats <= 1 or short)) or sum(map(sum, walls)) >= budget:
            break
    return [(out, Timing(statistics.median(w), statistics.median(c))) for out, w, c in zip(outs, walls, cpus)]


def median_timing(fn: Callable[[], Any], repeats: int, budget_s: float | None = None) -> tuple[Any, Timing]:
    """Median wall and CPU time of ``fn`` over ``repeats`` runs or more (see :func:`interleaved_timings`)."""
    return interleaved_timings([fn], repeats, budget_s)[0]


class UtilSampler:
    """Mean GPU utilisation (``torch.cuda.utilization``, percent) sampled every 50 ms while the block runs."""

    def __init__(self, device: torch.device) -> None:
        self.active = device.type == "cuda"
        self.samples: list[float] = []
        self.mean: float | None = None

    def __enter__(self) -> "UtilSampler":
        if self.active:
            import threading

            self._stop = threading.Event()

            def poll() -> None:
                while not self._stop.is_set():
                    with contextlib.suppress(Exception):
                        self.samples.append(float(torch.cuda.utilization()))
                    self._stop.wait(0.05)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            self._stop.set()
            self._thread.join()
            self.mean = statistics.fmean(self.samples) if self.samples else None


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def plain_pass(model: nn.Module, data: Dataset, batch_size: int, device: torch.device) -> int:
    """One evaluation pass: forward only, no grad, the DataLoader mmdiag would use."""
    n = 0
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=batch_size):
            y = batch.pop("label")
            model({k: v.to(device) for k, v in batch.items()})
            n += len(y)
    return n


def default_needs(skip: Sequence[str] = ()) -> set[str]:
    return set().union(*(DIAGNOSTICS.get(n).needs for n in select_diagnostics(skip=list(skip))))


def evidence_bytes(ev: Any) -> int:
    """Total bytes of the tensors an Evidence holds (nested dicts/lists included)."""
    def size(obj: Any) -> int:
        if isinstance(obj, Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, Mapping):
            return sum(size(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(size(v) for v in obj)
        return 0
    return sum(size(v) for k, v in ev.to_dict().items() if k != "meta")


# ============================================================================ 1. cost ratio
def bench_cost(sizes: Sizes, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    rows, breakdown, profile_text = [], [], ""
    skip = ["udml", "probe"]
    cs = sizes.collect_settings(device)
    models: dict[int, BenchNet] = {}
    for m_count, n in sizes.cost_grid:
        if m_count not in models:
            models[m_count] = make_model(m_count, sizes.image, train_steps=sizes.train_steps).to(device)
        model = models[m_count]
        data = in_memory(n, m_count, sizes.image)

        def run(sk: Sequence[str] | None, bootstrap: int = sizes.bootstrap) -> Any:
            return mmdiag.analyze(model, data, skip=sk, collect_settings=cs, bootstrap=bootstrap)

        plain_pass(model, data, cs.batch_size, device)  # warm-up of both
        run(skip)
        (_, plain), (report, core) = interleaved_timings(
            [lambda: plain_pass(model, data, cs.batch_size, device), lambda: run(skip)], sizes.repeats)
        with UtilSampler(device) as util:  # a separate run: utilisation of the analysis alone
            if util.active:
                run(skip)
        _, core0 = median_timing(lambda: run(skip, 0), sizes.extra_repeats)
        _, full = median_timing(lambda: run(None), sizes.extra_repeats)
        row = {"M": m_count, "N": n, "plain_s": plain.wall, "plain_cpu_s": plain.cpu,
               "core_s": core.wall, "core_cpu_s": core.cpu, "full_s": full.wall, "full_cpu_s": full.cpu,
               "core_ratio": core.wall / plain.wall, "core_cpu_ratio": core.cpu / plain.cpu,
               "core_noboot_s": core0.wall, "core_noboot_ratio": core0.wall / plain.wall,
               "core_noboot_cpu_ratio": core0.cpu / plain.cpu,
               "full_ratio": full.wall / plain.wall, "full_cpu_ratio": full.cpu / plain.cpu,
               "failures": [f.diagnostic for f in report.failures],
               "throughput_plain": n / plain.wall, "throughput_core": n / core.wall, "gpu_util": util.mean}
        rows.append(row)
        log(f"  cost M={m_count} N={n}: plain {plain.wall:.2f}s, core {core.wall:.2f}s ({row['core_ratio']:.1f}x; "
            f"cpu {row['core_cpu_ratio']:.1f}x; without bootstrap {row['core_noboot_ratio']:.1f}x), "
            f"full {full.wall:.2f}s ({row['full_ratio']:.1f}x)")
    # where the time goes, at the largest configuration: evidence kinds one at a time, then each compute()
    m_count, n = max(sizes.cost_grid)
    model = models[m_count]
    data = in_memory(n, m_count, sizes.image)
    adapter = adapter_for(model)
    reps = sizes.extra_repeats
    # The plain pass, the main pass alone and the main pass with each kind take turns, so that a
    # marginal time (a difference of two runs of several seconds) is not a change of machine load.
    order = sorted(default_needs())
    timings = interleaved_timings(
        [lambda: plain_pass(model, data, cs.batch_size, device), lambda: collect(adapter, data, set(), cs)]
        + [lambda kind=kind: collect(adapter, data, {kind}, cs) for kind in order],
        sizes.repeats, budget_s=BREAKDOWN_BUDGET_S)
    plain, base = timings[0][1], timings[1][1]
    kinds: dict[str, dict[str, float]] = {"(main pass: logits only)": {"wall": base.wall, "cpu": base.cpu}}
    for kind, (_, t) in zip(order, timings[2:]):
        kinds[kind] = {"wall": t.wall - base.wall, "cpu": t.cpu - base.cpu}
    ev = collect(adapter, data, default_needs(), cs)
    computes: dict[str, dict[str, float]] = {}
    prior: dict[str, Any] = {}
    with shared_resamples():  # as in analyze: the diagnostics share one set of bootstrap resamples
        for d in build_diagnostics(select_diagnostics(), bootstrap=sizes.bootstrap):
            res, t = median_timing(lambda: d.compute(ev, prior), reps)
            prior[d.name] = res
            computes[d.name] = {"wall": t.wall, "cpu": t.cpu}
    breakdown.append({"M": m_count, "N": n, "plain_s": plain.wall, "plain_cpu_s": plain.cpu,
                      "collect": kinds, "compute": computes})
    if sizes.profile:
        prof = cProfile.Profile()
        prof.enable()
        mmdiag.analyze(model, data, skip=skip, collect_settings=cs, bootstrap=sizes.bootstrap)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(18)
        text = [line for line in buf.getvalue().splitlines() if line.strip()]
        profile_text = f"M={m_count}, N={n}, default suite without udml/probe, top 18 by own time:\n" + "\n".join(text)
    return {"rows": rows, "breakdown": breakdown, "profile": profile_text}


# ============================================================================ 2. subsets
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


# ============================================================================ 3. fixes
class _FixRun:
    """One fix set up on its own copy of the model, ready to take timed training steps."""

    def __init__(self, name: str, base: nn.Module, inputs: dict[str, Tensor], labels: Tensor,
                 device: torch.device, steps: int) -> None:
        from mmdiag.rebalance import make_fix

        self.name, self.inputs, self.labels = name, inputs, labels
        self.model = copy.deepcopy(base).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        torch.manual_seed(0)
        self.fix = make_fix(name, {})
        self.ctx = FixContext(adapter=adapter_for(self.model), optimizer=self.opt, epochs=20, n_classes=4,
                              device=device, steps_per_epoch=steps)
        self.index = 0
        self.fix.setup(self.ctx)

    def step(self, epoch: int) -> None:
        s = fix_step(self.ctx, self.fix, self.inputs, self.labels, epoch, self.index)
        self.opt.zero_grad()
        s.loss.backward()
        self.fix.after_backward(self.ctx, s)
        self.opt.step()
        self.index += 1


def bench_fixes(sizes: Sizes, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """Rounds of ``fix_steps`` steps of every fix in turn; per round, each fix's time over the plain
    step's time in the same round (so a change of background load hits both); medians over rounds."""
    m_count = 2
    base = make_model(m_count, sizes.fix_image, train_steps=0).to(device)
    data = StreamingDataset(sizes.fix_batch, m_count, sizes.fix_image)
    batch = next(iter(DataLoader(data, batch_size=sizes.fix_batch)))
    labels = batch.pop("label").to(device)
    inputs = {k: v.to(device) for k, v in batch.items()}
    expected = [n for n in ("ogm_ge", "agm", "arl", "cal", "mmpareto", "udml", "mdacl", "modality_dropout")
                if n not in FIXES.names()]
    errors: dict[str, str] = {}
    runs: dict[str, _FixRun] = {}
    for name in FIXES.names():
        try:
            run = _FixRun(name, base, inputs, labels, device, sizes.fix_steps)
            # epochs 5 and 6: past every fix's warm-up (arl start=5, cal warmup=5, dropout begin=1)
            for _ in range(3):
                run.step(5)
            run.fix.on_epoch_end(run.ctx, 5)
            runs[name] = run
        except Exception as exc:  # noqa: BLE001 - report, do not die
            errors[name] = f"{type(exc).__name__}: {exc}"

    raw_model = copy.deepcopy(base).train()
    raw_opt = torch.optim.SGD(raw_model.parameters(), lr=1e-3, momentum=0.9)

    def raw_step() -> None:
        loss = F.cross_entropy(raw_model(inputs), labels)
        raw_opt.zero_grad()
        loss.backward()
        raw_opt.step()

    times: dict[str, list[Timing]] = {n: [] for n in [*runs, "(raw)"]}
    rounds = max(sizes.repeats, 5) if sizes.fix_steps > 1 else 1
    for _ in range(rounds):
        _, t = timed(lambda: [raw_step() for _ in range(sizes.fix_steps)])
        times["(raw)"].append(t)
        for name, run in list(runs.items()):
            try:
                _, t = timed(lambda: [run.step(6) for _ in range(sizes.fix_steps)])
                times[name].append(t)
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"{type(exc).__name__}: {exc}"
                runs.pop(name)
    for run in runs.values():
        run.fix.teardown(run.ctx)

    rows: list[dict[str, Any]] = []
    base_times = times.get("none", [])
    for name in FIXES.names():
        if name in errors:
            rows.append({"fix": name, "error": errors[name]})
            continue
        ts = times[name]
        row: dict[str, Any] = {"fix": name, "step_ms": statistics.median(t.wall for t in ts) / sizes.fix_steps * 1e3,
                               "cpu_ms": statistics.median(t.cpu for t in ts) / sizes.fix_steps * 1e3}
        if base_times:
            row["ratio"] = statistics.median(t.wall / b.wall for t, b in zip(ts, base_times))
            row["cpu_ratio"] = statistics.median(t.cpu / b.cpu for t, b in zip(ts, base_times) if b.cpu > 0)
            lo, hi = min(t.wall / b.wall for t, b in zip(ts, base_times)), max(t.wall / b.wall for t, b in zip(ts, base_times))
            row["ratio_range"] = [lo, hi]
        row["target"] = FIX_TARGETS.get(name)
        row["met"] = None if row["target"] is None or "ratio" not in row else row["ratio"] <= row["target"]
        rows.append(row)
    for r in rows:
        log(f"  fix {r['fix']}: " + (f"{r['step_ms']:.1f} ms/step ({r.get('ratio', float('nan')):.2f}x)"
                                    if "step_ms" in r else r["error"]))
    raw_ms = statistics.median(t.wall for t in times["(raw)"]) / sizes.fix_steps * 1e3
    return {"rows": rows, "raw_ms": raw_ms, "not_registered": expected, "batch": sizes.fix_batch,
            "image": sizes.fix_image, "steps": sizes.fix_steps, "rounds": rounds}


# ============================================================================ 4. scaling
def scaling_point(n: int, size: int, device: str, seed: int = 0, sizes: Sizes | None = None) -> dict[str, Any]:
    """One size: time the analysis (streamed data), then its Python-allocation peak under tracemalloc."""
    sizes = sizes or Sizes()
    model = make_model(2, size, seed=seed, train_steps=sizes.train_steps).to(torch.device(device))
    data = StreamingDataset(n, 2, size, seed=seed)
    cs = sizes.collect_settings(device)
    rss_before = _rss_now()
    (report, ev), t = timed(lambda: mmdiag.analyze(model, data, collect_settings=cs, return_evidence=True,
                                                  bootstrap=sizes.bootstrap))
    peak_rss = _peak_rss()
    bytes_ev = evidence_bytes(ev)
    tracemalloc.start()
    mmdiag.analyze(model, data, collect_settings=cs, bootstrap=sizes.bootstrap)
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {"N": n, "time_s": t.wall, "cpu_s": t.cpu, "rss_before_mb": rss_before / 2**20,
           "peak_rss_mb": peak_rss / 2**20, "tracemalloc_peak_mb": py_peak / 2**20,
           "evidence_bytes": bytes_ev, "evidence_bytes_per_sample": bytes_ev / n,
           "failures": [f.diagnostic for f in report.failures]}
    if device.startswith("cuda"):
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _proc_status(key: str) -> int | None:
    """A ``/proc/self/status`` memory line in bytes (Linux), else None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def _rss_now() -> int:
    now = _proc_status("VmRSS")
    return now if now is not None else _peak_rss()


def _peak_rss() -> int:
    """Peak resident set of this process.

    VmHWM where Linux has it: ``getrusage``'s ``ru_maxrss`` survives fork + exec, so in a worker
    started by a big parent it reports the parent's size at the fork, not the worker's own peak.
    """
    hwm = _proc_status("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def bench_scaling(sizes: Sizes, device: torch.device, threads: int | None, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes.scaling_n:
        if sizes.subprocess_scaling:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--scaling-worker", str(n),
                   "--scaling-image", str(sizes.scaling_image), "--device", str(device)]
            if threads:
                cmd += ["--threads", str(threads)]
            proc = subprocess.run(cmd, text=True, capture_output=True)
            if proc.returncode != 0:
                raise RuntimeError(f"scaling worker N={n} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            row = scaling_point(n, sizes.scaling_image, str(device), sizes=sizes)
        rows.append(row)
        log(f"  scaling N={n}: {row['time_s']:.1f}s ({row['time_s'] / n * 1e6:.0f} us/sample), peak RSS "
            f"{row['peak_rss_mb']:.0f} MB (before {row['rss_before_mb']:.0f} MB), evidence "
            f"{row['evidence_bytes_per_sample']:.0f} B/sample")
    return rows


# ============================================================================ machine
def machine(threads: int | None) -> dict[str, Any]:
    info = {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "mmdiag": mmdiag.__version__, "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "threads_flag": threads,
        "cuda_available": torch.cuda.is_available(),
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ============================================================================ report
def fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not np.isfinite(v):
        return "-"
    return format(v, spec)


def write_markdown(res: dict[str, Any], path: Path) -> None:
    m = res["machine"]
    lines = ["# mmdiag benchmark results", "",
             f"Generated by `python benchmarks/run.py{' --quick' if res['quick'] else ''}` on {res['date']}.", "",
             "| machine | |", "|---|---|"]
    for k in ("platform", "processor", "cpu_count", "torch_threads", "python", "torch", "numpy", "mmdiag",
              "cuda_available", "gpu", "load_average"):
        if k in m:
            lines.append(f"| {k} | {m[k]} |")
    lines += ["", f"Times are medians of {res['repeats']} run(s) (fewer for a measurement whose runs pass {BUDGET_S:g} s); `wall` is wall-clock, `cpu` is process CPU time "
              "(less sensitive to other load on a shared machine). Load average at the start: "
              f"{m.get('load_average', 'n/a')}.", ""]

    lines += [HEADERS[0], "",
              f"Wall time of `mmdiag.analyze` over one plain evaluation pass (forward only, no grad, batch 256, "
              f"same DataLoader) of a model with M convolutional encoders over N in-memory samples. "
              f"*core* = the default suite without `udml` and `probe` (target <= {TARGET_COST:g}x); "
              f"*full* = the whole default suite. Bootstrap: {res['sizes']['bootstrap']} resamples"
              f"{' (the default)' if res['sizes']['bootstrap'] == 1000 else ''}; collect caps: "
              f"{dict(res['sizes']['caps']) or 'the defaults'}.", "",
              f"Plain and core are medians of {res['repeats']} or more runs, taken in turns (plain, core, plain, ...) "
              "after a warm-up of each, so both see the same machine and allocator state; *core, bootstrap 0* (the same suite with "
              f"`bootstrap=0`, no intervals) and *full* of {res['sizes']['extra_repeats']}.", "",
              "| M | N | plain s | core s | core ratio | core cpu ratio | core, bootstrap 0: ratio | full s | full ratio | full cpu ratio | core target met |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["cost"]["rows"]:
        lines.append(f"| {r['M']} | {r['N']} | {fmt(r['plain_s'], '.3f')} | {fmt(r['core_s'])} | {fmt(r['core_ratio'], '.1f')}x | "
                     f"{fmt(r['core_cpu_ratio'], '.1f')}x | {fmt(r['core_noboot_ratio'], '.1f')}x | {fmt(r['full_s'])} | "
                     f"{fmt(r['full_ratio'], '.1f')}x | {fmt(r['full_cpu_ratio'], '.1f')}x | "
                     f"{'yes' if r['core_ratio'] <= TARGET_COST else 'no'} |")
    for b in res["cost"]["breakdown"]:
        lines += ["", f"Where the time goes, M={b['M']}, N={b['N']} (plain pass {b['plain_s']:.3f} s wall, "
                  f"{b['plain_cpu_s']:.3f} s cpu): marginal "
                  "collection time of each evidence kind (collect with that kind alone minus collect with none; "
                  f"medians of up to {res['repeats']} rounds in which the plain pass and every collect take turns, "
                  f"at most {BREAKDOWN_BUDGET_S:g} s of rounds), "
                  "and each diagnostic's compute() on the collected evidence. Marginal times within about 0.05 "
                  "pass of zero are noise on a shared machine (some come out negative).", "",
                  "| part | wall s | cpu s | x plain pass (cpu) |", "|---|---|---|---|"]
        for k, t in b["collect"].items():
            lines.append(f"| collect: {k} | {t['wall']:.3f} | {t['cpu']:.3f} | {t['cpu'] / b['plain_cpu_s']:.2f} |")
        for k, t in sorted(b["compute"].items(), key=lambda kv: -kv[1]["wall"]):
            lines.append(f"| compute: {k} | {t['wall']:.3f} | {t['cpu']:.3f} | {t['cpu'] / b['plain_cpu_s']:.2f} |")
    if res["cost"].get("profile"):
        lines += ["", "Profile (cProfile):", "", "```", res["cost"]["profile"], "```"]

    lines += ["", HEADERS[1], "",
              "All 2^M subset logits over N samples (batch 256): naive = one full forward per subset with forward "
              "hooks zeroing the masked encoders' outputs; mmdiag = one encoder pass, then the fusion head on the "
              f"cached features (`ModelAdapter.subset_logits`). Target at M = 4: >= {TARGET_SUBSET_M4:g}x.", "",
              "| M | subsets | N | naive s | mmdiag s | speedup | cpu speedup | max abs diff |", "|---|---|---|---|---|---|---|---|"]
    for r in res["subsets"]:
        lines.append(f"| {r['M']} | {r['subsets']} | {r['N']} | {r['naive_s']:.3f} | {r['mmdiag_s']:.3f} | "
                     f"{r['speedup']:.1f}x | {r['cpu_speedup']:.1f}x | {r['max_abs_diff']:.1e} |")

    fx = res["fixes"]
    lines += ["", HEADERS[2], "",
              f"Time per training step (`fix_step` + backward + `after_backward` + `optimizer.step`, SGD) of each "
              f"registered fix, M = 2 convolutional encoders on {fx['image']}x{fx['image']} inputs, batch "
              f"{fx['batch']}, at epoch 6 (past every warm-up), over the plain step `none`. The fixes take turns: "
              f"{fx.get('rounds', 1)} rounds of {fx['steps']} steps of every fix; the ratio is the median over rounds "
              "of the fix's time over `none`'s time in the same round (range: the lowest and highest round). "
              f"A raw step without mmdiag (model + cross-entropy + backward + step) takes {fx['raw_ms']:.1f} ms.", "",
              "| fix | ms/step | ratio | range | cpu ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for r in fx["rows"]:
        if "error" in r:
            lines.append(f"| {r['fix']} | error: {r['error'][:80]} | | | | | |")
            continue
        target = f"<= {r['target']:.2f}x" if r.get("target") else "-"
        met = "-" if r.get("met") is None else ("yes" if r["met"] else "no")
        rng = r.get("ratio_range") or [None, None]
        lines.append(f"| {r['fix']} | {r['step_ms']:.1f} | {fmt(r.get('ratio'))}x | {fmt(rng[0])}-{fmt(rng[1])} | "
                     f"{fmt(r.get('cpu_ratio'))}x | {target} | {met} |")
    if fx["not_registered"]:
        lines.append(f"\nNot registered (skipped): {', '.join(fx['not_registered'])}.")

    lines += ["", HEADERS[3], "",
              "`mmdiag.analyze` (whole default suite) over a map-style Dataset that makes every sample on the fly "
              "(M = 2, 8x8 inputs, nothing held in memory), each size in a fresh process (in-process with --quick). "
              "Peak RSS is the process's high-water resident set (`VmHWM` on Linux, else `getrusage`); RSS before "
              "is after imports, model and dataset creation; the tracemalloc peak (a second run under tracemalloc) "
              "counts Python/numpy allocations only, not torch tensors. Evidence = bytes of all tensors in the "
              "collected Evidence.", "",
              "| N | time s | us/sample | RSS before MB | peak RSS MB | growth MB | tracemalloc peak MB | tracemalloc B/sample | evidence MB | evidence B/sample |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["scaling"]:
        lines.append(f"| {r['N']} | {r['time_s']:.2f} | {r['time_s'] / r['N'] * 1e6:.0f} | {r['rss_before_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['rss_before_mb']:.0f} | "
                     f"{r['tracemalloc_peak_mb']:.1f} | {r['tracemalloc_peak_mb'] * 2**20 / r['N']:.0f} | "
                     f"{r['evidence_bytes'] / 2**20:.2f} | {r['evidence_bytes_per_sample']:.0f} |")

    lines += ["", HEADERS[4], ""]
    gpu = res.get("gpu")
    if not gpu:
        lines.append("no GPU available: skipped")
    else:
        lines += [f"Device: {gpu['device']}.", "", "| M | N | plain samples/s | core samples/s | core ratio | full ratio | GPU util % |",
                  "|---|---|---|---|---|---|---|"]
        for r in gpu["cost"]["rows"]:
            lines.append(f"| {r['M']} | {r['N']} | {r['throughput_plain']:.0f} | {r['throughput_core']:.0f} | "
                         f"{r['core_ratio']:.1f}x | {r['full_ratio']:.1f}x | {fmt(r.get('gpu_util'), '.0f')} |")
        lines += ["", "| M | naive s | mmdiag s | speedup |", "|---|---|---|---|"]
        for r in gpu["subsets"]:
            lines.append(f"| {r['M']} | {r['naive_s']:.3f} | {r['mmdiag_s']:.3f} | {r['speedup']:.1f}x |")
        lines += ["", "| N | time s | samples/s | GPU peak MB |", "|---|---|---|---|"]
        for r in gpu["scaling"]:
            lines.append(f"| {r['N']} | {r['time_s']:.2f} | {r['N'] / r['time_s']:.0f} | {fmt(r.get('gpu_peak_mb'), '.0f')} |")
    lines += ["", f"Total harness time: {res['seconds']:.0f} s wall, {res['cpu_seconds']:.0f} s CPU "
              f"(a measurement stops repeating once it has used {BUDGET_S:g} s).", ""]
    path.write_text("\n".join(lines))


def write_plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for a in axes:
        a.spines[["top"]].set_visible(False)
    ax = axes[0]
    cost = res["cost"]["rows"]
    for m_count in sorted({r["M"] for r in cost}):
        rows = [r for r in cost if r["M"] == m_count]
        line, = ax.plot([r["N"] for r in rows], [r["core_ratio"] for r in rows], "o-", label=f"M={m_count} core")
        ax.plot([r["N"] for r in rows], [r["full_ratio"] for r in rows], "s--", color=line.get_color(), alpha=0.6,
                label=f"M={m_count} full")
        ax.plot([r["N"] for r in rows], [r["core_noboot_ratio"] for r in rows], "^:", color=line.get_color(),
                alpha=0.6, label=f"M={m_count} core, bootstrap 0")
    ax.axhline(TARGET_COST, color="k", lw=1, ls=":", label=f"target {TARGET_COST:g}x")
    if cost:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("N samples")
    ax.set_title("analyze / plain eval pass (wall)", fontsize=10)
    ax.legend(fontsize=6, frameon=False)
    ax = axes[1]
    rows = res["subsets"]
    ax.plot([r["M"] for r in rows], [r["speedup"] for r in rows], "o-")
    ax.axhline(TARGET_SUBSET_M4, color="k", lw=1, ls=":", label=f"target {TARGET_SUBSET_M4:g}x at M=4")
    ax.set_xlabel("M modalities")
    ax.set_title("all-subset evaluation: naive / mmdiag", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    ax = axes[2]
    rows = [r for r in res["fixes"]["rows"] if "ratio" in r]
    ax.barh([r["fix"] for r in rows], [r["ratio"] for r in rows],
            color=["#2ca02c" if r.get("met") else "#d62728" if r.get("met") is False else "#7f7f7f" for r in rows])
    for i, r in enumerate(rows):
        if r.get("target"):
            ax.plot([r["target"]] * 2, [i - 0.4, i + 0.4], color="k", lw=1.5)
    ax.axvline(1.0, color="k", lw=0.5)
    ax.set_title("fix step time / plain step (black tick: target)", fontsize=10)
    ax = axes[3]
    rows = res["scaling"]
    if rows:
        ns = [r["N"] for r in rows]
        ax.plot(ns, [r["time_s"] for r in rows], "o-", label="time s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax2 = ax.twinx()
        ax2.plot(ns, [r["peak_rss_mb"] - r["rss_before_mb"] for r in rows], "s--", color="#d62728")
        ax2.plot(ns, [r["tracemalloc_peak_mb"] for r in rows], "^:", color="#9467bd")
        ax2.set_ylabel("MB: RSS growth (red), Python peak (purple)", fontsize=8)
    ax.set_xlabel("N samples (streamed)")
    ax.set_title("scaling: time (blue) and memory", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ============================================================================ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test; well under 30 s)")
    p.add_argument("--out", type=Path, default=HERE, help="folder for results.md/.png/.json (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None, help="runs per measurement (median); default 3, 1 with --quick")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cost-n", type=str, default=None, help="comma-separated N for table 1 (with --cost-m: the full grid; default: 1000, 5000, 20000)")
    p.add_argument("--cost-m", type=str, default=None, help="comma-separated M for table 1")
    p.add_argument("--scaling-n", type=str, default=None, help="comma-separated N for table 4 (default 1000,10000,100000)")
    p.add_argument("--sections", type=str, default="cost,subsets,fixes,scaling,gpu",
                   help="which tables to measure (others are left empty)")
    p.add_argument("--device", type=str, default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--scaling-worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--scaling-image", type=int, default=8, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def ints(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",")) if text else default


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scaling_worker is not None:  # internal: one scaling point in a fresh process
        print(json.dumps(scaling_point(args.scaling_worker, args.scaling_image, args.device)))
        return {}
    base = QUICK if args.quick else Sizes()
    sizes = Sizes(**{**base.__dict__})
    if args.cost_n or args.cost_m:
        ns = ints(args.cost_n, tuple(sorted({n for _, n in sizes.cost_grid})))
        ms = ints(args.cost_m, tuple(sorted({m for m, _ in sizes.cost_grid})))
        sizes.cost_grid = tuple((m, n) for m in ms for n in ns)
    sizes.scaling_n = ints(args.scaling_n, sizes.scaling_n)
    if args.repeats:
        sizes.repeats = args.repeats
    sections = set(args.sections.split(","))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()

    def log(msg: str) -> None:
        print(msg, flush=True)

    cpu = torch.device("cpu")
    res: dict[str, Any] = {"machine": machine(args.threads), "quick": args.quick, "repeats": sizes.repeats,
                           "date": time.strftime("%Y-%m-%d %H:%M"), "sizes": sizes.__dict__}
    log(f"machine: {res['machine']}")
    log("1. analysis cost ratio")
    res["cost"] = bench_cost(sizes, cpu, log) if "cost" in sections else {"rows": [], "breakdown": []}
    log("2. subset evaluation")
    res["subsets"] = bench_subsets(sizes, cpu, log) if "subsets" in sections else []
    log("3. fix overhead")
    res["fixes"] = bench_fixes(sizes, cpu, log) if "fixes" in sections else {
        "rows": [], "raw_ms": float("nan"), "not_registered": [], "batch": sizes.fix_batch, "image": sizes.fix_image,
        "steps": sizes.fix_steps}
    log("4. scaling")
    res["scaling"] = bench_scaling(sizes, cpu, args.threads, log) if "scaling" in sections else []
    log("5. GPU")
    res["gpu"] = None
    if "gpu" in sections and torch.cuda.is_available():
        gpu = torch.device("cuda")
        res["gpu"] = {"device": torch.cuda.get_device_name(0), "cost": bench_cost(Sizes(**{**sizes.__dict__, "profile": False}), gpu, log),
                      "subsets": bench_subsets(sizes, gpu, log), "scaling": bench_scaling(sizes, gpu, args.threads, log)}
    else:
        log("no GPU available: skipped")
    res["seconds"] = time.time() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    res["cpu_seconds"] = time.process_time() - c0 + children.ru_utime + children.ru_stime
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    write_markdown(res, out / "results.md")
    write_plot(res, out / "results.png")
    log(f"wrote {out / 'results.md'}, {out / 'results.png'} and {out / 'results.json'} ({res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
