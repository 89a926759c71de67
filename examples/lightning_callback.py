"""Rebalance and diagnose a multimodal classifier inside a Lightning ``Trainer``.

Needs ``pip install mmdiag[lightning]``. Run it::

    python examples/lightning_callback.py --fix ogm_ge --epochs 5 --out runs/lightning

The model is an ordinary LightningModule around a late-fusion net; two callbacks do the rest:
``RebalanceCallback`` applies an mmdiag fix (here OGM-GE, which rescales the dominant encoder's
gradients before each optimizer step) and ``DiagnoseCallback`` logs ``unimodal.<m>``,
``shapley.<m>``, ``balance`` and ``verdict.severity`` after each validation epoch and writes the last
report as ``mmdiag_report.json`` into the logger's folder. The one line a fix that changes the loss
needs is ``self.rebalance_loss(batch, logits, loss)`` (RebalanceMixin).
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from mmdiag.examples_data.synthetic import make_toy
from mmdiag.integrations.lightning import DiagnoseCallback, RebalanceCallback, RebalanceMixin
from mmdiag.loading import dataset_from_arrays

MODALITIES = ("audio", "visual")


class AudioVisualNet(nn.Module):
    def __init__(self, in_dim: int = 8, hidden: int = 32, n_classes: int = 4) -> None:
        super().__init__()
        self.audio_net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.visual_net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.fusion_head = nn.Linear(2 * hidden, n_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.fusion_head(torch.cat([self.audio_net(audio), self.visual_net(visual)], dim=1))


class Classifier(RebalanceMixin, pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.model = AudioVisualNet()  # RebalanceCallback finds it (model_attr="model" by default)
        self.lr = lr

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["audio"], batch["visual"])
        loss = F.cross_entropy(logits, batch["label"])
        return self.rebalance_loss(batch, logits, loss)  # needed only by fixes that change the loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.model(batch["audio"], batch["visual"])
        self.log("val_acc", (logits.argmax(1) == batch["label"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)  # OGM-GE is made for SGD


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fix", default="ogm_ge")
    parser.add_argument("--alpha", type=float, default=0.8, help="OGM-GE's alpha (ignored by other fixes)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--n", type=int, default=1000, help="samples (70%% train, 30%% validation)")
    parser.add_argument("--out", default="runs/lightning")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    data = make_toy(n=args.n, strength=(3.0, 0.8), modalities=list(MODALITIES), seed=args.seed)
    cut = int(0.7 * args.n)
    train = {k: v[:cut] for k, v in data.items()}
    val = {k: v[cut:] for k, v in data.items()}

    params = {"alpha": args.alpha} if args.fix == "ogm_ge" else {}
    rebalance = RebalanceCallback(args.fix, MODALITIES, **params)
    diagnose = DiagnoseCallback(val, modalities=MODALITIES, bootstrap=50)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                         logger=pl.loggers.CSVLogger(args.out, name="mmdiag"), default_root_dir=args.out,
                         callbacks=[rebalance, diagnose])
    trainer.fit(Classifier(),
                DataLoader(dataset_from_arrays(train), batch_size=64, shuffle=True),
                DataLoader(dataset_from_arrays(val), batch_size=256))
    assert diagnose.report is not None
    metrics = diagnose.metrics(diagnose.report)
    print(diagnose.report.verdict.headline())
    print(", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    print(f"report: {diagnose.path}")
    return {"metrics": metrics, "report": str(diagnose.path)}


if __name__ == "__main__":
    main()
