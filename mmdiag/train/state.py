"""The train state: what a checkpoint holds, the random generators, resuming, and Ctrl-C.

After every epoch (and at the batch boundary where Ctrl-C stops a run) the whole state is written
atomically to ``out_dir/checkpoint.pt``: model and auxiliary-module weights, optimizer and scheduler
state, ``fix.state_dict()``, the RNG states of torch/numpy/python/the data order (as tensors), the
position, the history and the settings. The file holds only tensors and primitives, so it loads with
``torch.load(weights_only=True)``; resuming refuses a checkpoint written with other settings.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from mmdiag.errors import TrainError
from mmdiag.fixes.base import Fix
from mmdiag.io import write_atomic_with
from mmdiag.train.history import History

__all__ = ["CHECKPOINT", "Interrupted", "Position", "StopFlag", "TrainState", "json_params",
           "load_training_checkpoint", "rng_state", "seed_all", "set_rng_state", "settings_mismatch"]

#: File name of the training checkpoint inside ``out_dir``.
CHECKPOINT = "checkpoint.pt"
_FORMAT = 1


class Interrupted(KeyboardInterrupt):
    """Raised by :func:`~mmdiag.train.fit` after Ctrl-C once the state at a batch boundary is checkpointed.

    Attributes: ``checkpoint`` (path or None when there is no ``out_dir``), ``epoch`` and ``batch``
    (the position training resumes from).
    """

    def __init__(self, checkpoint: str | None, epoch: int, batch: int) -> None:
        where = f"; resume from {checkpoint}" if checkpoint else ""
        super().__init__(f"training interrupted at epoch {epoch}, batch {batch}{where}")
        self.checkpoint = checkpoint
        self.epoch = epoch
        self.batch = batch


class StopFlag:
    """First SIGINT sets the flag (the loop stops at the next batch boundary); a second one
    raises KeyboardInterrupt at once. Only installed from the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            try:
                self._old = signal.signal(signal.SIGINT, self._handler)
                self._installed = True
            except (ValueError, OSError):
                self._installed = False
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._old)


# ----------------------------------------------------------------------------------------------
# RNG state as tensors (weights_only-loadable)
# ----------------------------------------------------------------------------------------------


def rng_state(data_gen: torch.Generator) -> dict[str, Any]:
    """The states of torch's, numpy's and Python's global generators and of ``data_gen``, as tensors."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
        "data": data_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], data_gen: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), int(state["numpy_has_gauss"]),
                         float(state["numpy_gauss"])))
    random.setstate((int(state["python_version"]), tuple(int(v) for v in state["python_state"].tolist()),
                     state["python_gauss"]))
    data_gen.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


def load_training_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`~mmdiag.train.fit` (``weights_only=True``);
    TrainError if unusable."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise TrainError(
            f"No training checkpoint at {path}. Resume needs the folder of an earlier run "
            f"(the `out_dir` of a rebalance run, holding {CHECKPOINT})."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise TrainError(f"Training checkpoint {path} cannot be read: {type(exc).__name__}: {exc}.") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT or "model" not in state:
        raise TrainError(f"{path} is not an mmdiag training checkpoint (format {_FORMAT}).")
    return state


def json_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A fix's parameters with every value a JSON primitive (others as text)."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (bool, int, float, str)) or x is None else str(x) for x in v]
        else:
            out[k] = str(v)
    return out


def settings_mismatch(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: checkpoint X, now Y`` for every setting that differs (floats compared with isclose)."""
    diffs = []
    for key, value in now.items():
        old = saved.get(key)
        same = old == value or (isinstance(old, float) and isinstance(value, float) and math.isclose(old, value))
        if not same:
            diffs.append(f"{key}: checkpoint {old!r}, now {value!r}")
    return diffs


def fresh_partial() -> dict[str, Any]:
    """The running sums of an epoch that has not started."""
    return {"loss_sum": 0.0, "count": 0.0, "logs": {}}


@dataclass
class Position:
    """Where training (re)starts: the epoch, the batch within it, the data-order generator state
    of that epoch (mid-epoch resumes) and the epoch's running sums so far."""

    epoch: int = 0
    batch: int = 0
    epoch_data_rng: Tensor | None = None
    partial: dict[str, Any] = field(default_factory=fresh_partial)


@dataclass
class TrainState:
    """Everything a checkpoint saves and a resume restores.

    ``path`` is the checkpoint file (None: nothing is written); only the ``main`` process writes.
    """

    model: nn.Module
    aux: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    scheduler: Any
    fix: Fix
    data_gen: torch.Generator
    history: History
    settings: dict[str, Any]
    path: Path | None
    main: bool = True

    def save(self, epoch: int, batch: int, epoch_rng: Tensor | None, partial: Mapping[str, Any] | None) -> None:
        """Write the state at ``epoch``/``batch`` atomically (nothing without a path or off rank 0)."""
        if self.path is None or not self.main:
            return
        state = {
            "format": _FORMAT,
            "epoch": epoch,
            "batch": batch,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "aux": {k: v.detach().cpu() for k, v in self.aux.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "fix": self.fix.state_dict(),
            "rng": rng_state(self.data_gen),
            "epoch_data_rng": epoch_rng,
            "partial": dict(partial) if partial is not None else None,
            "history": self.history.rows,
            "settings": self.settings,
        }
        write_atomic_with(self.path, lambda tmp: torch.save(state, tmp))

    def restore(self, saved: Mapping[str, Any]) -> Position:
        """Load a checkpoint read by :func:`load_training_checkpoint`; the position to continue from.

        Raises:
            TrainError: the checkpoint was written with other settings, or its state does not fit.
        """
        diffs = settings_mismatch(saved.get("settings", {}), self.settings)
        if diffs:
            raise TrainError(
                f"Cannot resume from {self.path}: the run was started with other settings ("
                + "; ".join(diffs) + "). Resume with the original settings, or start a new run in another folder."
            )
        try:
            self.model.load_state_dict(saved["model"])
            self.aux.load_state_dict(saved["aux"])
            self.optimizer.load_state_dict(saved["optimizer"])
            if self.scheduler is not None and saved.get("scheduler") is not None:
                self.scheduler.load_state_dict(saved["scheduler"])
            self.fix.load_state_dict(saved["fix"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise TrainError(f"Cannot resume from {self.path}: its state does not fit ({exc}).") from None
        set_rng_state(saved["rng"], self.data_gen)
        pos = Position(int(saved["epoch"]), int(saved["batch"]), saved.get("epoch_data_rng"),
                       dict(saved.get("partial") or fresh_partial()))
        self.history.rows = [dict(r) for r in saved.get("history", [])]
        self.history.resumed_from = {"epoch": pos.epoch, "batch": pos.batch}
        return pos
