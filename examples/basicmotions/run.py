"""BasicMotions: does a smartwatch activity classifier use its gyroscope, or only its accelerometer?

BasicMotions (UEA/UCR archive; vendored in ``data/``, see ``data/README.md``) holds 80 ten-second
recordings (40 train, 40 test) of four activities (standing, walking, running, badminton) from a
smartwatch: 6 channels at 10 Hz, the 3-axis accelerometer (channels 0-2) and the 3-axis gyroscope
(channels 3-5). This script:

1. reads the two ``.ts`` files with the small parser in ``tsfile.py``, standardises each channel
   with training statistics, and splits the channels into the two modalities ``acc`` and ``gyro``;
2. trains ``model.py``'s two-stream 1-D CNN (encoders ``acc_net`` and ``gyro_net``, a concat head)
   plainly with Adam, saves ``model.pt``, ``train.npz`` and ``test.npz``, and runs ``mmdiag analyze``
   with this folder's ``mmdiag.toml`` on the test split;
3. repeats the training with other seeds (``--seeds``; Python API, Shapley and unimodal accuracy)
   because 40 test recordings give wide intervals and single runs move;
4. runs ``mmdiag rebalance --fix auto --baseline`` on the seed-0 model;
5. writes ``summary.json`` and ``summary.png``.

    python examples/basicmotions/run.py            # 5 seeds, full analysis (about a minute)
    python examples/basicmotions/run.py --small    # CI sizes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from model import build  # noqa: E402
from tsfile import read_ts  # noqa: E402

MODALITIES = ("acc", "gyro")
CHANNELS = {"acc": slice(0, 3), "gyro": slice(3, 6)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="CI sizes: one seed, fewer epochs and resamples")
    p.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=None, help="training seeds for the spread (default: 5; 1 with --small)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 100; 60 with --small)")
    p.add_argument("--no-rebalance", action="store_true", help="skip step 4")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default: 1000; 200 with --small)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    args.seeds = args.seeds or (1 if args.small else 5)
    args.epochs = args.epochs or (60 if args.small else 100)
    args.bootstrap = args.bootstrap if args.bootstrap is not None else (200 if args.small else 1000)
    return args


# ------------------------------------------------------------------------------------ data
def load() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """(train, test, class names); every channel standardised with the training mean and std."""
    train = read_ts(HERE / "data" / "BasicMotions_TRAIN.ts")
    test = read_ts(HERE / "data" / "BasicMotions_TEST.ts", classes=train.classes)
    mean = train.x.mean(axis=(0, 2), keepdims=True)
    std = train.x.std(axis=(0, 2), keepdims=True)

    def arrays(d: Any) -> dict[str, np.ndarray]:
        x = (d.x - mean) / std
        return {**{m: np.ascontiguousarray(x[:, CHANNELS[m]], dtype=np.float32) for m in MODALITIES}, "label": d.y}

    return arrays(train), arrays(test), train.classes


def channel_check(classes: list[str]) -> dict[str, Any]:
    """Evidence for the channel order: a gyroscope measures angular velocity, which averages to ~0
    over a 10 s recording in every activity; an accelerometer's mean does not (gravity/posture)."""
    raw = read_ts(HERE / "data" / "BasicMotions_TRAIN.ts")
    means = {c: [round(float(v), 2) for v in raw.x[raw.y == k].mean(axis=(0, 2))] for k, c in enumerate(classes)}
    biggest = np.abs(raw.x.mean(axis=2)).mean(axis=0)  # mean |per-recording mean| per channel
    return {"class_channel_means": means, "mean_abs_recording_mean": [round(float(v), 3) for v in biggest]}


def train(data: dict[str, np.ndarray], epochs: int, seed: int, batch_size: int = 8, lr: float = 3e-3) -> torch.nn.Module:
    """Plain joint training with Adam and cross-entropy (deterministic for a seed)."""
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x = {k: torch.as_tensor(v) for k, v in data.items()}
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x["label"]), generator=gen)
        for start in range(0, len(order), batch_size):
            i = order[start:start + batch_size]
            loss = F.cross_entropy(model(x["acc"][i], x["gyro"][i]), x["label"][i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def mmdiag_cli(*args: Any, threads: int | None = None) -> None:
    """Run the ``mmdiag`` command line from this folder (so it reads mmdiag.toml)."""
    print("$ mmdiag " + " ".join(map(str, args)), flush=True)
    env = {**os.environ, "COLUMNS": "110"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-m", "mmdiag", *map(str, args)], cwd=HERE, env=env, text=True,
                          capture_output=True)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"mmdiag {args[0]} exited with {proc.returncode}")


def headline(report: dict[str, Any]) -> dict[str, Any]:
    d, v = report["diagnostics"], report["verdict"]

    def per(name: str) -> dict[str, float] | None:
        return {m: round(x, 4) for m, x in d[name]["per_modality"].items()} if name in d else None

    return {
        "accuracy": round(report["accuracy"], 4),
        "verdict": {k: v[k] for k in ("dominant", "underused", "severity", "recommended_fix")},
        "shapley": per("shapley"), "unimodal_accuracy": per("unimodal"), "reliance": per("reliance"),
        "probe": per("probe"), "gradient_conflict": per("gradient_conflict"), "perceptual": per("perceptual"),
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"acc": "#2ca02c", "gyro": "#9467bd"}
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    ax = axes[0]
    seeds = summary["seeds"]
    for j, m in enumerate(MODALITIES):
        for k, key in enumerate(("shapley", "unimodal_accuracy")):
            xs = np.full(len(seeds), 2 * k + j) + np.linspace(-0.15, 0.15, len(seeds))
            ax.scatter(xs, [s[key][m] for s in seeds], color=colors[m], s=18, label=m if k == 0 else None)
            ax.hlines(np.mean([s[key][m] for s in seeds]), 2 * k + j - 0.3, 2 * k + j + 0.3, color=colors[m])
    ax.set_xticks([0.5, 2.5], ["Shapley value", "accuracy alone"])
    ax.set_title(f"plain training, {len(seeds)} seed(s) (line: mean)", fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    ax = axes[1]
    stages = [(k, summary[k]) for k in ("before", "rebalanced", "baseline") if summary.get(k)]
    x = np.arange(len(stages))
    for j, m in enumerate(MODALITIES):
        ax.bar(x + (j - 0.5) * 0.38, [s["unimodal_accuracy"][m] for _, s in stages], 0.38, color=colors[m], label=m)
    fix = (summary.get("fix") or {}).get("used") or "fix"
    ax.set_xticks(x, [n if n != "rebalanced" else f"after {fix}" for n, _ in stages])
    ax.set_title("accuracy with one modality alone (test)", fontsize=10)
    for a in axes:
        a.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import mmdiag

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_data, test_data, classes = load()
    summary: dict[str, Any] = {"classes": classes, "channels": channel_check(classes), "epochs": args.epochs,
                               "small": args.small}
    print(f"BasicMotions: {len(train_data['label'])} train / {len(test_data['label'])} test recordings, "
          f"classes {classes}; acc {train_data['acc'].shape[1:]}, gyro {train_data['gyro'].shape[1:]}")

    print("\n== 1. plain training (seed 0), mmdiag analyze ==")
    model = train(train_data, args.epochs, seed=0)
    paths = {"model": out / "model.pt", "train": out / "train.npz", "test": out / "test.npz"}
    torch.save(model.state_dict(), paths["model"])
    np.savez(paths["train"], **train_data)
    np.savez(paths["test"], **test_data)
    mmdiag_cli("analyze", "--config", HERE / "mmdiag.toml", "--checkpoint", paths["model"], "--data", paths["test"],
               "--out", out / "report", "--overwrite", "--bootstrap", args.bootstrap, threads=args.threads)
    summary["before"] = headline(json.loads((out / "report" / "report.json").read_text()))

    print(f"\n== 2. spread over {args.seeds} training seed(s) (Python API) ==")
    seeds = []
    for seed in range(args.seeds):
        m = model if seed == 0 else train(train_data, args.epochs, seed=seed)
        r = mmdiag.analyze(m, test_data, modalities=MODALITIES, only=["shapley", "unimodal"],
                           bootstrap=args.bootstrap, seed=seed)
        row = {"seed": seed, "accuracy": r.accuracy,
               "shapley": dict(r.diagnostics["shapley"].per_modality),
               "shapley_ci": dict(r.diagnostics["shapley"].ci),
               "unimodal_accuracy": dict(r.diagnostics["unimodal"].per_modality),
               "dominant": r.verdict.dominant, "severity": r.verdict.severity}
        seeds.append(row)
        print(f"  seed {seed}: accuracy {r.accuracy:.3f}  Shapley acc {row['shapley']['acc']:.3f} "
              f"gyro {row['shapley']['gyro']:.3f}  alone acc {row['unimodal_accuracy']['acc']:.3f} "
              f"gyro {row['unimodal_accuracy']['gyro']:.3f} -> {r.verdict.severity} {r.verdict.dominant or ''}")
    summary["seeds"] = seeds

    if not args.no_rebalance:
        print("\n== 3. mmdiag rebalance (seed 0) ==")
        rb = out / "rebalance"
        mmdiag_cli("rebalance", "--config", HERE / "mmdiag.toml", "--checkpoint", paths["model"],
                   "--data", paths["train"], "--val-data", paths["test"], "--fix", "auto", "--baseline",
                   "--epochs", args.epochs, "--bootstrap", args.bootstrap, "--out", rb, "--overwrite",
                   "--format", "json,csv", "--quiet", threads=args.threads)
        summary["fix"] = json.loads((rb / "fix.json").read_text())
        summary["rebalanced"] = headline(json.loads((rb / "after" / "report.json").read_text()))
        if (rb / "baseline" / "report.json").is_file():
            summary["baseline"] = headline(json.loads((rb / "baseline" / "report.json").read_text()))

    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "summary.png")
    print(f"\nwrote {out / 'summary.json'} and {out / 'summary.png'} ({summary['seconds']} s)")
    return summary


if __name__ == "__main__":
    main()
