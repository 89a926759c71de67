"""One fix inside another framework's training loop: the part of the callbacks that every framework shares.

A :class:`FixRun` owns the fix, its :class:`~mmdiag.ModelAdapter` and :class:`~mmdiag.fixes.FixContext`,
the forward hooks that record what a :class:`~mmdiag.fixes.Step` needs while the user's own code runs the
model (encoder outputs, fused logits), the resumable state and the teardown. The Lightning and Hugging Face
callbacks translate their framework's events into the calls below, in the order of
:func:`mmdiag.train.fit`: ``start`` (adapter check, ``fix.setup``) once, then per batch ``begin_batch``,
``loss`` (loss-changing fixes), ``after_backward``, ``end_batch``; ``end_epoch``; ``teardown`` always.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdiag.adapter import ModelAdapter
from mmdiag.errors import ConfigError, TrainError
from mmdiag.fixes import FIXES, Fix, FixContext, Step
from mmdiag.tensors import as_class_logits, logits_of
from mmdiag.train.loop import check_adapter
from mmdiag.train.state import rng_state, set_rng_state

__all__ = ["FixRun", "FixRunCallback", "changes_loss", "make_fix", "split_aux_groups"]


def make_fix(fix: str | Fix, params: Mapping[str, Any], owner: str) -> Fix:
    """A registered fix by name with ``params``, or the given instance (then ``params`` must be empty)."""
    if isinstance(fix, Fix):
        if params:
            raise ConfigError(f"{owner}: pass parameters either to the Fix instance or as keywords, not both.")
        return fix
    return FIXES.get(fix)(**params)


def changes_loss(fix: Fix) -> bool:
    """Whether ``fix`` overrides ``loss`` or ``forward`` (it then needs the framework's loss call)."""
    cls = type(fix)
    return cls.loss is not Fix.loss or cls.forward is not Fix.forward


def _to(inputs: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {m: t.to(device) for m, t in inputs.items()}


class FixRunCallback:
    """What the frameworks' RebalanceCallbacks share: ``run`` (a :class:`FixRun`), and its fix and context."""

    run: "FixRun"

    @property
    def fix(self) -> Fix:
        return self.run.fix

    @property
    def ctx(self) -> FixContext | None:
        return self.run.ctx


class FixRun:
    """The framework-independent state of one fix during one training run.

    Args:
        fix: the fix. modalities: input names in the model's order.
        encoders, head, call: as for :class:`~mmdiag.ModelAdapter`.
        loss_hint: what the user must change when a loss-changing fix gets no loss call (framework words).
        logits_fn: reads the fused logits from the model's output (default :func:`mmdiag.tensors.logits_of`).
        restore_rng: whether :meth:`load_state_dict` also puts back the global torch/numpy/python
            generators saved by :meth:`state_dict` (frameworks that restore them themselves say False).
    """

    def __init__(self, fix: Fix, modalities: Sequence[str], *, encoders: Mapping[str, str] | None = None,
                 head: str | None = None, call: str | None = None, loss_hint: str = "",
                 logits_fn: Callable[[Any], Tensor] = logits_of, restore_rng: bool = True) -> None:
        if not modalities:
            raise ConfigError("RebalanceCallback needs modalities=[...] (the input keys of the batch).")
        self.fix, self.modalities = fix, tuple(modalities)
        self.encoders = dict(encoders) if encoders else None
        self.head, self.call, self.loss_hint = head, call, loss_hint
        self.logits_fn, self.restore_rng = logits_fn, restore_rng
        self.adapter: ModelAdapter | None = None
        self.ctx: FixContext | None = None
        #: number of optimizer parameter groups before ``fix.setup`` (the ones after it are the fix's)
        self.base_groups = 0
        self._pending: dict[str, Any] | None = None
        self._hooks = contextlib.ExitStack()
        self._captured: dict[str, Any] | None = None
        self._batch: tuple[dict[str, Tensor], Tensor, int] | None = None
        self._logits: Tensor | None = None
        self._step: Step | None = None

    @property
    def started(self) -> bool:
        return self.ctx is not None

    # ------------------------------------------------------------------ set-up
    def bind(self, model: nn.Module) -> ModelAdapter:
        """The adapter of ``model`` (built on the first call)."""
        if self.adapter is None:
            self.adapter = ModelAdapter(model, self.modalities, call=self.call,  # type: ignore[arg-type]
                                        encoders=self.encoders, head=self.head)
        return self.adapter

    def start(self, inputs: Mapping[str, Tensor], *, optimizer: torch.optim.Optimizer, epochs: int,
              steps_per_epoch: int | None, device: torch.device, world_size: int = 1, rank: int = 0) -> None:
        """Check the adapter on ``inputs`` (a no-grad forward in eval mode, as ``fit`` does), read the
        class count, build the context and call ``fix.setup``; then apply a pending checkpoint state."""
        adapter = self.adapter
        if adapter is None:
            raise TrainError("RebalanceCallback: the model is not bound yet (no training started).")
        n_classes = check_adapter(adapter, adapter.model, _to(inputs, device), self.fix)
        self.base_groups = len(optimizer.param_groups)
        self.ctx = FixContext(adapter=adapter, optimizer=optimizer, epochs=int(epochs), n_classes=n_classes,
                              device=device, steps_per_epoch=steps_per_epoch, world_size=world_size, rank=rank)
        self.fix.setup(self.ctx)
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None

    # ------------------------------------------------------------------ per batch
    def begin_batch(self, inputs: Mapping[str, Tensor], labels: Tensor, index: int) -> None:
        """A training batch starts: remember it; install the recording hooks on the first one."""
        if self.adapter is None:
            raise TrainError("RebalanceCallback: the model is not bound yet (no training started).")
        device = self.ctx.device if self.ctx is not None else labels.device
        self._batch, self._logits, self._step = (_to(inputs, device), labels.to(device), index), None, None
        self.install()

    def install(self) -> None:
        """Install the recording hooks (encoder outputs, fused logits) once for the whole run; they are
        removed in :meth:`teardown`."""
        if self._captured is None and self.adapter is not None:
            self._captured = self._hooks.enter_context(self.adapter.capture()) if self.adapter.has_encoders else {}
            handle = self.adapter.model.register_forward_hook(self._record_logits)
            self._hooks.callback(handle.remove)

    def add_hook(self, handle: Any) -> None:
        """Remove ``handle`` (a hook a framework adapter installed) at teardown."""
        self._hooks.callback(handle.remove)

    def _record_logits(self, _module: nn.Module, _inp: Any, out: Any) -> None:
        # the first training forward of the batch is the user's; later ones are the fix's own readouts
        if self._batch is not None and self._logits is None and torch.is_grad_enabled():
            self._logits = as_class_logits(self.logits_fn(out), self._batch[1].shape[0])[0]

    @property
    def in_batch(self) -> bool:
        return self._batch is not None

    def make_step(self, epoch: int, logits: Tensor | None = None) -> Step:
        """The :class:`~mmdiag.fixes.Step` of the current batch from the hooks' records."""
        if self._batch is None or self._captured is None:
            raise TrainError("RebalanceCallback: no training batch is in progress.")
        inputs, labels, index = self._batch
        z = logits if logits is not None else self._logits
        if z is None:
            raise TrainError("RebalanceCallback: the model was not called in the training step (no logits were recorded).")
        feats = {m: self._captured[m] for m in self.modalities if m in self._captured} or None
        return Step(epoch=epoch, index=index, inputs=inputs, labels=labels, logits=z, features=feats)

    def loss(self, epoch: int, logits: Tensor, loss: Tensor | None = None) -> Tensor:
        """The fix's training loss of the current batch, as ``fix_step`` computes it: the fix's
        ``forward`` (new logits: their cross-entropy), then its ``loss`` of ``loss`` (the user's)."""
        if self.ctx is None:
            raise TrainError("RebalanceCallback: the fix is not set up yet.")
        step = self.make_step(epoch, logits)
        replaced = self.fix.forward(self.ctx, step)
        if replaced is not None:
            step.logits = replaced
        step.loss = F.cross_entropy(step.logits, step.labels) if (replaced is not None or loss is None) else loss
        step.loss = self.fix.loss(self.ctx, step)
        self._step = step
        return step.loss

    def after_backward(self, epoch: int) -> None:
        """The fix's gradient hook on the final gradients of the current batch."""
        if self.ctx is None:
            raise TrainError("RebalanceCallback: the fix is not set up yet.")
        if self._step is None and changes_loss(self.fix):
            raise ConfigError(f"Fix {self.fix.name!r} changes the loss: {self.loss_hint}")
        step = self._step if self._step is not None else self.make_step(epoch)
        self.fix.after_backward(self.ctx, step)

    def end_batch(self) -> None:
        self._batch, self._logits, self._step = None, None, None
        if self._captured:
            for m in self.modalities:
                self._captured.pop(m, None)  # hold no features (or their graph) between batches

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """``fix.on_epoch_end``; the fix's finite numeric signals, as ``fit``'s history records them."""
        if self.ctx is None:
            return {}
        signals = dict(self.fix.signals())
        signals.update(self.fix.on_epoch_end(self.ctx, epoch) or {})
        return {k: float(v) for k, v in signals.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``fix``, ``params``; once set up: the fix's ``state``, the ``aux`` weights, the number of
        optimizer groups the fix added (``aux_groups``) and the global generators (``rng``)."""
        if self.ctx is None:
            return dict(self._pending) if self._pending is not None else {"fix": self.fix.name,
                                                                          "params": repr(self.fix.params())}
        return self._snapshot(self.ctx)

    def _snapshot(self, ctx: FixContext) -> dict[str, Any]:
        groups = len(ctx.optimizer.param_groups) - self.base_groups if ctx.optimizer is not None else 0
        return {"fix": self.fix.name, "params": repr(self.fix.params()), "state": self.fix.state_dict(),
                "aux": {k: v.detach().cpu() for k, v in ctx.aux.state_dict().items()}, "aux_groups": groups,
                "rng": rng_state(torch.Generator())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (kept until ``fix.setup`` has run when it has not yet)."""
        if state.get("fix") not in (None, self.fix.name):
            raise TrainError(f"The checkpoint was written with fix {state.get('fix')!r}, this callback runs {self.fix.name!r}.")
        if self.ctx is None:
            self._pending = {**self._pending, **state} if self._pending else dict(state)
        else:
            self._apply(state)

    def _apply(self, state: Mapping[str, Any]) -> None:
        assert self.ctx is not None
        if "state" in state:
            self.fix.load_state_dict(state["state"])
        if state.get("aux"):
            self.ctx.aux.load_state_dict(state["aux"])
        if state.get("aux_optimizer") and self.ctx.optimizer is not None:
            _load_aux_groups(self.ctx.optimizer, state["aux_optimizer"])
        if self.restore_rng and state.get("rng") is not None:
            set_rng_state(state["rng"], torch.Generator())

    # ------------------------------------------------------------------ teardown
    def teardown(self) -> None:
        """Remove every hook and call ``fix.teardown`` (idempotent); the state stays readable."""
        self._hooks.close()
        self._captured, self._batch, self._logits, self._step = None, None, None, None
        if self.ctx is not None:
            ctx, self.ctx = self.ctx, None
            self._pending = self._snapshot(ctx)
            self._pending.pop("rng")  # a finished run's generators are not a resume point
            self.fix.teardown(ctx)


def split_aux_groups(optimizer_state: dict[str, Any], n_groups: int) -> dict[str, Any]:
    """Take the last ``n_groups`` parameter groups (the fix's auxiliary modules, added after the
    framework built the optimizer) out of a saved ``optimizer_state``, in place; returns them with
    their per-parameter state. The framework then restores the model's groups into an optimizer that
    does not hold the auxiliary ones yet; :func:`_load_aux_groups` adds theirs after ``fix.setup``."""
    groups = optimizer_state["param_groups"]
    aux_groups, optimizer_state["param_groups"] = groups[len(groups) - n_groups:], groups[:len(groups) - n_groups]
    ids = {i for g in aux_groups for i in g["params"]}
    state = optimizer_state.get("state", {})
    aux_state = {i: state.pop(i) for i in list(state) if i in ids}
    return {"param_groups": aux_groups, "state": aux_state}


def _load_aux_groups(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """Put the auxiliary groups' saved hyper-parameters and state back (the fix has re-added the groups)."""
    current = optimizer.state_dict()
    n = len(saved["param_groups"])
    if n > len(current["param_groups"]):
        raise TrainError(f"The checkpoint holds {n} auxiliary optimizer groups; the fix added fewer "
                         f"({len(current['param_groups'])} groups in all).")
    current["param_groups"] = current["param_groups"][:-n] + list(saved["param_groups"])
    current["state"].update(saved["state"])
    optimizer.load_state_dict(current)
