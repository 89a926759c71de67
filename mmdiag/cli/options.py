"""Options shared by the commands that load a model and data (``analyze`` and ``rebalance``).

One definition each, so the flags read and behave the same in every command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

MODALITIES: Optional[str] = typer.Option(None, "--modalities", help="Comma-separated modality names (default: from the data).")
CALL: Optional[str] = typer.Option(None, "--call", help="Forward convention: dict, kwargs or positional (default: detected).")
ENCODER: Optional[list[str]] = typer.Option(None, "--encoder", metavar="MODALITY=MODULE", help="MODALITY=MODULE naming each encoder (repeatable).")
HEAD: Optional[str] = typer.Option(None, "--head", help="Dotted name of the fusion head (default: detected).")
MASK: str = typer.Option("zero", "--mask", help="How an absent modality is filled: zero, mean or noise.")
MASK_AT: Optional[str] = typer.Option(None, "--mask-at", help="input or feature (default: feature when encoders are known).")
TRUST: bool = typer.Option(False, "--trust-checkpoint", help="Allow checkpoints that need full unpickling (runs code from the file).")
CHECKPOINT_KEY: Optional[str] = typer.Option(None, "--checkpoint-key", help="Entry of the checkpoint that holds the state dict, e.g. ema_state_dict or model.state_dict (default: detected).")
STRIP_PREFIX: Optional[str] = typer.Option(None, "--strip-prefix", help="Strip exactly this prefix from the checkpoint's keys, e.g. model. (default: detected).")
DEVICE: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
NAN_POLICY: str = typer.Option("error", "--nan-policy", help="Samples with NaN/Inf inputs: error or skip.")
NUM_CLASSES: Optional[int] = typer.Option(None, "--num-classes", help="Number of classes (default: from the labels).")
CONFIG: Optional[Path] = typer.Option(None, "--config", help="TOML config (default: ./mmdiag.toml or [tool.mmdiag] in ./pyproject.toml).")
MISSING: Optional[str] = typer.Option(None, "--missing", help="Test-time missing rate of each modality, independent: MODALITY=RATE,... e.g. rgb=0.3,depth=0.5 (or [deployment] missing/combinations in the config). The deployment diagnostic reports the expected accuracy under it (default: every non-empty combination equally likely).")
MISSING_REBALANCE: Optional[str] = typer.Option(None, "--missing", help="Test-time missing rate of each modality, independent: MODALITY=RATE,... e.g. rgb=0.3,depth=0.5 (or [deployment] missing/combinations in the config). The deployment diagnostic of every analysis reports the expected accuracy under it (default: every non-empty combination equally likely); it does not change what mmanet, dmrnet and restore train on (their uniform mix): --fix-param missing=... does.")
LOG_TO: Optional[list[str]] = typer.Option(None, "--log-to", metavar="TRACKER[:WHERE]", help="Also log the results to an experiment tracker (repeatable): tensorboard:DIR, mlflow[:TRACKING_URI] or wandb[:PROJECT] (W&B offline unless WANDB_MODE or WANDB_API_KEY is set). Needs pip install mmdiag[trackers].")
