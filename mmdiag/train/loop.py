"""The reference training loop, :func:`fit`; see :mod:`mmdiag.train` for what it guarantees."""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from mmdiag.adapter import ModelAdapter, unwrap
from mmdiag.errors import ConfigError, TrainError
from mmdiag.fixes.base import Fix, FixContext, PlainTraining, fix_step
from mmdiag.runtime.batching import Batches, as_dataset
from mmdiag.runtime.device import resolve_device
from mmdiag.runtime.distributed import DistInfo, all_gather_objects, any_rank, join, sum_ranks
from mmdiag.runtime.mask_stats import estimate_mask_stats
from mmdiag.specs import TrainSpec
from mmdiag.train.evaluate import STATS_ROWS, evaluate, leading_inputs
from mmdiag.train.history import History, ProgressFn, TrainProgress
from mmdiag.train.state import (CHECKPOINT, Interrupted, Position, StopFlag, TrainState, fresh_partial, json_params,
                                load_training_checkpoint, seed_all)

__all__ = ["fit"]


@dataclass
class _Run:
    """What the epochs of one :func:`fit` call share."""

    spec: TrainSpec
    adapter: ModelAdapter  # the user's adapter (validation runs the unwrapped model)
    fix: Fix
    ctx: FixContext
    model: nn.Module
    batches: Batches
    val_ds: Dataset | None
    info: DistInfo
    device: torch.device
    state: TrainState
    progress: ProgressFn | None
    params: list[nn.Parameter]

    def interrupted(self, epoch: int, batch: int) -> Interrupted:
        path = self.state.path
        return Interrupted(str(path) if path and self.info.main else None, epoch, batch)


def fit(
    adapter: ModelAdapter,
    train_data: Any,
    spec: TrainSpec | None = None,
    *,
    val_data: Any = None,
    fix: Fix | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ddp_kwargs: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> History:
    """Train ``adapter.model`` in place with ``fix`` and return the per-epoch history.

    Args:
        adapter: drives the user's model; its encoders are needed by fixes that touch them.
        train_data, val_data: map-style Datasets of dict items (modalities + ``label``) or dicts of
            arrays. Without ``val_data`` the history has no validation columns.
        spec: the training budget (epochs, optimizer, lr, weight_decay, momentum, batch_size, seed,
            device, grad_clip, eval_batch_size); default :class:`~mmdiag.specs.TrainSpec`.
        fix: the fix (default: plain training, ``none``).
        out_dir: where ``checkpoint.pt`` is written after every epoch (rank 0); None: no files.
        resume: continue from ``out_dir/checkpoint.pt`` (the settings must match the saved ones).
        progress: called with a :class:`TrainProgress` after each batch and each epoch.
        scheduler: ``scheduler(optimizer)`` builds an LR scheduler stepped once per epoch.
        ddp_kwargs: extra ``DistributedDataParallel`` options (e.g. ``{"static_graph": True}``).
        **overrides: fields of ``spec`` to change (``fit(adapter, data, epochs=3)`` is
            ``fit(adapter, data, TrainSpec(epochs=3))``); another name is a TypeError.

    Raises:
        ConfigError: bad arguments. TrainError: a fix that needs encoders on a black-box model, a
        missing or incompatible checkpoint on resume. :class:`Interrupted` after Ctrl-C (the state
        is checkpointed first).
    """
    spec = spec if spec is not None else TrainSpec()
    if overrides:
        spec = spec.replace(**overrides)
    fix = fix if fix is not None else PlainTraining()
    ddp_options = dict(ddp_kwargs or {})
    if ddp_options.get("find_unused_parameters"):
        raise ConfigError(
            "find_unused_parameters=True does not work with fixes that run the fusion head on cached "
            "features (the head-only forward makes DDP mark the encoder parameters unused before their "
            "gradients arrive). Leave it off; use static_graph=True if some parameter gets no gradient."
        )
    if resume and out_dir is None:
        raise TrainError("resume=True needs out_dir, the folder holding the checkpoint.pt to continue from.")
    device = resolve_device(spec.device)
    info = join(device)
    device = info.device_for(device)
    ckpt_path = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    run: _Run | None = None
    set_up = False
    try:
        run, saved = _prepare(adapter, train_data, val_data, fix, spec, info, device, ckpt_path, resume,
                              scheduler, ddp_options, progress)
        set_up = True
        fix.setup(run.ctx)
        pos = run.state.restore(saved) if saved is not None else Position()
        run.params = run.params + [p for p in run.ctx.aux.parameters() if p.requires_grad]
        with StopFlag() as stop:
            for epoch in range(pos.epoch, spec.epochs):
                _epoch(run, epoch, pos, stop)
        run.model.eval()
        return run.state.history
    finally:
        if set_up and run is not None:
            fix.teardown(run.ctx)


def _prepare(adapter: ModelAdapter, train_data: Any, val_data: Any, fix: Fix, spec: TrainSpec, info: DistInfo,
             device: torch.device, ckpt_path: Path | None, resume: bool, scheduler: Any,
             ddp_options: dict[str, Any], progress: ProgressFn | None) -> tuple[_Run, dict[str, Any] | None]:
    """Everything up to the fix's ``setup``: data, the checked adapter, model, optimizer, context, state."""
    train_ds = as_dataset(train_data, adapter.modalities, what="training data", loaders=False)
    val_ds = None
    if val_data is not None:
        val_ds = as_dataset(val_data, adapter.modalities, what="validation data", loaders=False)
    saved = load_training_checkpoint(ckpt_path) if resume else None  # type: ignore[arg-type]

    seed_all(spec.seed)
    data_gen = torch.Generator().manual_seed(spec.seed)
    model = unwrap(adapter.model)
    model.to(device)
    batches = Batches(train_ds, adapter.modalities, device)
    n = len(batches)
    n_classes = _check_adapter(adapter, model, batches, spec.batch_size, fix)
    train_adapter = _distributed_adapter(adapter, model, info, device, ddp_options)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainError("The model has no trainable parameters (every requires_grad is False).")
    opt = _make_optimizer(spec, params)
    steps = math.ceil(math.ceil(n / info.world) / spec.batch_size)
    ctx = FixContext(adapter=train_adapter, optimizer=opt, epochs=spec.epochs, n_classes=n_classes, device=device,
                     steps_per_epoch=steps, world_size=info.world, rank=info.rank, train_data=train_ds)
    sched = scheduler(opt) if scheduler is not None else None
    settings = {
        "fix": fix.name, "fix_params": json_params(fix.params()), "epochs": spec.epochs, "optimizer": spec.optimizer,
        "lr": spec.lr, "weight_decay": spec.weight_decay, "momentum": spec.momentum,
        "batch_size": spec.batch_size, "seed": spec.seed, "world_size": info.world, "n_train": n,
        "modalities": list(adapter.modalities), "grad_clip": spec.grad_clip,
    }
    history = History(fix=fix.name, aux=ctx.aux, checkpoint=str(ckpt_path) if ckpt_path is not None else None)
    state = TrainState(model, ctx.aux, opt, sched, fix, data_gen, history, settings, ckpt_path, info.main)
    run = _Run(spec, adapter, fix, ctx, model, batches, val_ds, info, device, state, progress, params)
    return run, saved


def _check_adapter(adapter: ModelAdapter, model: nn.Module, batches: Batches, batch_size: int, fix: Fix) -> int:
    """Check the adapter on one batch (in dataset order: no random numbers are drawn); the class count."""
    probe_inputs, _ = batches.get(range(min(len(batches), batch_size)))
    return check_adapter(adapter, model, probe_inputs, fix)


def check_adapter(adapter: ModelAdapter, model: nn.Module, probe_inputs: Mapping[str, torch.Tensor], fix: Fix) -> int:
    """Check the adapter on ``probe_inputs`` (replaying the encoders, in eval mode, without gradients) and
    that ``fix`` can run on this model; the class count. The training integrations call it too."""
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
            "`encoders={MODALITY: MODULE}` (each modality must reach the head only through its encoder)."
        )
    return n_classes


def _distributed_adapter(adapter: ModelAdapter, model: nn.Module, info: DistInfo, device: torch.device,
                         ddp_options: Mapping[str, Any]) -> ModelAdapter:
    """The adapter training calls: the user's, or a copy driving the DDP-wrapped model under torchrun."""
    if info.world <= 1:
        return adapter
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    train_adapter = copy.copy(adapter)
    train_adapter.model = DistributedDataParallel(model, device_ids=device_ids, **ddp_options)
    return train_adapter


def _make_optimizer(spec: TrainSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def _order(rows: Sequence[int], epoch: int, seed: int, data_gen: torch.Generator, info: DistInfo) -> list[int]:
    """The epoch's order of the training ``rows`` (this rank's shard under torchrun)."""
    if info.world <= 1:
        return [rows[i] for i in torch.randperm(len(rows), generator=data_gen).tolist()]
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(len(rows)), num_replicas=info.world, rank=info.rank,  # type: ignore[arg-type]
                                 shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return [rows[i] for i in sampler]


def _epoch_order(run: _Run, epoch: int, pos: Position) -> tuple[torch.Tensor, list[int]]:
    """(the data-order generator state this epoch starts from, the epoch's row order).

    Resuming in the middle of an epoch replays that epoch's order from its saved generator state;
    the restored generator already follows the epoch's draw, so it is put back afterwards.
    """
    gen = run.state.data_gen
    replay = epoch == pos.epoch and pos.batch > 0 and pos.epoch_data_rng is not None
    if replay:
        rng_now = gen.get_state()
        gen.set_state(pos.epoch_data_rng)  # type: ignore[arg-type]
    epoch_rng = gen.get_state()
    held = set(run.ctx.held_out)  # rows a fix reserved for its own evaluation (FixContext.hold_out)
    rows = [i for i in range(len(run.batches)) if i not in held] if held else range(len(run.batches))
    order = _order(rows, epoch, run.spec.seed, gen, run.info)
    if replay:
        gen.set_state(rng_now)
    return epoch_rng, order


def _epoch(run: _Run, epoch: int, pos: Position, stop: StopFlag) -> None:
    """One epoch: its batches (from ``pos`` when resuming into it), then the epoch's row."""
    t0 = time.perf_counter()
    if run.ctx.adapter.needs_stats():
        # a `mean` / `noise` mask replaces absent modalities with the data's statistics; at the
        # feature level they move as the encoders train, so they are re-estimated every epoch on
        # the first training rows (the same rows on every process; no random numbers drawn)
        estimate_mask_stats(run.ctx.adapter, leading_inputs(run.batches, run.spec.batch_size, STATS_ROWS), STATS_ROWS)
    epoch_rng, order = _epoch_order(run, epoch, pos)
    size = run.spec.batch_size
    chunks = [order[i:i + size] for i in range(0, len(order), size)]
    skip = pos.batch if epoch == pos.epoch else 0
    partial = pos.partial if skip else fresh_partial()
    _batches(run, epoch, chunks, skip, partial, epoch_rng, stop)
    _end_epoch(run, epoch, partial, t0, len(chunks), stop)


def _batches(run: _Run, epoch: int, chunks: list[list[int]], skip: int, partial: dict[str, Any],
             epoch_rng: torch.Tensor, stop: StopFlag) -> None:
    """Train on ``chunks[skip:]``; checkpoint and raise :class:`Interrupted` at a batch boundary after Ctrl-C."""
    spec, fix, ctx, opt = run.spec, run.fix, run.ctx, run.state.optimizer
    run.model.train()
    ctx.aux.train()
    for index, idx in enumerate(chunks):
        if index < skip:
            continue
        inputs, labels = run.batches.get(idx)
        step = fix_step(ctx, fix, inputs, labels, epoch, index)
        assert step.loss is not None
        if not bool(torch.isfinite(step.loss.detach())):
            raise TrainError(
                f"The training loss became {float(step.loss.detach())} at epoch {epoch}, batch {index} "
                f"(fix {fix.name}). Lower the learning rate (now {spec.lr}), soften the fix's parameters, "
                "or clip gradients (`grad_clip`); the last epoch's checkpoint is kept."
            )
        opt.zero_grad(set_to_none=True)
        step.loss.backward()
        fix.after_backward(ctx, step)
        if spec.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(run.params, spec.grad_clip)
        opt.step()
        b = float(labels.shape[0])
        partial["loss_sum"] += float(step.loss.detach()) * b
        partial["count"] += b
        for k, v in step.logs.items():
            s, c = partial["logs"].get(k, (0.0, 0))
            partial["logs"][k] = (s + float(v), c + 1)
        if run.progress is not None:
            run.progress(TrainProgress("batch", epoch, spec.epochs, index + 1, len(chunks),
                                       partial["loss_sum"] / max(partial["count"], 1.0), fix.signals()))
        if any_rank(stop.requested, run.info.world, run.device):
            run.state.save(epoch, index + 1, epoch_rng, partial)
            raise run.interrupted(epoch, index + 1)


def _end_epoch(run: _Run, epoch: int, partial: dict[str, Any], t0: float, n_chunks: int, stop: StopFlag) -> None:
    """Step the scheduler, end the fix's epoch, validate, append the row, checkpoint, report."""
    spec, fix, state, world = run.spec, run.fix, run.state, run.info.world
    epoch_lr = float(state.optimizer.param_groups[0]["lr"])  # the rate this epoch ran with
    if state.scheduler is not None:
        state.scheduler.step()
    epoch_signals = dict(fix.signals())
    epoch_signals.update(fix.on_epoch_end(run.ctx, epoch) or {})
    loss_sum, count = sum_ranks([partial["loss_sum"], partial["count"]], world, run.device)
    row: dict[str, Any] = {"epoch": epoch, "loss": loss_sum / max(count, 1.0), "lr": epoch_lr}
    if run.val_ds is not None:
        row.update(evaluate(run.adapter, run.val_ds, batch_size=spec.eval_batch_size, device=run.device,
                            seed=spec.seed))
    row.update({f"signal.{k}": v for k, v in epoch_signals.items()})
    row.update({f"log.{k}": v for k, v in _log_means(partial["logs"], world, run.device).items()})
    row["time_s"] = time.perf_counter() - t0
    state.history.rows.append(row)
    state.save(epoch + 1, 0, None, None)
    if run.progress is not None:
        run.progress(TrainProgress("epoch", epoch, spec.epochs, n_chunks, n_chunks, row["loss"], epoch_signals, row))
    if any_rank(stop.requested, world, run.device):
        raise run.interrupted(epoch + 1, 0)


def _log_means(logs: Mapping[str, tuple[float, int]], world: int, device: torch.device) -> dict[str, float]:
    """Epoch means of the fixes' per-step logs, over every rank."""
    keys = sorted(logs)
    if world > 1:
        keys = sorted(set().union(*all_gather_objects(keys, world)))
    sums = sum_ranks([float(logs.get(k, (0.0, 0))[0]) for k in keys]
                     + [float(logs.get(k, (0.0, 0))[1]) for k in keys], world, device)
    return {k: sums[j] / max(sums[len(keys) + j], 1.0) for j, k in enumerate(keys)}
