"""Table 1: what ``mmdiag.analyze`` costs in plain evaluation passes, and where the time goes.

Per (M, N): the plain pass, the whole default suite (*full*, what ``mmdiag analyze`` runs) and the
default suite without ``udml`` and ``probe`` (*core*) take turns. The breakdown comes from inside
the analysis: ``Evidence.meta["timings"]`` holds the seconds of the main forward pass and of each
evidence kind's producer, measured in collect (medians over the full runs); each diagnostic's
``compute()`` is timed on the collected evidence afterwards.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
from typing import Any, Callable, Sequence

import torch

import mmdiag
from benchmarks.timing import UtilSampler, interleaved_timings, median_timing, plain_pass
from benchmarks.workload import BenchNet, Sizes, in_memory, make_model
from mmdiag.api import build_diagnostics, select_diagnostics
from mmdiag.stats import shared_resamples

#: the default suite without these two is the *core* suite
CORE_SKIP = ("udml", "probe")
#: seconds after which the cost rounds of one (M, N) stop repeating (three rounds at N = 20k)
COST_BUDGET_S = 150.0


def target_for(n: int) -> float:
    """The whole default suite's target in plain passes: 6x at N below 5k, 3x from 5k on."""
    return 6.0 if n < 5000 else 3.0


def compute_times(ev: Any, sizes: Sizes) -> dict[str, dict[str, float]]:
    """Wall and CPU seconds of each default diagnostic's ``compute()`` on ``ev``, in the order
    analyze runs them (sharing one set of bootstrap resamples, as analyze does)."""
    out: dict[str, dict[str, float]] = {}
    prior: dict[str, Any] = {}
    with shared_resamples():
        for d in build_diagnostics(select_diagnostics(), bootstrap=sizes.bootstrap):
            res, t = median_timing(lambda: d.compute(ev, prior), sizes.extra_repeats)
            prior[d.name] = res
            out[d.name] = {"wall": t.wall, "cpu": t.cpu}
    return out


def _median_timings(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in runs for k in r}, key=lambda k: (k != "forward", k))
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def cost_point(model: BenchNet, m_count: int, n: int, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """One row of table 1 with its breakdown."""
    data = in_memory(n, m_count, sizes.image)
    cs = sizes.collect_settings(device)
    collect_timings: list[dict[str, float]] = []

    def run(skip: Sequence[str] | None) -> Any:
        report, ev = mmdiag.analyze(model, data, skip=list(skip) if skip else None, collect_settings=cs,
                                    bootstrap=sizes.bootstrap, return_evidence=True)
        if skip is None:
            collect_timings.append(dict(ev.meta["timings"]))
        return report, ev

    plain_pass(model, data, cs.batch_size, device)  # warm-up of all three
    run(None)
    run(CORE_SKIP)
    collect_timings.clear()
    (_, plain), ((report, ev), full), (_, core) = interleaved_timings(
        [lambda: plain_pass(model, data, cs.batch_size, device), lambda: run(None), lambda: run(CORE_SKIP)],
        sizes.repeats, budget_s=COST_BUDGET_S)
    with UtilSampler(device) as util:  # a separate run: utilisation of the analysis alone
        if util.active:
            run(None)
    return {"M": m_count, "N": n, "plain_s": plain.wall, "plain_cpu_s": plain.cpu,
            "full_s": full.wall, "full_cpu_s": full.cpu, "core_s": core.wall, "core_cpu_s": core.cpu,
            "full_ratio": full.wall / plain.wall, "full_cpu_ratio": full.cpu / plain.cpu,
            "core_ratio": core.wall / plain.wall, "core_cpu_ratio": core.cpu / plain.cpu,
            "target": target_for(n), "rows": dict(ev.meta.get("subsample_rows", {})),
            "collect": _median_timings(collect_timings), "compute": compute_times(ev, sizes),
            "failures": [f.diagnostic for f in report.failures],
            "throughput_plain": n / plain.wall, "throughput_full": n / full.wall, "gpu_util": util.mean}


def profile_text(model: BenchNet, m_count: int, n: int, sizes: Sizes, device: torch.device) -> str:
    """cProfile of one whole-suite analysis: the top functions by own time."""
    data = in_memory(n, m_count, sizes.image)
    prof = cProfile.Profile()
    prof.enable()
    mmdiag.analyze(model, data, collect_settings=sizes.collect_settings(device), bootstrap=sizes.bootstrap)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(18)
    text = [line for line in buf.getvalue().splitlines() if line.strip()]
    return f"M={m_count}, N={n}, the whole default suite, top 18 by own time:\n" + "\n".join(text)


def bench_cost(sizes: Sizes, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    rows = []
    models: dict[int, BenchNet] = {}
    for m_count, n in sizes.cost_grid:
        if m_count not in models:
            models[m_count] = make_model(m_count, sizes.image, train_steps=sizes.train_steps).to(device)
        row = cost_point(models[m_count], m_count, n, sizes, device)
        rows.append(row)
        parts = ", ".join(f"{k} {v / row['plain_s']:.2f}" for k, v in row["collect"].items())
        log(f"  cost M={m_count} N={n}: plain {row['plain_s']:.2f}s, full {row['full_s']:.2f}s "
            f"({row['full_ratio']:.1f}x, target {row['target']:g}x), core {row['core_s']:.2f}s "
            f"({row['core_ratio']:.1f}x); collect in plain passes: {parts}")
    profile = ""
    if sizes.profile and rows:
        m_count, n = max(sizes.cost_grid)
        profile = profile_text(models[m_count], m_count, n, sizes, device)
    return {"rows": rows, "profile": profile}
