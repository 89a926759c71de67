"""AV-digits: a fusion model that leans on clean audio, the same model on noisy audio, and the fix.

AV-digits pairs real handwritten digits (scikit-learn's ``load_digits``) with spoken digits
synthesised by espeak-ng; it ships with mmdiag (``mmdiag.examples_data.avdigits``). With clean audio a jointly
trained late-fusion network learns the digit from the speech and leaves its image branch
under-trained. White noise added to the audio weakens that modality, so the signal-to-noise ratio
is a ground-truth dial of dominance.

What this script does (everything lands in ``--out``, default ``examples/avdigits/out``):

1. ``clean/``: trains :class:`mmdiag.examples_data.demo_model.AVDigitsNet` on clean audio (plain joint training,
   Adam), saves ``model.pt`` (a state dict), ``train.npz`` and ``val.npz``, and runs
   ``mmdiag analyze`` with this folder's ``mmdiag.toml``: the report says which modality dominates.
2. ``noisy/``: the same at ``--snr`` dB (default -6: the sweep puts the balance point of this model
   between -5 and -7 dB; at -10 dB the image already dominates).
3. ``sweep/`` (``--sweep``): one model per SNR, analysed with the Python API (Shapley values only),
   to see where the balance point lies.
4. ``rebalance/``: ``mmdiag rebalance --fix auto --baseline`` on the clean model: retrains with the
   fix the verdict recommends and, under the same budget and seed, plainly (the baseline), then
   compares before / after / baseline.
5. ``summary.json`` and ``summary.png``: the verdicts and the numbers side by side.

Run it from anywhere::

    python examples/avdigits/run.py            # full sizes (a few minutes on two CPU cores)
    python examples/avdigits/run.py --sweep    # plus the SNR sweep
    python examples/avdigits/run.py --small    # CI sizes (tests/test_examples.py)

then, from ``examples/avdigits``, ``mmdiag analyze`` alone re-runs step 1's analysis from
``mmdiag.toml`` and ``mmdiag rebalance`` step 4.
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

from mmdiag.examples_data.avdigits import load_avdigits, split_indices
from mmdiag.examples_data.demo_model import AVDigitsNet, train_plain

HERE = Path(__file__).resolve().parent
MODALITIES = ("audio", "visual")
SWEEP_SNRS = (None, 5.0, 0.0, -4.0, -5.0, -6.0, -7.0, -8.0, -10.0, -12.0, -15.0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI sizes: fewer epochs and bootstrap resamples, no sweep")
    p.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default: %(default)s)")
    p.add_argument("--snr", type=float, default=-6.0,
                   help="SNR of the noisy version in dB (default: %(default)s, measured to balance the modalities)")
    p.add_argument("--sweep", action="store_true", help="also train and analyze one model per SNR in %s" % (SWEEP_SNRS,))
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 20; 8 with --small)")
    p.add_argument("--rebalance-epochs", type=int, default=None, help="epochs of the retraining (default: 20; 5 with --small)")
    p.add_argument("--no-rebalance", action="store_true", help="skip step 4")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default: 1000; 200 with --small)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    args.epochs = args.epochs or (8 if args.small else 20)
    args.rebalance_epochs = args.rebalance_epochs or (5 if args.small else 20)
    args.bootstrap = args.bootstrap if args.bootstrap is not None else (200 if args.small else 1000)
    return args


# ------------------------------------------------------------------------------------ data + model
def make_split(snr_db: float | None, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """AV-digits (audio at ``snr_db``, None = clean) split 70/30."""
    arrays = load_avdigits(snr_db=snr_db, seed=seed, views=MODALITIES)
    tr, va = split_indices(len(arrays["label"]), 0.3, seed)
    return {k: v[tr] for k, v in arrays.items()}, {k: v[va] for k, v in arrays.items()}


def train_and_save(folder: Path, snr_db: float | None, epochs: int, seed: int) -> dict[str, Path]:
    """Train AVDigitsNet plainly and save what ``mmdiag analyze`` / ``rebalance`` read."""
    folder.mkdir(parents=True, exist_ok=True)
    train, val = make_split(snr_db, seed)
    torch.manual_seed(seed)
    model = AVDigitsNet()
    losses = train_plain(model, train, epochs=epochs, seed=seed)
    paths = {"model": folder / "model.pt", "train": folder / "train.npz", "val": folder / "val.npz"}
    torch.save(model.state_dict(), paths["model"])
    # key order = the model's positional order (audio, visual); the CLI keeps it
    np.savez(paths["train"], **{k: train[k] for k in (*MODALITIES, "label")})
    np.savez(paths["val"], **{k: val[k] for k in (*MODALITIES, "label")})
    print(f"trained AVDigitsNet on {'clean' if snr_db is None else f'{snr_db:g} dB'} audio: "
          f"{epochs} epochs, final training loss {losses[-1]:.3f}")
    return paths


def mmdiag_cli(*args: Any, threads: int | None = None) -> None:
    """Run the ``mmdiag`` command line (as a user would) from this folder, so it reads mmdiag.toml."""
    cmd = [sys.executable, "-m", "mmdiag", *map(str, args)]
    print("$ mmdiag " + " ".join(map(str, args)), flush=True)
    env = {**os.environ, "COLUMNS": "110"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, cwd=HERE, env=env, text=True, capture_output=True)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"mmdiag {args[0]} exited with {proc.returncode}")


# ------------------------------------------------------------------------------------ steps
def analyze_cli(paths: dict[str, Path], out: Path, bootstrap: int, seed: int, threads: int | None) -> dict[str, Any]:
    mmdiag_cli("analyze", "--config", HERE / "mmdiag.toml", "--checkpoint", paths["model"], "--data", paths["val"],
               "--out", out, "--overwrite", "--bootstrap", bootstrap, "--seed", seed, threads=threads)
    return json.loads((out / "report.json").read_text())


def sweep(out: Path, epochs: int, bootstrap: int, seed: int) -> list[dict[str, Any]]:
    """One model per SNR, analysed with the Python API (Shapley values, unimodal accuracy)."""
    import mmdiag

    rows = []
    for snr in SWEEP_SNRS:
        train, val = make_split(snr, seed)
        torch.manual_seed(seed)
        model = AVDigitsNet()
        train_plain(model, train, epochs=epochs, seed=seed)
        report = mmdiag.analyze(model.eval(), val, modalities=MODALITIES, only=["shapley", "unimodal"],
                                bootstrap=bootstrap, seed=seed)
        sh, uni = report.diagnostics["shapley"], report.diagnostics["unimodal"]
        rows.append({
            "snr_db": snr, "accuracy": report.accuracy,
            "shapley": dict(sh.per_modality), "shapley_ci": dict(sh.ci),
            "unimodal": dict(uni.per_modality),
            "dominant": report.verdict.dominant, "severity": report.verdict.severity,
        })
        print(f"  SNR {'clean' if snr is None else f'{snr:g} dB':>8}: accuracy {report.accuracy:.3f}  "
              f"Shapley audio {sh.per_modality['audio']:.3f} visual {sh.per_modality['visual']:.3f}  "
              f"-> {report.verdict.severity} {report.verdict.dominant or ''}", flush=True)
    (out / "sweep").mkdir(parents=True, exist_ok=True)
    (out / "sweep" / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def rebalance_cli(paths: dict[str, Path], out: Path, epochs: int, bootstrap: int, seed: int,
                  threads: int | None) -> dict[str, Any]:
    mmdiag_cli("rebalance", "--config", HERE / "mmdiag.toml", "--checkpoint", paths["model"],
               "--data", paths["train"], "--val-data", paths["val"], "--fix", "auto", "--baseline",
               "--epochs", epochs, "--bootstrap", bootstrap, "--seed", seed, "--out", out, "--overwrite",
               "--format", "json,csv", "--quiet", threads=threads)
    rows = json.loads((out / "comparison.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) and "rows" in rows else rows
    fix = json.loads((out / "fix.json").read_text())
    reports = {k: json.loads((out / k / "report.json").read_text())
               for k in ("before", "after", "baseline") if (out / k / "report.json").is_file()}
    return {"fix": fix, "comparison": rows, "reports": reports}


# ------------------------------------------------------------------------------------ summary
def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth quoting from a report.json."""
    d, v = report["diagnostics"], report["verdict"]

    def per(name: str) -> dict[str, float] | None:
        return {m: round(x, 4) for m, x in d[name]["per_modality"].items()} if name in d else None

    return {
        "accuracy": round(report["accuracy"], 4),
        "verdict": {k: v[k] for k in ("dominant", "underused", "severity", "recommended_fix")},
        "shapley": per("shapley"), "unimodal_accuracy": per("unimodal"), "reliance": per("reliance"),
        "probe": per("probe"), "balance": None if "balance" not in d else round(d["balance"]["value"], 4),
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"audio": "#1f77b4", "visual": "#ff7f0e"}
    stages = [(k, summary[k]) for k in ("clean", "noisy", "rebalanced", "baseline") if summary.get(k)]
    ncols = 3 if summary.get("sweep") else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 3.6))
    for ax, key, title in ((axes[0], "shapley", "Shapley value (accuracy points)"),
                           (axes[1], "unimodal_accuracy", "accuracy with one modality alone")):
        x = np.arange(len(stages))
        for j, m in enumerate(MODALITIES):
            vals = [(s[key] or {}).get(m, np.nan) for _, s in stages]
            ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=m, color=colors[m])
        fix = (summary.get("fix") or {}).get("used", "fix")
        labels = [{"noisy": f"noisy\n{summary['noisy_snr_db']:g} dB", "rebalanced": f"after\n{fix}",
                   "baseline": "baseline\n(plain)"}.get(name, name) for name, _ in stages]
        ax.set_xticks(x, labels)
        ax.set_title(title, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].legend(frameon=False, fontsize=8)
    if summary.get("sweep"):
        ax = axes[2]
        rows = [r for r in summary["sweep"] if r["snr_db"] is not None]
        clean = next((r for r in summary["sweep"] if r["snr_db"] is None), None)
        xs = [r["snr_db"] for r in rows]
        for m in MODALITIES:
            ys = [r["shapley"][m] for r in rows]
            lo = [r["shapley_ci"][m][0] for r in rows]
            hi = [r["shapley_ci"][m][1] for r in rows]
            ax.plot(xs, ys, "o-", color=colors[m], label=m)
            ax.fill_between(xs, lo, hi, color=colors[m], alpha=0.2)
            if clean:
                ax.axhline(clean["shapley"][m], color=colors[m], ls=":", lw=1)
        ax.invert_xaxis()
        ax.set_xlabel("audio SNR (dB); dotted: clean")
        ax.set_title("Shapley value vs audio noise", fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary: dict[str, Any] = {"noisy_snr_db": args.snr, "epochs": args.epochs, "small": args.small}

    print("== 1. clean audio ==")
    clean = train_and_save(out / "clean", None, args.epochs, args.seed)
    summary["clean"] = headline(analyze_cli(clean, out / "clean" / "report", args.bootstrap, args.seed, args.threads))

    print(f"\n== 2. audio at {args.snr:g} dB SNR ==")
    noisy = train_and_save(out / "noisy", args.snr, args.epochs, args.seed)
    summary["noisy"] = headline(analyze_cli(noisy, out / "noisy" / "report", args.bootstrap, args.seed, args.threads))

    if args.sweep and not args.small:
        print("\n== 3. SNR sweep (Python API, Shapley only) ==")
        summary["sweep"] = sweep(out, args.epochs, args.bootstrap, args.seed)

    if not args.no_rebalance:
        print("\n== 4. rebalance the clean model ==")
        rb = rebalance_cli(clean, out / "rebalance", args.rebalance_epochs, args.bootstrap, args.seed, args.threads)
        summary["fix"] = rb["fix"]
        if "after" in rb["reports"]:
            summary["rebalanced"] = headline(rb["reports"]["after"])
        if "baseline" in rb["reports"]:
            summary["baseline"] = headline(rb["reports"]["baseline"])
        keep = ("accuracy", "shapley.audio", "shapley.visual", "unimodal.audio", "unimodal.visual", "balance")
        summary["comparison"] = [r for r in rb["comparison"] if r.get("key") in keep]

    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "summary.png")
    print("\n== summary ==")
    for k in ("clean", "noisy", "rebalanced", "baseline"):
        if summary.get(k):
            s = summary[k]
            v = s["verdict"]
            print(f"{k:>10}: accuracy {s['accuracy']:.3f}  Shapley {s['shapley']}  unimodal {s['unimodal_accuracy']}  "
                  f"-> {v['severity']} dominance of {v['dominant']}, fix {v['recommended_fix']}")
    print(f"wrote {out / 'summary.json'} and {out / 'summary.png'} ({summary['seconds']} s)")
    return summary


if __name__ == "__main__":
    main()
