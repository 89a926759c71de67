"""train: the short reference training loop that runs a fix's hooks.

:func:`fit` trains the user's model (driven by a :class:`~mmdiag.adapter.ModelAdapter`) with one
:class:`~mmdiag.fixes.base.Fix`::

    fix.setup(ctx)
    for epoch:
        for batch:
            step = fix_step(ctx, fix, inputs, labels, epoch, index)   # forward, fix.forward, fix.loss
            optimizer.zero_grad(); step.loss.backward()
            fix.after_backward(ctx, step)      # after DDP's all-reduce: every rank sees the averaged gradients
            [clip]; optimizer.step()
        scheduler.step(); fix.on_epoch_end(ctx, epoch); evaluate; checkpoint
    fix.teardown(ctx)                          # always, in a ``finally``

Reproducibility and resuming. Everything random is seeded from ``seed``: torch, numpy and Python's
global generators, and a separate generator for the data order (with ``torch.distributed``, the
``DistributedSampler`` order, a function of the seed and the epoch). After every epoch the whole
training state is written atomically (temporary file + ``os.replace``) to ``out_dir/checkpoint.pt``:
model and auxiliary-module weights, optimizer and scheduler state, ``fix.state_dict()``, the RNG
states of torch/numpy/python/the data order (stored as tensors), the position and the history. The
file holds only tensors and primitives, so it loads with ``torch.load(weights_only=True)``.
``resume=True`` continues from it; on CPU the final weights are bit-identical to an uninterrupted
run with the same seed (the test suite checks ``torch.equal`` on every parameter).

Ctrl-C. While :func:`fit` runs in the main thread, the first SIGINT does not kill the step in
flight: a flag is set and the loop stops at the next *batch boundary*, writes a checkpoint of that
exact state (mid-epoch: the epoch's data-order state, the batch index and the running loss are saved
with it, so resuming replays the rest of the epoch identically) and raises :class:`Interrupted` (a
``KeyboardInterrupt``). A second Ctrl-C interrupts at once; the last checkpoint on disk (the end of
the previous epoch, or the previous boundary) is then the one to resume from. Fixes must keep
within-epoch accumulators in their ``state_dict`` for batch-boundary resumes to be exact.

Several processes. Started by ``torchrun`` (environment ``WORLD_SIZE`` > 1), :func:`fit` joins the
process group (``gloo`` on CPU, ``nccl`` on CUDA, using ``LOCAL_RANK`` for the device), wraps the
model in ``DistributedDataParallel``, shards every epoch with a ``DistributedSampler`` seeded with
``seed``, and only rank 0 writes files. A process group that :func:`fit` joined stays joined for later
calls in the same process (it is left at exit); :func:`distributed` scopes it explicitly.
``fix.after_backward`` runs after ``loss.backward()``
returned, i.e. after DDP's gradient all-reduce, so every rank sees the same averaged gradients and
makes the same change (fixes synchronise their batch statistics with
:meth:`~mmdiag.fixes.base.FixContext.all_reduce_sum`). Fixes that run the fusion head again on the
cached features (readouts through encoder stubs) do several forwards per step through the DDP
wrapper; this works with DDP's defaults as long as every parameter receives a gradient in every
step. ``ddp_kwargs`` passes options such as ``static_graph`` to ``DistributedDataParallel``;
``find_unused_parameters=True`` is *not* compatible with stub forwards (DDP would mark the encoder
parameters unused after the head-only forward and then see their gradients arrive), so it is refused.
Validation runs on every rank on the full validation set with the unwrapped model (identical
weights, no communication), so every rank returns the same history.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import math
import os
import random
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from mmdiag.adapter import ModelAdapter, unwrap
from mmdiag.distributed import resolve_device
from mmdiag.errors import ConfigError, TrainError
from mmdiag.fixes.base import Fix, FixContext, PlainTraining, fix_step

__all__ = ["CHECKPOINT", "OPTIMIZERS", "History", "Interrupted", "TrainProgress", "distributed", "evaluate", "fit",
           "load_training_checkpoint"]

#: File name of the training checkpoint inside ``out_dir``.
CHECKPOINT = "checkpoint.pt"
#: Optimizer names :func:`fit` accepts.
OPTIMIZERS = ("sgd", "adam", "adamw")
_FORMAT = 1


@dataclass
class TrainProgress:
    """What a ``progress`` callback receives after every batch and every epoch.

    Attributes:
        stage: ``batch`` or ``epoch``.
        epoch: 0-based epoch; epochs: planned epochs.
        batch: batches done in this epoch; batches: batches per epoch.
        loss: mean training loss of the epoch so far.
        signals: the fix's latest signals.
        row: the history row (``epoch`` stage only).
    """

    stage: str
    epoch: int
    epochs: int
    batch: int
    batches: int
    loss: float
    signals: dict[str, Any]
    row: dict[str, Any] | None = None


ProgressFn = Callable[[TrainProgress], None]


@dataclass
class History:
    """One row per completed epoch: ``epoch`` (0-based), ``loss``, ``lr``, ``val_loss``,
    ``val_accuracy``, ``unimodal_acc.<m>`` (accuracy with only ``m`` present, others masked as the
    adapter masks), ``signal.<key>`` (the fix's signals), ``log.<key>`` (epoch means of the fix's
    per-step logs) and ``time_s``.

    Attributes:
        rows: the rows.
        fix: name of the fix that was trained.
        checkpoint: path of the last checkpoint written (None without ``out_dir``).
        aux: the auxiliary modules fixes added (unimodal heads...), empty for most fixes.
        resumed_from: epoch (and batch) the run resumed from, when it did.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    fix: str = "none"
    checkpoint: str | None = None
    aux: nn.ModuleDict = field(default_factory=nn.ModuleDict, repr=False)
    resumed_from: dict[str, int] | None = None

    @property
    def last(self) -> dict[str, Any]:
        """The last row ({} before the first epoch)."""
        return self.rows[-1] if self.rows else {}

    def column(self, name: str) -> list[Any]:
        """Values of one column over the epochs (None where a row lacks it)."""
        return [r.get(name) for r in self.rows]

    def to_frame(self) -> Any:
        """The rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write ``history.csv`` atomically."""
        path = Path(path)
        text = self.to_frame().to_csv(index=False)
        _atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return path


class Interrupted(KeyboardInterrupt):
    """Raised by :func:`fit` after Ctrl-C once the state at a batch boundary is checkpointed.

    Attributes: ``checkpoint`` (path or None when there is no ``out_dir``), ``epoch`` and ``batch``
    (the position training resumes from).
    """

    def __init__(self, checkpoint: str | None, epoch: int, batch: int) -> None:
        where = f"; resume from {checkpoint}" if checkpoint else ""
        super().__init__(f"training interrupted at epoch {epoch}, batch {batch}{where}")
        self.checkpoint = checkpoint
        self.epoch = epoch
        self.batch = batch


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _as_dataset(data: Any, modalities: Sequence[str], what: str) -> Dataset:
    if isinstance(data, Mapping):
        from mmdiag.loading import dataset_from_arrays

        return dataset_from_arrays(data, list(modalities), source=what)
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if len(data) == 0:  # type: ignore[arg-type]
            raise ConfigError(f"The {what} is empty; expected at least one sample.")
        return data  # type: ignore[return-value]
    raise ConfigError(
        f"The {what} must be a map-style Dataset of dict items (modalities + 'label') or a dict of "
        f"arrays; found {type(data).__name__}. A DataLoader cannot be resumed exactly: pass its dataset."
    )


def _split(batch: Mapping[str, Any], modalities: Sequence[str], device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Mapping):
        items, labels = dict(batch[0]), batch[1]
    else:
        items = dict(batch)
        labels = items.get("label", items.get("labels"))
    if labels is None:
        raise ConfigError(f"Training items need a 'label'; found keys {sorted(items)}.")
    missing = [m for m in modalities if m not in items]
    if missing:
        raise ConfigError(f"Training items lack the modalities {missing}; they have {sorted(items)}.")
    inputs = {m: torch.as_tensor(items[m]).to(device=device, dtype=torch.float32) for m in modalities}
    return inputs, torch.as_tensor(labels).to(device=device, dtype=torch.long)


class _Batches:
    """Fetches batches of given row indices (fast path for in-memory array datasets)."""

    def __init__(self, dataset: Dataset, modalities: Sequence[str], device: torch.device) -> None:
        self.dataset = dataset
        self.modalities = tuple(modalities)
        self.device = device
        tensors = getattr(dataset, "tensors", None)
        self._tensors: dict[str, Tensor] | None = tensors() if callable(tensors) else None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def get(self, idx: Sequence[int]) -> tuple[dict[str, Tensor], Tensor]:
        if self._tensors is not None:
            rows = torch.as_tensor(list(idx), dtype=torch.long)
            batch = {k: v[rows] for k, v in self._tensors.items() if k in self.modalities or k in ("label", "labels")}
            return _split(batch, self.modalities, self.device)
        from mmdiag.loading import collate

        return _split(collate([self.dataset[int(i)] for i in idx]), self.modalities, self.device)


# ----------------------------------------------------------------------------------------------
# RNG state as tensors (weights_only-loadable)
# ----------------------------------------------------------------------------------------------


def _rng_state(data_gen: torch.Generator) -> dict[str, Any]:
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


def _set_rng_state(state: Mapping[str, Any], data_gen: torch.Generator) -> None:
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


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


# ----------------------------------------------------------------------------------------------
# distributed
# ----------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_available():
        raise TrainError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed.")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as exc:
            raise TrainError(
                f"Could not join the torch.distributed process group ({backend}): {exc}. Start the "
                "command with torchrun (which sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE)."
            ) from None
        created = True
        atexit.register(_leave_group)
    return _Dist(world=dist.get_world_size(), rank=dist.get_rank(), local_rank=local, created=created)


@contextlib.contextmanager
def distributed(device: str | torch.device = "auto") -> Iterator[_Dist]:
    """Join the torch.distributed process group when started by torchrun (``WORLD_SIZE`` > 1) and
    leave it at the end if this call created it. Nested calls (and :func:`fit` inside) reuse it."""
    info = _init_distributed(resolve_device(device))
    try:
        yield info
    finally:
        if info.created:
            _leave_group()


def _leave_group() -> None:
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            # every rank reaches this point before any tears the group down: a rank that leaves
            # while its peer is still in a collective makes gloo abort the peer
            dist.barrier()
            dist.destroy_process_group()


def _any_rank(flag: bool, dist_info: _Dist, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (a tiny all-reduce per call when distributed)."""
    if dist_info.world <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _sum_ranks(values: Sequence[float], dist_info: _Dist, device: torch.device) -> list[float]:
    if dist_info.world <= 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def _log_means(logs: Mapping[str, tuple[float, int]], dist_info: _Dist, device: torch.device) -> dict[str, float]:
    """Epoch means of the fixes' per-step logs, over every rank."""
    keys = sorted(logs)
    if dist_info.world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * dist_info.world
        dist.all_gather_object(gathered, keys)
        keys = sorted(set().union(*gathered))
    sums = _sum_ranks([float(logs.get(k, (0.0, 0))[0]) for k in keys]
                      + [float(logs.get(k, (0.0, 0))[1]) for k in keys], dist_info, device)
    return {k: sums[j] / max(sums[len(keys) + j], 1.0) for j, k in enumerate(keys)}


# ----------------------------------------------------------------------------------------------
# Ctrl-C
# ----------------------------------------------------------------------------------------------


class _StopFlag:
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

    def __enter__(self) -> "_StopFlag":
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
# evaluation
# ----------------------------------------------------------------------------------------------


def evaluate(adapter: ModelAdapter, data: Any, *, batch_size: int = 256, device: str | torch.device = "cpu",
             seed: int = 0) -> dict[str, float]:
    """Validation loss and accuracy with every modality, and each modality's unimodal accuracy.

    Unimodal accuracy of ``m`` is the accuracy with every other modality masked the way the
    adapter masks (feature level from cached encoder outputs when encoders are known, input level
    otherwise). Runs in eval mode without gradients and restores the model's mode; it draws no
    numbers from the global generators (a noise mask uses its own seeded generator).
    """
    dev = resolve_device(device)
    dataset = _as_dataset(data, adapter.modalities, "validation data")
    batches = _Batches(dataset, adapter.modalities, dev)
    model = unwrap(adapter.model)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    n = len(batches)
    loss_sum, correct = 0.0, 0
    uni = {m: 0 for m in adapter.modalities}
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                inputs, labels = batches.get(range(start, min(n, start + batch_size)))
                if adapter.mask_at == "feature" and adapter.has_encoders:
                    logits, feats = adapter.encode(inputs)
                else:
                    logits, feats = adapter.call_model(inputs), None
                loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
                correct += int((logits.argmax(1) == labels).sum())
                for m in adapter.modalities:
                    sub = adapter.subset_logits(inputs, [m], features=feats, generator=gen)
                    uni[m] += int((sub.argmax(1) == labels).sum())
    finally:
        model.train(was_training)
    out = {"val_loss": loss_sum / n, "val_accuracy": correct / n}
    out.update({f"unimodal_acc.{m}": uni[m] / n for m in adapter.modalities})
    return out


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


def load_training_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`fit` (``weights_only=True``); TrainError if unusable."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise TrainError(
            f"No training checkpoint at {path}. Resume needs the folder of an earlier run "
            f"(the --out of a rebalance run, holding {CHECKPOINT})."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise TrainError(f"Training checkpoint {path} cannot be read: {type(exc).__name__}: {exc}.") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT or "model" not in state:
        raise TrainError(f"{path} is not an mmdiag training checkpoint (format {_FORMAT}).")
    return state


def _json_params(params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (bool, int, float, str)) or x is None else str(x) for x in v]
        else:
            out[k] = str(v)
    return out


def _settings_mismatch(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    diffs = []
    for key, value in now.items():
        old = saved.get(key)
        same = old == value or (isinstance(old, float) and isinstance(value, float) and math.isclose(old, value))
        if not same:
            diffs.append(f"{key}: checkpoint {old!r}, now {value!r}")
    return diffs


# ----------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------


def _make_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float,
                    momentum: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _order(n: int, epoch: int, seed: int, data_gen: torch.Generator, dist_info: _Dist) -> list[int]:
    if dist_info.world <= 1:
        return torch.randperm(n, generator=data_gen).tolist()
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=dist_info.world, rank=dist_info.rank,  # type: ignore[arg-type]
                                 shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return list(iter(sampler))


def fit(
    adapter: ModelAdapter,
    train_data: Any,
    *,
    val_data: Any = None,
    fix: Fix | None = None,
    epochs: int = 10,
    optimizer: str = "sgd",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "auto",
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    grad_clip: float | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    eval_batch_size: int = 256,
    ddp_kwargs: Mapping[str, Any] | None = None,
) -> History:
    """Train ``adapter.model`` in place with ``fix`` and return the per-epoch history.

    Args:
        adapter: drives the user's model; its encoders are needed by fixes that touch them.
        train_data, val_data: map-style Datasets of dict items (modalities + ``label``) or dicts of
            arrays. Without ``val_data`` the history has no validation columns.
        fix: the fix (default: plain training, ``none``).
        epochs: planned epochs.
        optimizer: ``sgd`` (with ``momentum``), ``adam`` or ``adamw``; ``lr``, ``weight_decay``.
        batch_size: training batch size (per process under torchrun).
        seed: seeds the global generators, the data order and the evaluation masks.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun: ``cuda:LOCAL_RANK``).
        out_dir: where ``checkpoint.pt`` is written after every epoch (rank 0); None: no files.
        resume: continue from ``out_dir/checkpoint.pt`` (the settings must match the saved ones).
        progress: called with a :class:`TrainProgress` after each batch and each epoch.
        grad_clip: clip the global gradient norm (after ``after_backward``) to this value.
        scheduler: ``scheduler(optimizer)`` builds an LR scheduler stepped once per epoch.
        eval_batch_size: validation batch size.
        ddp_kwargs: extra ``DistributedDataParallel`` options (e.g. ``{"static_graph": True}``).

    Raises:
        ConfigError: bad arguments. TrainError: a fix that needs encoders on a black-box model, a
        missing or incompatible checkpoint on resume. :class:`Interrupted` after Ctrl-C (the state
        is checkpointed first).
    """
    fix = fix if fix is not None else PlainTraining()
    if int(epochs) < 0:
        raise ConfigError(f"epochs must be >= 0; found {epochs}.")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; found {optimizer!r}.")
    if not (float(lr) > 0):
        raise ConfigError(f"lr must be positive; found {lr}.")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be at least 1; found {batch_size}.")
    if float(weight_decay) < 0:
        raise ConfigError(f"weight_decay must be >= 0; found {weight_decay}.")
    if grad_clip is not None and not float(grad_clip) > 0:
        raise ConfigError(f"grad_clip must be positive; found {grad_clip}.")
    ddp_options = dict(ddp_kwargs or {})
    if ddp_options.get("find_unused_parameters"):
        raise ConfigError(
            "find_unused_parameters=True does not work with fixes that run the fusion head on cached "
            "features (the head-only forward makes DDP mark the encoder parameters unused before their "
            "gradients arrive). Leave it off; use static_graph=True if some parameter gets no gradient."
        )
    if resume and out_dir is None:
        raise TrainError("resume=True needs out_dir, the folder holding the checkpoint.pt to continue from.")

    epochs, batch_size, seed = int(epochs), int(batch_size), int(seed)
    device = resolve_device(device)
    dist_info = _init_distributed(device)
    if dist_info.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    out_path = Path(out_dir) if out_dir is not None else None
    ckpt_path = out_path / CHECKPOINT if out_path is not None else None
    ddp_model: nn.Module | None = None
    teardown_needed = False
    ctx: FixContext | None = None
    try:
        train_ds = _as_dataset(train_data, adapter.modalities, "training data")
        val_ds = _as_dataset(val_data, adapter.modalities, "validation data") if val_data is not None else None
        saved = load_training_checkpoint(ckpt_path) if resume else None  # type: ignore[arg-type]

        _seed_all(seed)
        data_gen = torch.Generator().manual_seed(seed)
        model = unwrap(adapter.model)
        model.to(device)
        batches = _Batches(train_ds, adapter.modalities, device)
        n = len(batches)

        # check the adapter on one batch (in dataset order: no random numbers are drawn)
        probe_inputs, _ = batches.get(range(min(n, batch_size)))
        was_training = model.training
        model.eval()
        try:
            if adapter.has_encoders:
                adapter.verify(probe_inputs)
            with torch.no_grad():
                n_classes = int(adapter.call_model(probe_inputs).shape[1])
        finally:
            model.train(was_training)
        if fix.needs_encoders and not adapter.has_encoders:
            raise TrainError(
                f"Fix {fix.name!r} changes each modality's encoder, but the encoders of this model are "
                "not known (or replaying their outputs did not reproduce the logits). Name them with "
                "--encoder MODALITY=MODULE (each modality must reach the head only through its encoder)."
            )

        train_adapter = adapter
        if dist_info.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [device.index] if device.type == "cuda" else None
            ddp_model = DistributedDataParallel(model, device_ids=device_ids, **ddp_options)
            train_adapter = copy.copy(adapter)
            train_adapter.model = ddp_model

        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise TrainError("The model has no trainable parameters (every requires_grad is False).")
        opt = _make_optimizer(optimizer, params, float(lr), float(weight_decay), float(momentum))
        per_rank = math.ceil(n / dist_info.world)
        steps = math.ceil(per_rank / batch_size)
        ctx = FixContext(adapter=train_adapter, optimizer=opt, epochs=epochs, n_classes=n_classes, device=device,
                         steps_per_epoch=steps, world_size=dist_info.world, rank=dist_info.rank)
        sched = scheduler(opt) if scheduler is not None else None

        settings = {
            "fix": fix.name, "fix_params": _json_params(fix.params()), "epochs": epochs, "optimizer": optimizer,
            "lr": float(lr), "weight_decay": float(weight_decay), "momentum": float(momentum),
            "batch_size": batch_size, "seed": seed, "world_size": dist_info.world, "n_train": n,
            "modalities": list(adapter.modalities), "grad_clip": None if grad_clip is None else float(grad_clip),
        }

        teardown_needed = True
        fix.setup(ctx)

        history = History(fix=fix.name, aux=ctx.aux,
                          checkpoint=str(ckpt_path) if ckpt_path is not None else None)
        start_epoch, start_batch = 0, 0
        epoch_data_state = None
        partial = {"loss_sum": 0.0, "count": 0.0, "logs": {}}
        if saved is not None:
            diffs = _settings_mismatch(saved.get("settings", {}), settings)
            if diffs:
                raise TrainError(
                    f"Cannot resume from {ckpt_path}: the run was started with other settings ("
                    + "; ".join(diffs) + "). Resume with the original settings, or start a new run in another folder."
                )
            try:
                model.load_state_dict(saved["model"])
                ctx.aux.load_state_dict(saved["aux"])
                opt.load_state_dict(saved["optimizer"])
                if sched is not None and saved.get("scheduler") is not None:
                    sched.load_state_dict(saved["scheduler"])
                fix.load_state_dict(saved["fix"])
            except (RuntimeError, KeyError, ValueError) as exc:
                raise TrainError(f"Cannot resume from {ckpt_path}: its state does not fit ({exc}).") from None
            _set_rng_state(saved["rng"], data_gen)
            start_epoch, start_batch = int(saved["epoch"]), int(saved["batch"])
            epoch_data_state = saved.get("epoch_data_rng")
            partial = dict(saved.get("partial") or partial)
            history.rows = [dict(r) for r in saved.get("history", [])]
            history.resumed_from = {"epoch": start_epoch, "batch": start_batch}

        def save(epoch: int, batch: int, epoch_rng: Tensor | None, part: Mapping[str, Any] | None) -> None:
            if ckpt_path is None or not dist_info.main:
                return
            state = {
                "format": _FORMAT,
                "epoch": epoch,
                "batch": batch,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "aux": {k: v.detach().cpu() for k, v in ctx.aux.state_dict().items()},  # type: ignore[union-attr]
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None,
                "fix": fix.state_dict(),
                "rng": _rng_state(data_gen),
                "epoch_data_rng": epoch_rng,
                "partial": dict(part) if part is not None else None,
                "history": history.rows,
                "settings": settings,
            }
            _atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))

        all_params = params + [p for p in ctx.aux.parameters() if p.requires_grad]
        with _StopFlag() as stop:
            for epoch in range(start_epoch, epochs):
                t0 = time.perf_counter()
                resuming_mid = epoch == start_epoch and start_batch > 0
                if resuming_mid and epoch_data_state is not None:
                    rng_now = data_gen.get_state()
                    data_gen.set_state(epoch_data_state)
                    epoch_rng = data_gen.get_state()
                else:
                    epoch_rng = data_gen.get_state()
                order = _order(n, epoch, seed, data_gen, dist_info)
                if resuming_mid and epoch_data_state is not None:
                    data_gen.set_state(rng_now)  # the saved state already follows this epoch's draw
                chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
                skip = start_batch if epoch == start_epoch else 0
                if skip == 0:
                    partial = {"loss_sum": 0.0, "count": 0.0, "logs": {}}
                model.train()
                ctx.aux.train()
                for index, idx in enumerate(chunks):
                    if index < skip:
                        continue
                    inputs, labels = batches.get(idx)
                    step = fix_step(ctx, fix, inputs, labels, epoch, index)
                    assert step.loss is not None
                    if not bool(torch.isfinite(step.loss.detach())):
                        raise TrainError(
                            f"The training loss became {float(step.loss.detach())} at epoch {epoch}, batch {index} "
                            f"(fix {fix.name}). Lower the learning rate (now {lr}), soften the fix's parameters, "
                            "or clip gradients (grad_clip); the last epoch's checkpoint is kept."
                        )
                    opt.zero_grad(set_to_none=True)
                    step.loss.backward()
                    fix.after_backward(ctx, step)
                    if grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(all_params, float(grad_clip))
                    opt.step()
                    b = float(labels.shape[0])
                    partial["loss_sum"] += float(step.loss.detach()) * b
                    partial["count"] += b
                    for k, v in step.logs.items():
                        s, c = partial["logs"].get(k, (0.0, 0))
                        partial["logs"][k] = (s + float(v), c + 1)
                    if progress is not None:
                        progress(TrainProgress("batch", epoch, epochs, index + 1, len(chunks),
                                               partial["loss_sum"] / max(partial["count"], 1.0), fix.signals()))
                    if _any_rank(stop.requested, dist_info, device):
                        save(epoch, index + 1, epoch_rng, partial)
                        raise Interrupted(str(ckpt_path) if ckpt_path and dist_info.main else None, epoch, index + 1)
                epoch_lr = float(opt.param_groups[0]["lr"])  # the rate this epoch ran with
                if sched is not None:
                    sched.step()
                epoch_signals = dict(fix.signals())
                epoch_signals.update(fix.on_epoch_end(ctx, epoch) or {})
                loss_sum, count = _sum_ranks([partial["loss_sum"], partial["count"]], dist_info, device)
                row: dict[str, Any] = {"epoch": epoch, "loss": loss_sum / max(count, 1.0), "lr": epoch_lr}
                if val_ds is not None:
                    row.update(evaluate(adapter, val_ds, batch_size=eval_batch_size, device=device, seed=seed))
                row.update({f"signal.{k}": v for k, v in epoch_signals.items()})
                row.update({f"log.{k}": v for k, v in _log_means(partial["logs"], dist_info, device).items()})
                row["time_s"] = time.perf_counter() - t0
                history.rows.append(row)
                save(epoch + 1, 0, None, None)
                if progress is not None:
                    progress(TrainProgress("epoch", epoch, epochs, len(chunks), len(chunks), row["loss"],
                                           epoch_signals, row))
                if _any_rank(stop.requested, dist_info, device):
                    raise Interrupted(str(ckpt_path) if ckpt_path and dist_info.main else None, epoch + 1, 0)
        model.eval()
        return history
    finally:
        if teardown_needed and ctx is not None:
            fix.teardown(ctx)

