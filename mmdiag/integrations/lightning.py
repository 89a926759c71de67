"""PyTorch Lightning callbacks: retrain with an mmdiag fix, diagnose during training.

* :class:`RebalanceCallback` runs a registered fix inside ``lightning.Trainer``. Gradient fixes act
  in ``on_before_optimizer_step`` (gradients final: after accumulation, unscaled under AMP, before
  clipping); the encoder outputs and logits they need are recorded by forward hooks while
  ``training_step`` runs. Fixes that change the loss or the logits need one line in
  ``training_step``: ``loss = self.rebalance_loss(batch, logits, loss)`` (:class:`RebalanceMixin`).
  The fix's state (and its auxiliary modules) is part of the Lightning checkpoint; every hook is
  removed at ``on_fit_end``, ``on_exception`` and ``teardown``.
* :class:`DiagnoseCallback` runs :func:`mmdiag.analyze` at the end of validation epochs, logs
  per-modality values and writes the last report next to the logs at the end of fit.

Requires ``lightning`` (``pip install mmdiag[lightning]``); see docs/integrations.md.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdiag.adapter import ModelAdapter
from mmdiag.api import analyze
from mmdiag.collect import CollectSettings
from mmdiag.errors import ConfigError, TrainError
from mmdiag.fixes import FIXES, Fix, FixContext, Step
from mmdiag.report import Report
from mmdiag.runtime.batching import split_batch
from mmdiag.tensors import as_class_logits, logits_of

__all__ = ["RebalanceCallback", "RebalanceMixin", "DiagnoseCallback", "SEVERITY"]

#: ``verdict.severity`` as a number for loggers
SEVERITY = {"none": 0, "mild": 1, "strong": 2}


def inner_model(pl_module: nn.Module, model_attr: str | None) -> nn.Module:
    """The classifier inside a LightningModule: ``pl_module.<model_attr>`` (dotted), else
    ``pl_module.model`` when that is a module, else the LightningModule itself."""
    if model_attr:
        obj: Any = pl_module
        for part in model_attr.split("."):
            if not hasattr(obj, part):
                raise ConfigError(f"model_attr={model_attr!r}: the LightningModule has no attribute {part!r}.")
            obj = getattr(obj, part)
        if not isinstance(obj, nn.Module):
            raise ConfigError(f"model_attr={model_attr!r} is a {type(obj).__name__}, not an nn.Module.")
        return obj
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def _to(inputs: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {m: t.to(device) for m, t in inputs.items()}


def _changes_loss(fix: Fix) -> bool:
    cls = type(fix)
    return cls.loss is not Fix.loss or cls.forward is not Fix.forward


class RebalanceCallback(pl.Callback):
    """Run the fix ``fix`` (a registered name or a :class:`~mmdiag.fixes.Fix`) inside a Lightning fit.

    Args:
        fix: fix name (``mmdiag list fixes``) or instance; ``**params`` go to a named fix.
        modalities: modality names (the keys of the batch's input dict, in the model's order).
        encoders, head, call: as for :class:`~mmdiag.ModelAdapter` (found by name when None).
        model_attr: attribute of the LightningModule holding the classifier (dotted); default
            ``model`` when it is an ``nn.Module``, else the LightningModule itself.

    The adapter is checked, the class count read and ``fix.setup`` called on the first training
    batch (a no-grad forward in eval mode, as :func:`mmdiag.train.fit` does). With gradient
    accumulation the fix sees the last micro-batch of each optimizer step. One optimizer only.
    """

    def __init__(self, fix: str | Fix = "ogm_ge", modalities: Sequence[str] | None = None, *,
                 encoders: Mapping[str, str] | None = None, head: str | None = None, call: str | None = None,
                 model_attr: str | None = None, **params: Any) -> None:
        if isinstance(fix, Fix):
            if params:
                raise ConfigError("RebalanceCallback: pass parameters either to the Fix instance or as keywords, not both.")
            self.fix = fix
        else:
            self.fix = FIXES.get(fix)(**params)
        if not modalities:
            raise ConfigError("RebalanceCallback needs modalities=[...] (the input keys of the batch).")
        self.modalities = tuple(modalities)
        self.encoders = dict(encoders) if encoders else None
        self.head, self.call, self.model_attr = head, call, model_attr
        self.adapter: ModelAdapter | None = None
        self.ctx: FixContext | None = None
        self._pending: dict[str, Any] | None = None
        self._hooks = contextlib.ExitStack()
        self._captured: dict[str, Any] | None = None
        self._batch: tuple[dict[str, Tensor], Tensor, int] | None = None
        self._logits: Tensor | None = None
        self._step: Step | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(fix=self.fix.name)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.adapter is not None:
            return
        self.adapter = ModelAdapter(inner_model(pl_module, self.model_attr), self.modalities, call=self.call,
                                    encoders=self.encoders, head=self.head)  # type: ignore[arg-type]

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: dict[str, Tensor]) -> None:
        assert self.adapter is not None
        if len(trainer.optimizers) != 1:
            raise ConfigError(f"RebalanceCallback supports one optimizer; configure_optimizers returned {len(trainer.optimizers)}.")
        model = self.adapter.model
        was_training = model.training
        model.eval()
        try:
            if self.adapter.has_encoders:
                self.adapter.verify(inputs)
            with torch.no_grad():
                n_classes = int(self.adapter.call_model(inputs).shape[1])
        finally:
            model.train(was_training)
        if self.fix.needs_encoders and not self.adapter.has_encoders:
            raise TrainError(
                f"Fix {self.fix.name!r} changes each modality's encoder, but the encoders of this model are not "
                "known (or replaying their outputs did not reproduce the logits). Name them with "
                "`encoders={MODALITY: MODULE}` (names inside the model given by model_attr).")
        steps = trainer.num_training_batches
        self.ctx = FixContext(adapter=self.adapter, optimizer=trainer.optimizers[0], epochs=int(trainer.max_epochs or 0),
                              n_classes=n_classes, device=pl_module.device,
                              steps_per_epoch=int(steps) if isinstance(steps, int) or math.isfinite(steps) else None,
                              world_size=trainer.world_size, rank=trainer.global_rank)
        self.fix.setup(self.ctx)
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        inputs, labels, _ = split_batch(batch, self.modalities)
        inputs, labels = _to(inputs, pl_module.device), labels.to(pl_module.device)
        if self.ctx is None:
            self._start(trainer, pl_module, inputs)
        assert self.adapter is not None
        self._batch, self._logits, self._step = (inputs, labels, batch_idx), None, None
        if self._captured is None:  # hooks stay installed for the whole fit; removed in teardown
            if self.adapter.has_encoders:
                self._captured = self._hooks.enter_context(self.adapter.capture())
            else:
                self._captured = {}
            handle = self.adapter.model.register_forward_hook(self._record_logits)
            self._hooks.callback(handle.remove)

    def _record_logits(self, _module: nn.Module, _inp: Any, out: Any) -> None:
        if self._batch is not None and torch.is_grad_enabled():
            self._logits = as_class_logits(logits_of(out), self._batch[1].shape[0])[0]

    def make_step(self, trainer: pl.Trainer, logits: Tensor | None = None) -> Step:
        """The :class:`~mmdiag.fixes.Step` of the current training batch (hooks' records)."""
        if self._batch is None or self._captured is None:
            raise TrainError("RebalanceCallback: no training batch is in progress.")
        inputs, labels, index = self._batch
        z = logits if logits is not None else self._logits
        if z is None:
            raise TrainError("RebalanceCallback: the model was not called in training_step (no logits were recorded).")
        feats = {m: self._captured[m] for m in self.modalities if m in self._captured} or None
        return Step(epoch=trainer.current_epoch, index=index, inputs=inputs, labels=labels, logits=z, features=feats)

    def loss(self, trainer: pl.Trainer, logits: Tensor, loss: Tensor | None = None) -> Tensor:
        """The fix's training loss for this batch (what :meth:`RebalanceMixin.rebalance_loss` returns)."""
        assert self.ctx is not None
        step = self.make_step(trainer, logits)
        replaced = self.fix.forward(self.ctx, step)
        if replaced is not None:
            step.logits = replaced
        step.loss = F.cross_entropy(step.logits, step.labels) if (replaced is not None or loss is None) else loss
        step.loss = self.fix.loss(self.ctx, step)
        self._step = step
        return step.loss

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        assert self.ctx is not None
        if self._step is None and _changes_loss(self.fix):
            raise ConfigError(
                f"Fix {self.fix.name!r} changes the loss: call `loss = self.rebalance_loss(batch, logits, loss)` "
                "in training_step (RebalanceMixin).")
        step = self._step if self._step is not None else self.make_step(trainer)
        self.fix.after_backward(self.ctx, step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch, self._logits, self._step = None, None, None
        if self._captured:
            for m in self.modalities:
                self._captured.pop(m, None)  # hold no features (or their graph) between batches

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ctx is None:
            return
        signals = dict(self.fix.signals())
        signals.update(self.fix.on_epoch_end(self.ctx, trainer.current_epoch) or {})
        for k, v in signals.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                pl_module.log(f"{self.fix.name}.{k}", float(v), on_epoch=True, on_step=False)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"fix": self.fix.name, "params": repr(self.fix.params())}
        if self.ctx is None:
            if self._pending is not None:
                return dict(self._pending)
            return state
        state["state"] = self.fix.state_dict()
        state["aux"] = {k: v.detach().cpu() for k, v in self.ctx.aux.state_dict().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("fix") not in (None, self.fix.name):
            raise TrainError(f"The checkpoint was written with fix {state_dict.get('fix')!r}, this callback runs {self.fix.name!r}.")
        if self.ctx is None:
            self._pending = dict(state_dict)  # applied after fix.setup, on the first batch
        else:
            self._apply(state_dict)

    def _apply(self, state: Mapping[str, Any]) -> None:
        assert self.ctx is not None
        if "state" in state:
            self.fix.load_state_dict(state["state"])
        if state.get("aux"):
            self.ctx.aux.load_state_dict(state["aux"])

    # ------------------------------------------------------------------ teardown
    def _teardown(self) -> None:
        self._hooks.close()
        self._captured, self._batch, self._logits, self._step = None, None, None, None
        if self.ctx is not None:
            ctx, self.ctx = self.ctx, None
            self._pending = {"fix": self.fix.name, "state": self.fix.state_dict(),
                             "aux": {k: v.detach().cpu() for k, v in ctx.aux.state_dict().items()}}
            self.fix.teardown(ctx)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._teardown()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._teardown()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._teardown()


class RebalanceMixin:
    """Mix into a LightningModule whose fix changes the loss or the logits (``cal``, ``mmpareto``,
    ``modality_dropout``, ...): in ``training_step``, ``loss = self.rebalance_loss(batch, logits, loss)``.

    ``logits`` are the model's fused logits of ``batch``; ``loss`` your loss of them (default: the
    fused cross-entropy). Without a :class:`RebalanceCallback` in the trainer it returns ``loss``
    unchanged (or the cross-entropy), so the module also trains without the callback.
    """

    def rebalance_loss(self, batch: Any, logits: Tensor, loss: Tensor | None = None) -> Tensor:
        trainer = getattr(self, "_trainer", None)
        callbacks = [c for c in (trainer.callbacks if trainer is not None else []) if isinstance(c, RebalanceCallback)]
        if not callbacks or callbacks[0].ctx is None:
            if loss is not None:
                return loss
            labels = split_batch(batch, ())[1].to(logits.device)
            return F.cross_entropy(logits, labels)
        if len(callbacks) > 1:
            raise ConfigError("rebalance_loss: more than one RebalanceCallback in the trainer.")
        return callbacks[0].loss(trainer, logits, loss)  # type: ignore[arg-type]


class DiagnoseCallback(pl.Callback):
    """Diagnose the model on ``data`` every ``every_n_epochs`` validation epochs and log the values.

    Logged (epoch level): ``<diagnostic>.<modality>`` for per-modality values (e.g. ``unimodal.audio``,
    ``shapley.visual``), ``<diagnostic>`` for a diagnostic with only a headline value (``balance``),
    and ``verdict.severity`` (0 none, 1 mild, 2 strong). At the end of fit the last report is written
    as ``filename`` into ``trainer.log_dir`` (or ``default_root_dir``); it is also ``self.report``.

    ``analyze`` runs in eval mode under no_grad with its own seeded generators; the model's training
    mode is restored afterwards. Runs on rank 0 only under DDP (values logged with ``rank_zero_only``).
    """

    def __init__(self, data: Any, every_n_epochs: int = 1,
                 diagnostics: Sequence[str] = ("unimodal", "shapley", "balance"), modalities: Sequence[str] | None = None,
                 *, model_attr: str | None = None, bootstrap: int = 50, seed: int = 0,
                 filename: str = "mmdiag_report.json", **analyze_kwargs: Any) -> None:
        if int(every_n_epochs) < 1:
            raise ConfigError(f"every_n_epochs must be at least 1; found {every_n_epochs}.")
        self.data, self.every_n_epochs = data, int(every_n_epochs)
        self.diagnostics, self.modalities = tuple(diagnostics), tuple(modalities) if modalities else None
        self.model_attr, self.bootstrap, self.seed, self.filename = model_attr, int(bootstrap), int(seed), filename
        self.analyze_kwargs = analyze_kwargs
        self.report: Report | None = None
        self.path: Path | None = None

    def metrics(self, report: Report) -> dict[str, float]:
        """The logged numbers of ``report``."""
        out: dict[str, float] = {}
        for name in self.diagnostics:
            result = report.diagnostics.get(name)
            if result is None:
                continue
            per = {m: v for m, v in (result.per_modality or {}).items() if v is not None}
            if per:
                out.update({f"{name}.{m}": float(v) for m, v in per.items()})
            if (not per or name == "balance") and result.value is not None:
                out[name] = float(result.value)
        out["verdict.severity"] = float(SEVERITY.get(report.verdict.severity, 0))
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not trainer.is_global_zero:
            return
        model = inner_model(pl_module, self.model_attr)
        was_training = model.training
        settings = self.analyze_kwargs.pop("collect_settings", None) or CollectSettings(device=str(pl_module.device),
                                                                                        seed=self.seed)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                report = analyze(model, self.data, modalities=self.modalities, only=list(self.diagnostics),
                                 bootstrap=self.bootstrap, seed=self.seed, collect_settings=settings,
                                 **self.analyze_kwargs)
        finally:
            model.train(was_training)
        self.analyze_kwargs["collect_settings"] = settings
        assert isinstance(report, Report)
        self.report = report
        for k, v in self.metrics(report).items():
            pl_module.log(k, v, on_epoch=True, on_step=False, rank_zero_only=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.report is None or not trainer.is_global_zero:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = self.report.save(folder / self.filename)
