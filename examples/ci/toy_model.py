"""A toy audio-visual classifier for the CI examples (stands in for your own model).

``build`` is the model factory the examples pass to ``mmdiag analyze --model``. Run this file to
produce what a training job would hand over to CI: a state_dict checkpoint and a validation set::

    python examples/ci/toy_model.py --out ci-artifacts                 # balanced model: the gate passes
    python examples/ci/toy_model.py --out ci-artifacts --strength 3,0.8   # audio dominates: the gate fails
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mmdiag.examples_data.synthetic import ToyNet, fit_toy, make_toy

MODALITIES = ("audio", "visual")


def build(modalities: Sequence[str] = MODALITIES, in_dim: int = 8, n_classes: int = 4,
          fusion: str = "concat") -> ToyNet:
    """The model factory: a late-fusion ToyNet whose forward takes one dict of tensors."""
    return ToyNet(list(modalities), in_dim=in_dim, n_classes=n_classes, fusion=fusion)  # type: ignore[arg-type]


def make_artifacts(out: str | Path, strength: Sequence[float] = (1.6, 1.6), seed: int = 0,
                   epochs: int = 8) -> tuple[Path, Path]:
    """Train a toy model; write ``out/model.pt`` (state_dict) and ``out/val.npz`` (held-out data)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    full = make_toy(n=1000, strength=tuple(strength), modalities=MODALITIES, seed=seed)
    train = {k: v[:600] for k, v in full.items()}
    val = {k: v[600:] for k, v in full.items()}
    torch.manual_seed(seed)
    model = fit_toy(build(), train, epochs=epochs, seed=seed)
    torch.save(model.state_dict(), out / "model.pt")
    np.savez(out / "val.npz", **val)
    return out / "model.pt", out / "val.npz"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="ci-artifacts", help="folder for model.pt and val.npz")
    parser.add_argument("--strength", default="1.6,1.6",
                        help="signal strength of audio,visual (unequal values make one modality dominate)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ckpt, data = make_artifacts(args.out, [float(s) for s in args.strength.split(",")], args.seed)
    print(f"wrote {ckpt} and {data}")


if __name__ == "__main__":
    main()
