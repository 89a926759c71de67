"""Table 3: time per training step of every registered fix over the plain step."""

from __future__ import annotations

import copy
import statistics
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from benchmarks.timing import Timing, timed
from benchmarks.workload import Sizes, StreamingDataset, adapter_for, make_model
from mmdiag.fixes import FIXES
from mmdiag.fixes.base import FixContext, fix_step

FIX_TARGETS = {"ogm_ge": 1.10, "arl": 1.10, "cal": 1.10, "agm": 1.5, "mmpareto": 1.5, "udml": 1.5}


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
