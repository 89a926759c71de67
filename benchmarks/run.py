"""mmdiag performance harness: what an analysis costs, and where the time goes.

Measures, in one run, side by side (medians of ``--repeats`` runs; wall-clock and process CPU time):

1. **Analysis cost ratio** (:mod:`benchmarks.cost`): ``mmdiag.analyze`` with the whole default
   suite (what ``mmdiag analyze`` runs) and with the default suite without ``udml`` and ``probe``,
   divided by one plain evaluation pass (forward only, no grad, same batch size, same DataLoader)
   of the same model over the same data, for M modalities and N samples; where the time goes
   (each evidence kind's seconds measured inside collect, each diagnostic's ``compute()``), and a
   cProfile of the analysis.
2. **Subset evaluation** (:mod:`benchmarks.subsets`): logits of all 2^M modality subsets the
   mmdiag way (one encoder pass, then the fusion head on cached features through encoder stubs,
   ``ModelAdapter.subset_logits``) versus the naive way (one full forward per subset with a forward
   hook zeroing the masked encoders' outputs); the values must agree (``allclose``; max abs
   difference reported).
3. **Fix overhead** (:mod:`benchmarks.fixes`): time per training step of every registered fix
   (``fix_step`` + backward + ``after_backward`` + ``optimizer.step``) over a plain step (fix
   ``none``) on the same model and batch.
4. **Scaling** (:mod:`benchmarks.scaling`): analyze wall time and peak memory as N grows,
   streaming a map-style Dataset that generates samples on the fly (nothing held in memory); each
   size runs in a fresh process so the peak RSS is its own; bytes of evidence per sample.
5. **GPU**: sections 1, 2 and 4 on CUDA with throughput and utilisation, when a GPU is visible.

    python benchmarks/run.py                 # default sizes (about ten minutes on two CPU cores)
    python benchmarks/run.py --quick         # tiny sizes (smoke test)
    python benchmarks/run.py --out DIR       # results.md, results.png, results.json in DIR

Benchmarks are not tests: nothing here asserts a timing; targets are reported as met or missed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

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

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # the harness's modules are the package ``benchmarks`` next to this file
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from benchmarks.cost import bench_cost  # noqa: E402
from benchmarks.fixes import bench_fixes  # noqa: E402
from benchmarks.report import HEADERS, machine, write_markdown, write_plot  # noqa: E402,F401 - HEADERS: the smoke test
from benchmarks.scaling import bench_scaling, scaling_point  # noqa: E402
from benchmarks.subsets import bench_subsets  # noqa: E402
from benchmarks.workload import QUICK, Sizes  # noqa: E402
from mmdiag.errors import MmdiagWarning  # noqa: E402


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
    # the analyses' reading notes (a benchmark model near chance at tiny sizes) are not results
    warnings.simplefilter("ignore", MmdiagWarning)
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
    res["cost"] = bench_cost(sizes, cpu, log) if "cost" in sections else {"rows": [], "profile": ""}
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
