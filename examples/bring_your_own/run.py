"""Bring your own model: analyse a research-code model from its files, with command-line flags only.

``model.py`` is written the way published training code is: positional ``forward(audio, visual)``
returning ``(logits, audio_feature, visual_feature)``, encoders ``audio_net`` / ``visual_net``,
BatchNorm in the audio encoder, and a *gated* fusion head. This script plays the part of the
user's own training script: it trains the model on AV-digits, saves the checkpoint the usual way,
``torch.save({"state_dict": model.state_dict(), "epoch": n}, "ckpt.pth")``, and the validation data
as ``val.npz`` (one array per modality, in forward's order, plus ``label``), into a project folder
(``--out``, default ``examples/bring_your_own/out``) next to a copy of ``model.py``. Then, in that
folder, the whole analysis is one command with no config and no adapter code::

    mmdiag analyze --model model.py:build --checkpoint ckpt.pth --data val.npz --out report

mmdiag detects the positional call convention from forward's signature, takes the logits from the
tuple, unwraps ``state_dict`` from the checkpoint, finds the encoders from their names and the head
``fusion_module``, and masks at the encoder outputs, which works for a gated head as for concat.

    python examples/bring_your_own/run.py            # full sizes
    python examples/bring_your_own/run.py --small    # CI sizes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
COMMAND = ["analyze", "--model", "model.py:build", "--checkpoint", "ckpt.pth", "--data", "val.npz", "--out", "report"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="CI sizes: fewer epochs")
    p.add_argument("--out", type=Path, default=HERE / "out", help="the project folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 15; 6 with --small)")
    p.add_argument("--no-analyze", action="store_true", help="only train and save (run the command yourself)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    args.epochs = args.epochs or (6 if args.small else 15)
    return args


def train_like_research_code(folder: Path, epochs: int, seed: int) -> None:
    """What the user's train.py does: train, save ckpt.pth and the validation split."""
    sys.path.insert(0, str(folder))
    try:
        from model import build  # the copy in the project folder
    finally:
        sys.path.pop(0)
    from mmdiag.examples_data.avdigits import load_avdigits, split_indices

    data = load_avdigits(views=("audio", "visual"))
    tr, va = split_indices(len(data["label"]), 0.3, seed)
    torch.manual_seed(seed)
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    audio, visual, label = (torch.as_tensor(data[k][tr]) for k in ("audio", "visual", "label"))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(label), generator=gen)
        total = 0.0
        for start in range(0, len(order), 64):
            i = order[start:start + 64]
            out, _, _ = model(audio[i], visual[i])
            loss = F.cross_entropy(out, label[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(i)
        print(f"epoch {epoch}: loss {total / len(label):.4f}")
    torch.save({"state_dict": model.state_dict(), "epoch": epochs}, folder / "ckpt.pth")
    np.savez(folder / "val.npz", audio=data["audio"][va], visual=data["visual"][va], label=data["label"][va])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder: Path = args.out.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    shutil.copy(HERE / "model.py", folder / "model.py")
    train_like_research_code(folder, args.epochs, args.seed)
    print(f"saved {folder / 'ckpt.pth'} and {folder / 'val.npz'}")
    summary: dict[str, Any] = {"epochs": args.epochs, "small": args.small, "command": "mmdiag " + " ".join(COMMAND)}
    if not args.no_analyze:
        print(f"\n(in {folder.name}/) $ mmdiag " + " ".join(COMMAND), flush=True)
        env = {**os.environ, "COLUMNS": "110"}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        if (folder / "report" / "report.json").exists():
            shutil.rmtree(folder / "report")
        proc = subprocess.run([sys.executable, "-m", "mmdiag", *COMMAND], cwd=folder, env=env, text=True,
                              capture_output=True)
        print(proc.stdout, end="")
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"mmdiag analyze exited with {proc.returncode}")
        report = json.loads((folder / "report" / "report.json").read_text())
        summary.update({
            "accuracy": round(report["accuracy"], 4),
            "verdict": report["verdict"],
            "adapter": report["settings"].get("adapter"),
            "checkpoint_format": report["settings"].get("checkpoint_format"),
            "values": {name: {m: round(v, 4) for m, v in r["per_modality"].items()}
                       for name, r in report["diagnostics"].items()},
            "failures": report["failures"],
        })
    summary["seconds"] = round(time.time() - t0, 1)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
