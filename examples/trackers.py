"""Send an mmdiag report to experiment trackers: TensorBoard, MLflow, Weights & Biases.

Needs ``pip install mmdiag[trackers]``. Run it::

    python examples/trackers.py --out runs/trackers
    tensorboard --logdir runs/trackers/tensorboard       # scalars shapley.audio, ..., verdict as text
    mlflow ui --backend-store-uri runs/trackers/mlruns   # (MLFLOW_ALLOW_FILE_STORE=true for a file store)

It trains a small audio-visual classifier whose audio dominates (mmdiag's synthetic toy), analyzes it,
writes the report folder as ``mmdiag analyze`` does, and logs it with ``report.log_to(...)``: every
value under its gate key (``shapley.audio``, ``unimodal.visual``, ``balance``, ``verdict.severity``...),
the settings as params, the verdict as tags, the report files as artifacts. ``--tracker wandb`` adds a
W&B run (offline unless ``WANDB_MODE`` or ``WANDB_API_KEY`` is set). The command line does the same
with ``mmdiag analyze ... --log-to tensorboard:DIR --log-to mlflow``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch

from mmdiag import ModelAdapter, analyze
from mmdiag.examples_data.synthetic import ToyNet, make_toy
from mmdiag.render import write_outputs
from mmdiag.train import fit

MODALITIES = ["audio", "visual"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/trackers")
    parser.add_argument("--tracker", action="append", default=None,
                        help="tensorboard:DIR, mlflow[:URI] or wandb[:PROJECT] (repeatable; default: TensorBoard "
                             "and an MLflow file store under --out)")
    parser.add_argument("--n", type=int, default=1200, help="samples (70%% train, 30%% test)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    trackers = args.tracker or [f"tensorboard:{out / 'tensorboard'}", f"mlflow:{(out / 'mlruns').as_uri()}"]

    data = make_toy(n=args.n, strength=(3.0, 0.8), modalities=MODALITIES, seed=args.seed)
    cut = int(0.7 * args.n)
    train = {k: v[:cut] for k, v in data.items()}
    test = {k: v[cut:] for k, v in data.items()}
    torch.manual_seed(args.seed)
    model = ToyNet(MODALITIES)
    fit(ModelAdapter(model, MODALITIES), train, epochs=args.epochs, lr=0.05, seed=args.seed, device="cpu")

    report = analyze(model, test, modalities=MODALITIES, only=["unimodal", "shapley", "balance"], bootstrap=200)
    write_outputs(report, out / "report")
    print(report.verdict.headline())
    logged = [report.log_to(target, artifacts=out / "report") for target in trackers]
    for where in logged:
        print(f"logged to {where}")
    return {"report": report, "logged": logged}


if __name__ == "__main__":
    main()
