"""Adopt an mmdiag fix in your own training loop: three hook calls.

Your model stays as it is (here a research-style audio-visual net with a positional forward and a
linear concat head); a :class:`mmdiag.ModelAdapter` finds its encoders by name. The loop is yours;
the fix plugs in with ``fix_step`` (forward + the fix's forward and loss), ``after_backward``
(gradient changes) and ``on_epoch_end``, between ``setup`` and a ``teardown`` in ``finally``.

Run it::

    python examples/own_loop.py --fix ogm_ge --param alpha=0.8
    python examples/own_loop.py --fix modality_dropout --epochs 10

It trains on a synthetic audio-visual dataset in which the audio carries most of the label signal
(mmdiag's dominance toy) and prints the fused and the unimodal validation accuracies per epoch;
``--fix none`` is the plain baseline.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmdiag import ModelAdapter
from mmdiag.fixes import FIXES, FixContext, fix_step
from mmdiag.examples_data.synthetic import make_toy


class AudioVisualNet(nn.Module):
    """A late-fusion classifier written the usual research way."""

    def __init__(self, in_dim: int = 8, hidden: int = 32, n_classes: int = 4) -> None:
        super().__init__()
        self.audio_net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.visual_net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.fusion_head = nn.Linear(2 * hidden, n_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.fusion_head(torch.cat([self.audio_net(audio), self.visual_net(visual)], dim=1))


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            out[key] = value
    return out


@torch.no_grad()
def accuracies(adapter: ModelAdapter, x: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, float]:
    """Fused accuracy and each modality's accuracy with the other one masked (feature level)."""
    adapter.model.eval()
    logits, feats = adapter.encode(x)
    out = {"fused": float((logits.argmax(1) == y).float().mean())}
    for m in adapter.modalities:
        z = adapter.subset_logits(x, [m], features=feats)
        out[f"{m}-only"] = float((z.argmax(1) == y).float().mean())
    adapter.model.train()
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fix", default="ogm_ge", help="a registered fix (mmdiag list fixes)")
    parser.add_argument("--param", action="append", default=[], help="KEY=VALUE parameter of the fix")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n", type=int, default=1000, help="samples (70%% train, 30%% validation)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = make_toy(n=args.n, strength=(3.0, 0.8), modalities=["audio", "visual"], seed=args.seed)
    cut = int(0.7 * args.n)
    xs = {m: torch.as_tensor(data[m]) for m in ("audio", "visual")}
    ys = torch.as_tensor(data["label"])
    train_x, train_y = {m: v[:cut] for m, v in xs.items()}, ys[:cut]
    val_x, val_y = {m: v[cut:] for m, v in xs.items()}, ys[cut:]

    torch.manual_seed(args.seed)
    model = AudioVisualNet()
    adapter = ModelAdapter(model, ("audio", "visual"))  # finds audio_net, visual_net and fusion_head
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    fix = FIXES.get(args.fix)(**parse_params(args.param))
    ctx = FixContext(adapter, optimizer, epochs=args.epochs, n_classes=4)

    fix.setup(ctx)
    try:
        gen = torch.Generator().manual_seed(args.seed)
        metrics: dict[str, float] = {}
        for epoch in range(args.epochs):
            model.train()
            order = torch.randperm(cut, generator=gen)
            for index, start in enumerate(range(0, cut, 64)):
                idx = order[start:start + 64]
                inputs, labels = {m: v[idx] for m, v in train_x.items()}, train_y[idx]
                step = fix_step(ctx, fix, inputs, labels, epoch, index)  # 1. forward with the fix
                optimizer.zero_grad()
                step.loss.backward()
                fix.after_backward(ctx, step)                           # 2. gradient changes
                optimizer.step()
            signals = fix.on_epoch_end(ctx, epoch) or fix.signals()    # 3. epoch-level update
            metrics = accuracies(adapter, val_x, val_y)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            sig = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in signals.items())
            print(f"epoch {epoch}: {shown}" + (f" | {sig}" if sig else ""))
    finally:
        fix.teardown(ctx)  # always: removes anything the fix installed
    plain_loss = F.cross_entropy(model(val_x["audio"], val_x["visual"]), val_y)
    metrics["val_loss"] = float(plain_loss.detach())
    return metrics


if __name__ == "__main__":
    main()
