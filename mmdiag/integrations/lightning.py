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

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdiag.errors import ConfigError
from mmdiag.fixes import Fix
from mmdiag.integrations._diagnose import DEFAULT_DIAGNOSTICS, SEVERITY, LightAnalysis
from mmdiag.integrations._fixrun import FixRun, FixRunCallback, make_fix, split_aux_groups
from mmdiag.report import Report
from mmdiag.runtime.batching import split_batch

__all__ = ["RebalanceCallback", "RebalanceMixin", "DiagnoseCallback", "SEVERITY"]


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


class RebalanceCallback(FixRunCallback, pl.Callback):
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
    The checkpoint holds the fix's state, its auxiliary modules, and the global torch/numpy/python
    generators (restored on resume: fixes draw random numbers); the optimizer state of the auxiliary
    modules' parameter groups is taken out of the model's optimizer state on load and put back once
    the fix has re-created the groups.
    """

    def __init__(self, fix: str | Fix = "ogm_ge", modalities: Sequence[str] | None = None, *,
                 encoders: Mapping[str, str] | None = None, head: str | None = None, call: str | None = None,
                 model_attr: str | None = None, **params: Any) -> None:
        self.run = FixRun(make_fix(fix, params, "RebalanceCallback"), modalities or (), encoders=encoders,
                          head=head, call=call,
                          loss_hint="call `loss = self.rebalance_loss(batch, logits, loss)` in training_step "
                                    "(RebalanceMixin).")
        self.modalities, self.model_attr = self.run.modalities, model_attr

    @property
    def state_key(self) -> str:
        return self._generate_state_key(fix=self.fix.name)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.run.bind(inner_model(pl_module, self.model_attr))

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: dict[str, Tensor]) -> None:
        if len(trainer.optimizers) != 1:
            raise ConfigError(f"RebalanceCallback supports one optimizer; configure_optimizers returned {len(trainer.optimizers)}.")
        steps = trainer.num_training_batches
        finite = isinstance(steps, int) or math.isfinite(steps)
        self.run.start(inputs, optimizer=trainer.optimizers[0], epochs=int(trainer.max_epochs or 0),
                       steps_per_epoch=int(steps) if finite else None, device=pl_module.device,
                       world_size=trainer.world_size, rank=trainer.global_rank)

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        inputs, labels, _ = split_batch(batch, self.modalities)
        if not self.run.started:
            self._start(trainer, pl_module, inputs)
        self.run.begin_batch(inputs, labels, batch_idx)

    def make_step(self, trainer: pl.Trainer, logits: Tensor | None = None) -> Any:
        """The :class:`~mmdiag.fixes.Step` of the current training batch (hooks' records)."""
        return self.run.make_step(trainer.current_epoch, logits)

    def loss(self, trainer: pl.Trainer, logits: Tensor, loss: Tensor | None = None) -> Tensor:
        """The fix's training loss for this batch (what :meth:`RebalanceMixin.rebalance_loss` returns)."""
        return self.run.loss(trainer.current_epoch, logits, loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.run.after_backward(trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.run.end_batch()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for k, v in self.run.end_epoch(trainer.current_epoch).items():
            pl_module.log(f"{self.fix.name}.{k}", v, on_epoch=True, on_step=False)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # runs before Lightning restores the optimizer, which does not hold the fix's groups yet
        mine = checkpoint.get("callbacks", {}).get(self.state_key) or {}
        n_groups = int(mine.get("aux_groups") or 0)
        states = checkpoint.get("optimizer_states") or []
        if n_groups and states:
            self.run.load_state_dict({"fix": self.fix.name, "aux_optimizer": split_aux_groups(states[0], n_groups)})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run.load_state_dict(state_dict)

    # ------------------------------------------------------------------ teardown
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run.teardown()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.run.teardown()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.run.teardown()


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
        if not callbacks or not callbacks[0].run.started:
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

    def __init__(self, data: Any, every_n_epochs: int = 1, diagnostics: Sequence[str] = DEFAULT_DIAGNOSTICS,
                 modalities: Sequence[str] | None = None, *, model_attr: str | None = None, bootstrap: int = 50,
                 seed: int = 0, filename: str = "mmdiag_report.json", **analyze_kwargs: Any) -> None:
        if int(every_n_epochs) < 1:
            raise ConfigError(f"every_n_epochs must be at least 1; found {every_n_epochs}.")
        self.every_n_epochs, self.model_attr, self.filename = int(every_n_epochs), model_attr, filename
        self.analysis = LightAnalysis(data, diagnostics, modalities, bootstrap=bootstrap, seed=seed, **analyze_kwargs)
        self.report: Report | None = None
        self.path: Path | None = None

    def metrics(self, report: Report) -> dict[str, float]:
        """The logged numbers of ``report``."""
        return self.analysis.metrics(report)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not trainer.is_global_zero:
            return
        self.report = self.analysis(inner_model(pl_module, self.model_attr), pl_module.device)
        for k, v in self.metrics(self.report).items():
            pl_module.log(k, v, on_epoch=True, on_step=False, rank_zero_only=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.report is None or not trainer.is_global_zero:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = self.report.save(folder / self.filename)
