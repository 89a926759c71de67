"""Hugging Face ``transformers.Trainer``: retrain with an mmdiag fix, diagnose at each evaluation.

* :class:`RebalanceCallback` runs a registered fix. Gradient fixes act in ``on_pre_optimizer_step``:
  after the last micro-batch's backward (gradients accumulated), after ``accelerator.clip_grad_norm_``
  (which unscales fp16 gradients, and clips them to ``max_grad_norm`` when that is above 0), right
  before ``optimizer.step()``. The batch, encoder outputs and logits a fix needs are recorded by hooks
  while the Trainer calls the model.
* :class:`MMDiagTrainer` is a ``Trainer`` whose ``compute_loss`` returns the fix's loss (fixes that add a
  loss term or change the logits need it: a callback cannot change the loss); it also sets the fix up
  before the optimizer state is restored (so fixes with auxiliary modules resume), tears the fix down
  when training raises, and puts the :class:`DiagnoseCallback` values into the evaluation logs.
* :class:`DiagnoseCallback` runs a light :func:`mmdiag.analyze` at ``on_evaluate`` and adds the
  per-modality values to the evaluation metrics.

Requires ``transformers`` (``pip install mmdiag[hf]``); see docs/integrations.md.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from mmdiag.errors import ConfigError, MmdiagWarning, TrainError
from mmdiag.fixes import Fix
from mmdiag.integrations._diagnose import DEFAULT_DIAGNOSTICS, SEVERITY, LightAnalysis
from mmdiag.integrations._fixrun import FixRun, FixRunCallback, make_fix
from mmdiag.report import Report
from mmdiag.runtime.batching import LABEL_KEYS, split_batch
from mmdiag.tensors import logits_of

__all__ = ["DiagnoseCallback", "FIX_STATE_FILE", "MMDiagTrainer", "RebalanceCallback", "SEVERITY"]

#: the fix's state inside each ``checkpoint-<step>`` folder
FIX_STATE_FILE = "mmdiag_fix.pt"


def hf_logits(output: Any) -> Tensor:
    """The logits of a model output: ``output.logits`` / ``output["logits"]``; of a tuple, the item after
    the loss when the first item is a scalar loss (``(loss, logits, ...)``), else the first."""
    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[0], Tensor) and output[0].dim() == 0:
        return output[1]
    return logits_of(output)


def _probe_rows(dataset: Any, batch_size: int) -> list[Any]:
    """The first ``batch_size`` rows of a map-style ``dataset``, in dataset order (no random numbers drawn)."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ConfigError(f"RebalanceCallback needs a map-style `train_dataset` (len and indexing) to check the model "
                          f"before training; found {type(dataset).__name__}.")
    return [dataset[i] for i in range(min(len(dataset), batch_size))]


def _plan(args: TrainingArguments, n_rows: int) -> tuple[int, int]:
    """(epochs, optimizer steps per epoch) of a run over ``n_rows`` training rows."""
    per_step = args.per_device_train_batch_size * max(1, args.world_size)
    batches = math.ceil(n_rows / per_step) if not args.dataloader_drop_last else n_rows // per_step
    steps = max(1, math.ceil(batches / args.gradient_accumulation_steps))
    epochs = math.ceil(args.max_steps / steps) if args.max_steps > 0 else math.ceil(args.num_train_epochs)
    return int(epochs), steps


class RebalanceCallback(FixRunCallback, TrainerCallback):
    """Run the fix ``fix`` (a registered name or a :class:`~mmdiag.fixes.Fix`) inside ``Trainer.train``.

    Args:
        fix: fix name (``mmdiag list fixes``) or instance; ``**params`` go to a named fix.
        modalities: modality names: the keyword arguments of the model's forward that carry the inputs
            (the batch keys), in the model's order.
        encoders, head, call: as for :class:`~mmdiag.ModelAdapter` (found by name when None).

    The Trainer calls ``model(**batch)``; a forward pre-hook reads the modalities and ``labels`` (or
    ``label``) from it. With gradient accumulation the fix sees the last micro-batch of each optimizer
    step. Fixes that change the loss need :class:`MMDiagTrainer`.
    """

    def __init__(self, fix: str | Fix = "ogm_ge", modalities: Sequence[str] | None = None, *,
                 encoders: Mapping[str, str] | None = None, head: str | None = None, call: str | None = None,
                 **params: Any) -> None:
        # the Trainer restores the global generators itself (rng_state.pth), after this callback's set-up
        self.run = FixRun(make_fix(fix, params, "RebalanceCallback"), modalities or (), encoders=encoders,
                          head=head, call=call, logits_fn=hf_logits, restore_rng=False,
                          loss_hint="train with `MMDiagTrainer` (its compute_loss returns the fix's loss) "
                                    "instead of `Trainer`.")
        self.modalities = self.run.modalities
        #: the fix's signals at the end of each epoch: ``{"epoch": e, "<signal>": value, ...}``
        self.history: list[dict[str, float]] = []
        self.resume_from: str | None = None
        self._epoch, self._index = 0, 0
        self._clip_warned = False

    # ------------------------------------------------------------------ set-up
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, probe: Any, args: TrainingArguments,
                n_rows: int) -> None:
        """Bind ``model``, check the adapter on the ``probe`` batch (collated rows, in dataset order: no
        random numbers are drawn) and call ``fix.setup`` with ``optimizer``."""
        if self.run.started:
            return
        self.run.bind(model)
        inputs, _, _ = split_batch(probe, self.modalities)
        epochs, steps = _plan(args, n_rows)
        self.run.start(inputs, optimizer=getattr(optimizer, "optimizer", optimizer), epochs=epochs,
                       steps_per_epoch=steps, device=args.device, world_size=max(1, args.world_size),
                       rank=args.process_index)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: Any = None, train_dataloader: Any = None,
                       **kwargs: Any) -> None:
        if model is None or optimizer is None or train_dataloader is None:
            raise TrainError("RebalanceCallback: the Trainer passed no model, optimizer or train dataloader.")
        if not self.run.started:
            dataset = train_dataloader.dataset
            rows = _probe_rows(dataset, args.per_device_train_batch_size)
            self.prepare(model, optimizer, train_dataloader.collate_fn(rows), args, len(dataset))
        self.run.install()
        self.run.add_hook(self.run.adapter.model.register_forward_pre_hook(self._record_batch, with_kwargs=True))
        steps = self.run.ctx.steps_per_epoch or 1
        self._epoch = state.global_step // steps
        if state.global_step > 0:
            self._resume(args, state)
        if args.max_grad_norm and args.max_grad_norm > 0 and not self._clip_warned:
            self._clip_warned = True
            warnings.warn(
                f"fix {self.fix.name} acts on gradients the Trainer has already clipped to max_grad_norm="
                f"{args.max_grad_norm} (transformers clips before on_pre_optimizer_step); mmdiag.train.fit applies the "
                "fix first and clips after (`grad_clip`). Set max_grad_norm=0 for the same order as fit without clipping.",
                MmdiagWarning, stacklevel=2)

    def _record_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # the first training forward of a micro-batch is the Trainer's; later ones are the fix's own readouts
        if not (module.training and torch.is_grad_enabled()) or self.run.in_batch:
            return
        label_key = next((k for k in LABEL_KEYS if kwargs.get(k) is not None), None)
        missing = [m for m in self.modalities if m not in kwargs]
        if label_key is None or missing:
            raise TrainError(
                f"RebalanceCallback: the Trainer called the model with {sorted(kwargs)}; a fix needs the modalities "
                f"{list(self.modalities)} and `labels` as keyword arguments (the batch's keys).")
        self.run.begin_batch({m: kwargs[m] for m in self.modalities}, kwargs[label_key], self._index)
        self._index += 1

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        folder = Path(self.resume_from) if self.resume_from else Path(args.output_dir) / f"checkpoint-{state.global_step}"
        path = folder / FIX_STATE_FILE
        if not path.is_file():
            raise TrainError(
                f"RebalanceCallback: training resumes at step {state.global_step}, but {path} does not exist, so "
                f"the state of fix {self.fix.name!r} cannot be restored. Resume from a checkpoint written with this "
                "callback (train with `MMDiagTrainer`, which tells the callback the folder given to "
                "`resume_from_checkpoint`).")
        self.run.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # ------------------------------------------------------------------ per step
    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._index = 0

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        self.run.after_backward(self._epoch)

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.run.end_batch()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.run.end_batch()
        if self.run.ctx is not None:
            # the Trainer zeroes the model's gradients (model.zero_grad), not those of the fix's
            # auxiliary modules, which would otherwise add up over every step
            self.run.ctx.aux.zero_grad(set_to_none=True)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        signals = self.run.end_epoch(self._epoch)
        self.history.append({"epoch": float(self._epoch), **signals})
        self._epoch += 1

    def loss(self, logits: Tensor, loss: Tensor | None = None) -> Tensor:
        """The fix's loss of the current micro-batch (what :meth:`MMDiagTrainer.compute_loss` returns)."""
        return self.run.loss(self._epoch, logits, loss)

    # ------------------------------------------------------------------ state and teardown
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.run.started and args.should_save and folder.is_dir():
            torch.save(self.run.state_dict(), folder / FIX_STATE_FILE)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.teardown()

    def teardown(self) -> None:
        """Remove every hook and call ``fix.teardown`` (idempotent); :class:`MMDiagTrainer` calls it when
        training raises (the Trainer has no exception event: with a plain Trainer call it yourself)."""
        self.run.teardown()


class DiagnoseCallback(TrainerCallback):
    """Diagnose the model on ``data`` at each evaluation and add the values to the evaluation metrics.

    Keys (``prefix`` + gate key): ``eval_<diagnostic>.<modality>`` (e.g. ``eval_unimodal.audio``,
    ``eval_shapley.visual``), ``eval_<diagnostic>`` for a headline-only diagnostic and ``balance``,
    ``eval_verdict.severity`` (0 none, 1 mild, 2 strong). They are in the dict ``trainer.evaluate()``
    returns (so ``metric_for_best_model`` may name one) and in the evaluation entry of
    ``trainer.state.log_history``. The Trainer logs before ``on_evaluate``, so its ``report_to``
    loggers see them only under :class:`MMDiagTrainer`, which diagnoses before it logs. The last report
    is ``self.report`` and is written to ``output_dir/filename`` at the end of training.
    """

    def __init__(self, data: Any, diagnostics: Sequence[str] = DEFAULT_DIAGNOSTICS,
                 modalities: Sequence[str] | None = None, *, bootstrap: int = 50, seed: int = 0,
                 prefix: str = "eval_", filename: str = "mmdiag_report.json", **analyze_kwargs: Any) -> None:
        self.analysis = LightAnalysis(data, diagnostics, modalities, bootstrap=bootstrap, seed=seed, **analyze_kwargs)
        self.prefix, self.filename = prefix, filename
        self.report: Report | None = None
        self.path: Path | None = None
        self._measured: tuple[int, dict[str, float]] | None = None  # (step, values) diagnosed before logging

    def measure(self, model: nn.Module, state: TrainerState, device: torch.device) -> dict[str, float]:
        """Run the analysis now (once per step) and return the prefixed values."""
        if self._measured is not None and self._measured[0] == state.global_step:
            return self._measured[1]
        self.report = self.analysis(model, device)
        values = {f"{self.prefix}{k}": v for k, v in self.analysis.metrics(self.report).items()}
        self._measured = (state.global_step, values)
        return values

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, model: nn.Module | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or model is None:
            return
        values = self.measure(model, state, args.device)
        if metrics is not None:
            metrics.update(values)
        last = state.log_history[-1] if state.log_history else None
        # the evaluation entry the Trainer appended just before this event
        if last is not None and metrics is not None and all(k in last for k in metrics if k not in values):
            last.update(values)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.report is not None and state.is_world_process_zero:
            folder = Path(args.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self.path = self.report.save(folder / self.filename)


class MMDiagTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with the fix of its :class:`RebalanceCallback` (in
    ``callbacks=[...]``): ``compute_loss`` returns the fix's loss of the model's logits and its own loss
    (the fused cross-entropy the model returns, or the cross-entropy of the fix's new logits). Without a
    RebalanceCallback it is the plain Trainer.

    It also sets the fix up when the optimizer is built (before a checkpoint's optimizer state is loaded,
    so the optimizer groups of a fix's auxiliary modules exist when it is), tells the callback the
    ``resume_from_checkpoint`` folder, tears the fix down when training raises, and diagnoses before it
    logs an evaluation so that ``report_to`` loggers see the :class:`DiagnoseCallback` values.
    """

    def _mmdiag(self, kind: type) -> list[Any]:
        return [c for c in self.callback_handler.callbacks if isinstance(c, kind)]

    def _rebalance(self) -> RebalanceCallback | None:
        found = self._mmdiag(RebalanceCallback)
        if len(found) > 1:
            raise ConfigError("MMDiagTrainer: more than one RebalanceCallback in `callbacks`.")
        return found[0] if found else None

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        cb = self._rebalance()
        if cb is not None and self.train_dataset is not None:
            rows = _probe_rows(self.train_dataset, self.args.per_device_train_batch_size)
            cb.prepare(self.model, optimizer, self.data_collator(rows), self.args, len(self.train_dataset))
        return optimizer

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        cb = self._rebalance()
        if cb is not None and isinstance(resume_from_checkpoint, str):
            cb.resume_from = resume_from_checkpoint
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if cb is not None:
                cb.teardown()

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        cb = self._rebalance()
        if cb is None or not cb.run.started or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        fixed = cb.loss(hf_logits(outputs), loss)
        return (fixed, outputs) if return_outputs else fixed

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        diagnose = self._mmdiag(DiagnoseCallback)
        if diagnose and self.state.is_world_process_zero and any(k.endswith("_runtime") and k != "train_runtime" for k in logs):
            model = self.accelerator.unwrap_model(self.model)
            for cb in diagnose:
                logs.update(cb.measure(model, self.state, self.args.device))
        super().log(logs, *args, **kwargs)
