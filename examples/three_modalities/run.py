"""Three modalities on real data: spoken digit + top half + bottom half of the handwritten digit.

AV-digits (shipped with mmdiag) gives three views of each sample: the log-mel spectrogram of the
spoken digit, and the top and bottom halves (4 x 8 pixels each) of the digit image. The two image
halves are a balanced control pair (neither is privileged by construction), while clean audio is
the easiest modality. This script trains ``model.py``'s three-encoder network plainly and analyses
it with the Python API (``mmdiag.analyze``): Shapley values over the 2^3 = 8 modality subsets, the
accuracy of every combination, the balance entropy, reliance, and the verdict.

    python examples/three_modalities/run.py            # full sizes
    python examples/three_modalities/run.py --small    # CI sizes

From this folder, ``mmdiag analyze`` re-runs the analysis from ``mmdiag.toml`` on the files the
script saved in ``out/``.
"""

from __future__ import annotations

import argparse
import json
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

import mmdiag  # noqa: E402
from mmdiag.examples_data.avdigits import load_avdigits, split_indices  # noqa: E402
from mmdiag.render import write_outputs  # noqa: E402

MODALITIES = ("audio", "top", "bottom")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="CI sizes: fewer epochs and bootstrap resamples")
    p.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 20; 8 with --small)")
    p.add_argument("--snr", type=float, default=None, help="add noise to the audio at this SNR in dB (default: clean)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default: 1000; 200 with --small)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    args.epochs = args.epochs or (8 if args.small else 20)
    args.bootstrap = args.bootstrap if args.bootstrap is not None else (200 if args.small else 1000)
    return args


def train(model: torch.nn.Module, data: dict[str, np.ndarray], epochs: int, seed: int,
          lr: float = 3e-3, batch_size: int = 64) -> torch.nn.Module:
    """Plain joint training (Adam, cross-entropy), deterministic for a seed."""
    torch.manual_seed(seed)
    x = {k: torch.as_tensor(v) for k, v in data.items()}
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x["label"]), generator=gen)
        for start in range(0, len(order), batch_size):
            i = order[start:start + batch_size]
            loss = F.cross_entropy(model(*(x[m][i] for m in MODALITIES)), x["label"][i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def plot(report: mmdiag.Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"audio": "#1f77b4", "top": "#d62728", "bottom": "#8c564b"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 1.7]})
    ax = axes[0]
    for name, offset in (("shapley", -0.2), ("reliance", 0.2)):
        res = report.diagnostics[name]
        for j, m in enumerate(MODALITIES):
            lo, hi = res.ci.get(m, [None, None]) or [None, None]
            v = res.per_modality[m]
            err = None if lo is None else [[v - lo], [hi - v]]
            ax.bar(j + offset, v, 0.38, yerr=err, color=colors[m], alpha=1.0 if name == "shapley" else 0.45,
                   capsize=3, label=name if j == 0 else None)
    ax.set_xticks(range(len(MODALITIES)), MODALITIES)
    ax.set_title("Shapley (solid) and reliance (light), 95% CI", fontsize=10)
    ax = axes[1]
    acc = combination_accuracies(report)
    names = list(acc)
    ax.bar(range(len(names)), [acc[n] for n in names], color="#7f7f7f")
    for i, n in enumerate(names):
        ax.text(i, acc[n] + 0.01, f"{acc[n]:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), [n.replace("+", "\n+") for n in names], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_title("accuracy with only these modalities present", fontsize=10)
    for a in axes:
        a.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def combination_accuracies(report: mmdiag.Report) -> dict[str, float]:
    """Subset name ('audio+top', ...) -> accuracy with only those modalities present, smallest subsets first."""
    table = report.diagnostics["combinations"].details["accuracy"]
    return {k: float(v) for k, v in sorted(table.items(), key=lambda kv: (kv[0].count("+"), list(table).index(kv[0])))}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    arrays = load_avdigits(snr_db=args.snr, seed=args.seed, views=MODALITIES)
    tr, va = split_indices(len(arrays["label"]), 0.3, args.seed)
    train_data = {k: v[tr] for k, v in arrays.items()}
    val_data = {k: v[va] for k, v in arrays.items()}
    torch.manual_seed(args.seed)  # the initial weights too, not only the training order
    model = train(build(), train_data, args.epochs, args.seed)
    torch.save(model.state_dict(), out / "model.pt")
    np.savez(out / "val.npz", **{k: val_data[k] for k in (*MODALITIES, "label")})
    np.savez(out / "train.npz", **{k: train_data[k] for k in (*MODALITIES, "label")})  # for mmdiag rebalance

    report = mmdiag.analyze(model, val_data, modalities=MODALITIES, bootstrap=args.bootstrap, seed=args.seed,
                            settings={"model": "examples/three_modalities/model.py:build",
                                      "data": f"AV-digits validation split, audio snr_db={args.snr}"})
    write_outputs(report, out / "report")
    plot(report, out / "summary.png")

    d = report.diagnostics
    summary: dict[str, Any] = {
        "accuracy": round(report.accuracy, 4),
        "verdict": report.verdict.to_dict(),
        "shapley": {m: round(v, 4) for m, v in d["shapley"].per_modality.items()},
        "shapley_ci": d["shapley"].ci,
        "shapley_sum": round(sum(d["shapley"].per_modality.values()), 4),
        "reliance": {m: round(v, 4) for m, v in d["reliance"].per_modality.items()},
        "unimodal_accuracy": {m: round(v, 4) for m, v in d["unimodal"].per_modality.items()},
        "combinations": combination_accuracies(report),
        "balance": round(d["balance"].value, 4) if "balance" in d else None,
        "failures": [f.to_dict() for f in report.failures],
        "epochs": args.epochs, "small": args.small,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"fused accuracy {report.accuracy:.3f} on {report.n_samples} validation samples")
    print("Shapley values (sum = v(all) - v(none) = %.3f):" % summary["shapley_sum"])
    for m in MODALITIES:
        lo, hi = d["shapley"].ci[m]
        print(f"  {m:>6}: {d['shapley'].per_modality[m]:+.3f} [{lo:.3f}, {hi:.3f}]   alone {summary['unimodal_accuracy'][m]:.3f}"
              f"   reliance {summary['reliance'][m]:.3f}")
    print("accuracy of every combination:")
    for k, v in summary["combinations"].items():
        print(f"  {k:>18}: {v:.3f}")
    if summary["balance"] is not None:
        print(f"balance (normalised entropy of contribution shares): {summary['balance']:.3f}")
    print("verdict:", report.verdict.headline())
    print(f"wrote {out / 'report'}, {out / 'summary.json'} and {out / 'summary.png'} ({summary['seconds']} s)")
    return summary


if __name__ == "__main__":
    main()
