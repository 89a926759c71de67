"""The embedded default: AV-digits (real digit images + synthesised spoken digits), a small
audio-visual network trained on it, and a full analysis. No network access, no arguments.

With clean audio the jointly trained network leans on the audio and leaves the image branch
under-trained; ``snr_db`` adds noise to the audio and moves the balance: about -5 dB balances the two, and
below -10 dB the image dominates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmdiag.api import analyze
from mmdiag.collect import ProgressFn
from mmdiag.report import Report

#: demo training budget (measured: well under a minute on two CPU cores)
DEMO_EPOCHS = 20
DEMO_LR = 3e-3


@dataclass(frozen=True)
class DemoData:
    """Train and validation arrays of AV-digits."""

    train: dict[str, Any]
    val: dict[str, Any]


def demo_data(snr_db: float | None = None, seed: int = 0, views: tuple[str, ...] = ("audio", "visual")) -> DemoData:
    """AV-digits split 70/30 (deterministic for a seed)."""
    from mmdiag.avdigits import load_avdigits, split_indices

    arrays = load_avdigits(snr_db=snr_db, seed=seed, views=views)
    train_idx, val_idx = split_indices(len(arrays["label"]), 0.3, seed)
    return DemoData({k: v[train_idx] for k, v in arrays.items()}, {k: v[val_idx] for k, v in arrays.items()})


def demo_model(data: DemoData, epochs: int = DEMO_EPOCHS, seed: int = 0) -> torch.nn.Module:
    """A freshly trained :class:`~mmdiag.demo_model.AVDigitsNet` (plain joint training)."""
    from mmdiag.demo_model import AVDigitsNet, train_plain

    torch.manual_seed(seed)
    model = AVDigitsNet()
    train_plain(model, data.train, epochs=epochs, seed=seed, lr=DEMO_LR)
    return model.eval()


def run_demo(out: Path | None = None, *, snr_db: float | None = None, epochs: int = DEMO_EPOCHS, seed: int = 0,
             bootstrap: int = 1000, only: list[str] | None = None, progress: ProgressFn | None = None) -> Report:
    """Train the demo model and analyze it on the validation split; writes the report when ``out`` is given."""
    data = demo_data(snr_db=snr_db, seed=seed)
    model = demo_model(data, epochs=epochs, seed=seed)
    report = analyze(
        model, data.val, modalities=("audio", "visual"), bootstrap=bootstrap, seed=seed, only=only,
        settings={"model": "mmdiag.demo_model:AVDigitsNet", "data": f"AV-digits validation split (snr_db={snr_db})",
                  "checkpoint": None, "demo_epochs": epochs},
        progress=progress,
    )
    if out is not None:
        from mmdiag.render import write_outputs

        write_outputs(report, Path(out))
    return report  # type: ignore[return-value]
