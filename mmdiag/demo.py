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
    from mmdiag.examples_data.avdigits import load_avdigits, split_indices

    arrays = load_avdigits(snr_db=snr_db, seed=seed, views=views)
    train_idx, val_idx = split_indices(len(arrays["label"]), 0.3, seed)
    return DemoData({k: v[train_idx] for k, v in arrays.items()}, {k: v[val_idx] for k, v in arrays.items()})


def demo_model(data: DemoData, epochs: int = DEMO_EPOCHS, seed: int = 0) -> torch.nn.Module:
    """A freshly trained :class:`~mmdiag.examples_data.demo_model.AVDigitsNet` (plain joint training)."""
    from mmdiag.examples_data.demo_model import AVDigitsNet, train_plain

    torch.manual_seed(seed)
    model = AVDigitsNet()
    train_plain(model, data.train, epochs=epochs, seed=seed, lr=DEMO_LR)
    return model.eval()


#: the factory the demo's model comes from (what the written config names)
DEMO_FACTORY = "mmdiag.examples_data.demo_model:AVDigitsNet"


def run_demo(out: Path | None = None, *, snr_db: float | None = None, epochs: int = DEMO_EPOCHS, seed: int = 0,
             bootstrap: int = 1000, only: list[str] | None = None, progress: ProgressFn | None = None) -> Report:
    """Train the demo model and analyze it on the validation split.

    With ``out``, also writes the report and what the next commands need: the trained model
    (``model.pt``), the data (``train.npz``, ``val.npz``) and an ``mmdiag.toml`` naming them (see
    :func:`write_next_steps`).
    """
    data = demo_data(snr_db=snr_db, seed=seed)
    model = demo_model(data, epochs=epochs, seed=seed)
    report = analyze(
        model, data.val, modalities=("audio", "visual"), bootstrap=bootstrap, seed=seed, only=only,
        settings={"model": DEMO_FACTORY, "data": f"AV-digits validation split (snr_db={snr_db})",
                  "checkpoint": None, "demo_epochs": epochs},
        progress=progress,
    )
    if out is not None:
        from mmdiag.render import write_outputs

        write_outputs(report, Path(out))
        write_next_steps(Path(out), model, data, seed=seed)
    return report  # type: ignore[return-value]


def write_next_steps(out: Path, model: torch.nn.Module, data: DemoData, seed: int = 0) -> Path:
    """Save the model, the data and an ``mmdiag.toml`` so that ``mmdiag analyze --config`` and
    ``mmdiag rebalance --config`` work on the demo as they are; returns the config's path.

    Paths in the config are written as ``out`` was given (relative to the folder the demo ran in),
    so the printed commands work from there.
    """
    import numpy as np

    from mmdiag.io import write_atomic, write_atomic_with

    write_atomic_with(out / "model.pt", lambda tmp: torch.save(model.state_dict(), tmp))
    def save_npz(arrays: dict[str, Any]) -> Any:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: savez would add ".npz" to a name
                np.savez(fh, **arrays)
        return write

    for name, arrays in (("train", data.train), ("val", data.val)):
        write_atomic_with(out / f"{name}.npz", save_npz(arrays))
    config = out / "mmdiag.toml"
    write_atomic(config, 
        "# Written by `mmdiag demo`: the trained demo model and its data. Run from the folder the demo\n"
        "# ran in: `mmdiag analyze --config " + str(config) + "` and `mmdiag rebalance --config " + str(config) + "`.\n"
        f"model = {_toml_str(DEMO_FACTORY)}\n"
        f'checkpoint = {_toml_str(out / "model.pt")}\n'
        f'data = {_toml_str(out / "val.npz")}\n'
        f'out = {_toml_str(out / "analysis")}\n'
        "overwrite = true\n"
        f"seed = {seed}\n\n"
        "[rebalance]  # retrain with the recommended fix, and plainly under the same budget, then compare\n"
        f'data = {_toml_str(out / "train.npz")}\n'
        f'val_data = {_toml_str(out / "val.npz")}\n'
        'fix = "auto"\n'
        "baseline = true\n"
        f"epochs = {DEMO_EPOCHS}\n"
        'optimizer = "adam"  # the recipe the demo model was trained with\n'
        f"lr = {DEMO_LR}\n"
        "batch_size = 64\n"
        f'out = {_toml_str(out / "rebalanced")}\n'
        "overwrite = true\n"
    )
    return config


def _toml_str(value: Any) -> str:
    """A TOML basic string (JSON's escaping is valid TOML for these)."""
    import json

    return json.dumps(str(value))


def next_commands(out: Path) -> list[str]:
    """The two commands the demo ends with: they run on what :func:`write_next_steps` wrote."""
    import shlex

    config = shlex.quote(str(out / "mmdiag.toml"))
    return [f"mmdiag analyze --config {config}", f"mmdiag rebalance --config {config}"]
