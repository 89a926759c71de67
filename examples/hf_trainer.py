"""Rebalance and diagnose a multimodal classifier inside a Hugging Face ``Trainer``.

Needs ``pip install mmdiag[hf]``. Run it::

    python examples/hf_trainer.py --fix ogm_ge --epochs 5 --out runs/hf

The model is an ordinary ``nn.Module`` with a Hugging Face style forward (keyword inputs and
``labels``, returning a dict with ``loss`` and ``logits``). ``RebalanceCallback`` applies an mmdiag fix
(here OGM-GE, which rescales the dominant encoder's gradients before each optimizer step);
``MMDiagTrainer`` is the ``Trainer`` subclass whose ``compute_loss`` hands the loss to fixes that change
it (``--fix modality_dropout``, ``cal``, ...). ``DiagnoseCallback`` adds ``eval_unimodal.<m>``,
``eval_shapley.<m>``, ``eval_balance`` and ``eval_verdict.severity`` to every evaluation and writes the
last report as ``mmdiag_report.json`` into ``output_dir``.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainingArguments

from mmdiag.examples_data.synthetic import make_toy
from mmdiag.integrations.hf import DiagnoseCallback, MMDiagTrainer, RebalanceCallback
from mmdiag.loading import dataset_from_arrays

MODALITIES = ("audio", "visual")


class AudioVisualNet(nn.Module):
    def __init__(self, in_dim: int = 8, hidden: int = 32, n_classes: int = 4) -> None:
        super().__init__()
        self.audio_net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.visual_net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.fusion_head = nn.Linear(2 * hidden, n_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.fusion_head(torch.cat([self.audio_net(audio), self.visual_net(visual)], dim=1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fix", default="ogm_ge")
    parser.add_argument("--alpha", type=float, default=0.8, help="OGM-GE's alpha (ignored by other fixes)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--n", type=int, default=1000, help="samples (70%% train, 30%% validation)")
    parser.add_argument("--out", default="runs/hf")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    data = make_toy(n=args.n, strength=(3.0, 0.8), modalities=list(MODALITIES), seed=args.seed)
    cut = int(0.7 * args.n)
    train = {k: v[:cut] for k, v in data.items()}
    val = {k: v[cut:] for k, v in data.items()}

    model = AudioVisualNet()
    params = {"alpha": args.alpha} if args.fix == "ogm_ge" else {}
    rebalance = RebalanceCallback(args.fix, MODALITIES, **params)
    diagnose = DiagnoseCallback(val, modalities=MODALITIES, bootstrap=50)
    training = TrainingArguments(
        output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=64,
        per_device_eval_batch_size=256, learning_rate=0.05, lr_scheduler_type="constant", seed=args.seed,
        max_grad_norm=0.0,  # OGM-GE scales raw gradients (the Trainer would clip them before the fix)
        eval_strategy="epoch", save_strategy="no", logging_strategy="epoch", report_to="none", use_cpu=True,
        disable_tqdm=True)
    trainer = MMDiagTrainer(
        model=model, args=training, train_dataset=dataset_from_arrays(train), eval_dataset=dataset_from_arrays(val),
        callbacks=[rebalance, diagnose],
        # OGM-GE is made for SGD with momentum (Adam normalises the rescaled gradients away)
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), None))
    trainer.train()
    metrics = trainer.evaluate()
    assert diagnose.report is not None
    print(diagnose.report.verdict.headline())
    print(", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("eval_") and "." in k))
    print(f"report: {diagnose.path}")
    return {"metrics": metrics, "report": str(diagnose.path)}


if __name__ == "__main__":
    main()
