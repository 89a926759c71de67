"""The Fix hook API and its registry.

A fix is a hook object, not a trainer. Every hook is a no-op by default, so a fix implements only
what it changes. The reference loop :func:`mmdiag.train.fit` calls them; a user's own loop adopts a
fix with the same calls::

    fix.setup(ctx)                                   # once, before training
    for epoch ...:
        for inputs, labels in loader:
            step = fix_step(ctx, fix, inputs, labels, epoch)   # forward + fix.forward + fix.loss
            optimizer.zero_grad(); step.loss.backward()
            fix.after_backward(ctx, step)            # may rescale / replace encoder gradients
            optimizer.step()
        fix.on_epoch_end(ctx, epoch)
    fix.teardown(ctx)                                # always (use try/finally): removes every hook

Hooks:
    setup(ctx): build auxiliary modules (added to ``ctx.aux`` so they are optimised and saved
        separately from the user's state_dict), install autograd hooks (remember their handles).
    forward(ctx, step): optionally return new fused logits computed from ``step.features`` (for
        fixes that change fusion: gradient scaling layers at the encoder outputs, residual feature
        scaling, bottlenecks); return None to keep the model's own logits.
    loss(ctx, step): return the training loss (default ``step.loss``, the fused cross-entropy).
    after_backward(ctx, step): modify encoder parameter gradients in place.
    on_epoch_end(ctx, epoch): update epoch-level state; return signals for the history.
    teardown(ctx): remove everything installed; called also after an exception.
    state_dict() / load_state_dict(state): resumable state (tensors, numbers, lists).
    signals(): latest per-modality numbers ``{"ratio.audio": 1.7, ...}`` for the progress bar and history.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdiag.adapter import ModelAdapter
from mmdiag.registry import Registry, check_plugin_class
from mmdiag.runtime.distributed import all_reduce_sum, broadcast_tensor

#: built-in fixes, then those of installed plug-ins (entry-point group ``mmdiag.fixes``)
FIXES: Registry[type["Fix"]] = Registry("fix", group="mmdiag.fixes", check=lambda obj: check_plugin_class(obj, Fix))


def register_fix(cls: type["Fix"]) -> type["Fix"]:
    """Class decorator adding a fix to :data:`FIXES` under its ``name``."""
    return FIXES.register()(cls)


@dataclass
class FixContext:
    """What a fix sees during one training run.

    Attributes:
        adapter: drives the model (modalities, encoders, masking, head-only forwards).
        optimizer: the optimizer of the model's parameters (and of ``aux`` parameters).
        epochs: total epochs planned.
        n_classes: number of classes C.
        device: training device.
        aux: auxiliary modules added by fixes (unimodal heads, bottlenecks); saved as ``aux.pt``.
        steps_per_epoch: batches per epoch, when known.
        world_size: number of processes (DistributedDataParallel), 1 otherwise.
        rank: this process's rank in a distributed run (0 otherwise).
        train_data: the training dataset (map-style, dict items), for fixes that evaluate the model
            on rows of it; set by the reference loop (a user's own loop may set it, or leave None).
        held_out: rows of ``train_data`` reserved by :meth:`hold_out`; the training loop leaves them
            out of its batches (the reference loop does; a user's own loop that sets ``train_data``
            must skip them too).
    """

    adapter: ModelAdapter
    optimizer: torch.optim.Optimizer | None
    epochs: int
    n_classes: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    aux: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    steps_per_epoch: int | None = None
    world_size: int = 1
    rank: int = 0
    train_data: Any = None
    held_out: tuple[int, ...] = ()
    #: ids of the auxiliary modules :meth:`sync_aux` has already set to rank 0's
    _synced: set[int] = field(default_factory=set, repr=False, compare=False)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.adapter.modalities

    def hold_out(self, fraction: float, seed: int = 0) -> tuple[int, ...]:
        """Reserve a ``fraction`` of the training rows for the fix's own evaluation (call it in ``setup``).

        The rows are drawn with a generator seeded by ``seed`` alone, so every rank and every resumed
        run reserves the same ones; at least one row is reserved and at least one left for training.
        The loop does not train on them. Returns them sorted (indices into ``train_data``); () without
        ``train_data`` or with ``fraction`` 0.
        """
        if self.train_data is None or fraction <= 0:
            self.held_out = ()
            return ()
        n = len(self.train_data)
        k = min(n - 1, max(1, round(fraction * n)))
        if k <= 0:
            self.held_out = ()
            return ()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        self.held_out = tuple(sorted(order[:k].tolist()))
        return self.held_out

    def all_reduce_sum(self, value: Tensor) -> Tensor:
        """``value`` summed over the processes of a distributed run (a new tensor; the input is
        unchanged). With one process it returns a detached copy.

        Fixes whose decisions depend on batch statistics (a ratio, a running accuracy) call this so
        that every rank takes the same decision and the replicas stay identical. Every rank must
        make the same calls in the same order.
        """
        return all_reduce_sum(value, self.world_size, self.device)

    def broadcast(self, value: Tensor) -> Tensor:
        """Rank 0's ``value`` on every process (a new tensor; with one process a detached copy)."""
        return broadcast_tensor(value, self.world_size, self.device)

    def sync_aux(self, prefix: str = "") -> None:
        """Average the gradients and the floating-point buffers (e.g. BatchNorm running statistics)
        of the auxiliary modules whose name starts with ``prefix`` over the processes of a
        distributed run (nothing with one process).

        Only the user's model is wrapped in DistributedDataParallel, so without this each rank
        would train its own copy of an auxiliary module on its own shard. A fix that adds auxiliary
        modules calls it in ``after_backward``, before anything that reads those gradients (a
        clip); a parameter without a gradient on this rank contributes zeros. Averaging the
        running statistics (rather than taking rank 0's, as DDP does for the model's buffers)
        keeps what every shard saw. The first time a module is synchronised, its parameters and
        buffers are set to rank 0's: a module (a lazy one especially) initialised from the global
        random state would otherwise start from a different draw on each rank.
        """
        if self.world_size <= 1:
            return
        modules = [module for name, module in self.aux.items() if name.startswith(prefix)]
        for module in modules:
            if id(module) not in self._synced:
                self._synced.add(id(module))
                self._take_rank0(module)
        params = [p for module in modules for p in module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        buffers = [b for module in modules for b in module.buffers() if b.is_floating_point()]
        values = [*grads, *buffers]
        if not values:
            return
        flat = self.all_reduce_sum(torch.cat([v.detach().reshape(-1).double() for v in values])) / self.world_size
        start = 0
        for p in params:
            p.grad = flat[start:start + p.numel()].view_as(p).to(p.dtype)
            start += p.numel()
        for b in buffers:
            b.copy_(flat[start:start + b.numel()].view_as(b))
            start += b.numel()

    def _take_rank0(self, module: nn.Module) -> None:
        """Set ``module``'s parameters and buffers to rank 0's."""
        values = [*module.parameters(), *module.buffers()]
        if not values:
            return
        flat = self.broadcast(torch.cat([v.detach().reshape(-1).double() for v in values]))
        start = 0
        with torch.no_grad():
            for v in values:
                v.copy_(flat[start:start + v.numel()].view_as(v))
                start += v.numel()

    def encoder_parameters(self, m: str) -> list[nn.Parameter]:
        """Trainable parameters of modality ``m``'s encoder."""
        return [p for p in self.adapter.encoder_module(m).parameters() if p.requires_grad]

    def add_aux(self, name: str, module: nn.Module) -> nn.Module:
        """Register an auxiliary module (moved to the device, added to the optimizer)."""
        module = module.to(self.device)
        self.aux[name] = module
        if self.optimizer is not None:
            self.optimizer.add_param_group({"params": list(module.parameters())})
        return module


@dataclass
class Step:
    """One training batch as the hooks see it.

    Attributes:
        epoch, index: epoch number (0-based) and batch index within the epoch.
        inputs: modality -> input tensor on the device.
        labels: [B] labels.
        logits: [B, C] fused logits (with grad), possibly replaced by a fix's ``forward``.
        features: modality -> encoder output (with grad), when encoders are known.
        loss: the loss that will be back-propagated (set by :func:`fix_step`).
        logs: numbers the fix wants in the history for this step.
    """

    epoch: int
    index: int
    inputs: dict[str, Tensor]
    labels: Tensor
    logits: Tensor
    features: dict[str, Any] | None
    loss: Tensor | None = None
    logs: dict[str, float] = field(default_factory=dict)

    def readout(self, ctx: FixContext, present: tuple[str, ...] | list[str], features: Mapping[str, Any] | None = None) -> Tensor:
        """Logits with only ``present`` modalities (others masked at the feature level), with grad.

        This is the unimodal readout R2 of methods.md P1 for a single modality; it costs one call of
        the fusion head on the cached features.
        """
        feats = features if features is not None else self.features
        if feats is None:
            return ctx.adapter.call_model(ctx.adapter.masked_inputs(self.inputs, list(present)))
        return ctx.adapter.head_forward(self.inputs, ctx.adapter.masked_features(feats, list(present)))


@dataclass
class Fix(ABC):
    """Base of every fix: no-op hooks, parameters as dataclass fields."""

    name: ClassVar[str]
    summary: ClassVar[str]
    #: the diagnosis this fix answers (methods.md §19), one line.
    matches: ClassVar[str] = ""
    #: problems this fix treats (names of ``mmdiag.verdict.PROBLEMS``): the verdict recommends a
    #: registered fix whose targets name the problem it found (docs/verdict.md).
    targets: ClassVar[tuple[str, ...]] = ()
    #: whether the fix needs each modality's encoder (gradient and feature fixes do).
    needs_encoders: ClassVar[bool] = True
    #: whether the fix acts by rescaling gradients, which Adam-type optimizers largely normalise away.
    scales_gradients: ClassVar[bool] = False

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def setup(self, ctx: FixContext) -> None:
        """Called once before training."""

    def forward(self, ctx: FixContext, step: Step) -> Tensor | None:
        """Optionally replace the fused logits (return None to keep them)."""
        return None

    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        """The training loss; default: the fused cross-entropy."""
        assert step.loss is not None
        return step.loss

    def after_backward(self, ctx: FixContext, step: Step) -> None:
        """Modify gradients after ``loss.backward()`` and before ``optimizer.step()``."""

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, float]:
        """Epoch-level update; returns signals for the history."""
        return {}

    def teardown(self, ctx: FixContext) -> None:
        """Remove every hook and temporary change; always called."""

    def state_dict(self) -> dict[str, Any]:
        """Resumable state."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def signals(self) -> dict[str, float]:
        """Latest per-modality signals, e.g. ``{"ratio.audio": 1.4}``."""
        return {}


def fix_step(ctx: FixContext, fix: Fix, inputs: Mapping[str, Tensor], labels: Tensor, epoch: int = 0,
             index: int = 0) -> Step:
    """Forward one batch with a fix: the model's logits (capturing encoder outputs), the fix's
    ``forward`` and ``loss``. The caller back-propagates ``step.loss`` and calls ``after_backward``."""
    adapter = ctx.adapter
    inputs = dict(inputs)
    if adapter.has_encoders:
        logits, feats = adapter.encode(inputs)
    else:
        logits, feats = adapter.call_model(inputs), None
    step = Step(epoch=epoch, index=index, inputs=inputs, labels=labels, logits=logits, features=feats)
    replaced = fix.forward(ctx, step)
    if replaced is not None:
        step.logits = replaced
    step.loss = F.cross_entropy(step.logits, labels)
    step.loss = fix.loss(ctx, step)
    return step


@dataclass
class PlainTraining(Fix):
    """No fix: ordinary joint training with the fused cross-entropy (the baseline)."""

    name: ClassVar[str] = "none"
    summary: ClassVar[str] = "no fix: plain joint training (the baseline)"
    needs_encoders: ClassVar[bool] = False


FIXES.register()(PlainTraining)
