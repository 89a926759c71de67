"""Table 4: analyze time and memory as N grows, each size in a fresh process."""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import torch

import mmdiag
from benchmarks.timing import timed
from benchmarks.workload import Sizes, StreamingDataset, evidence_bytes, make_model

#: the script that runs one size (``--scaling-worker N``)
RUN_SCRIPT = Path(__file__).resolve().with_name("run.py")


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
            cmd = [sys.executable, str(RUN_SCRIPT), "--scaling-worker", str(n),
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
