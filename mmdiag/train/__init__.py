"""train: the short reference training loop that runs a fix's hooks.

:func:`fit` trains the user's model (driven by a :class:`~mmdiag.adapter.ModelAdapter`) with one
:class:`~mmdiag.fixes.base.Fix` under a :class:`~mmdiag.specs.TrainSpec`::

    fix.setup(ctx)
    for epoch:
        for batch:
            step = fix_step(ctx, fix, inputs, labels, epoch, index)   # forward, fix.forward, fix.loss
            optimizer.zero_grad(); step.loss.backward()
            fix.after_backward(ctx, step)      # after DDP's all-reduce: every rank sees the averaged gradients
            [clip]; optimizer.step()
        scheduler.step(); fix.on_epoch_end(ctx, epoch); evaluate; checkpoint
    fix.teardown(ctx)                          # always, in a ``finally``

The package: :mod:`~mmdiag.train.loop` (:func:`fit`), :mod:`~mmdiag.train.state` (checkpoint, RNG,
resume, Ctrl-C), :mod:`~mmdiag.train.evaluate` (validation) and :mod:`~mmdiag.train.history`.

Reproducibility and resuming. Everything random is seeded from the spec's ``seed``: torch, numpy and
Python's global generators, and a separate generator for the data order (with ``torch.distributed``,
the ``DistributedSampler`` order, a function of the seed and the epoch). After every epoch the whole
training state is written atomically to ``out_dir/checkpoint.pt``: model and auxiliary-module
weights, optimizer and scheduler state, ``fix.state_dict()``, the RNG states of torch/numpy/python/the
data order (stored as tensors), the position and the history. The file holds only tensors and
primitives, so it loads with ``torch.load(weights_only=True)``. ``resume=True`` continues from it; on
CPU the final weights are bit-identical to an uninterrupted run with the same seed (the test suite
checks ``torch.equal`` on every parameter).

Ctrl-C. While :func:`fit` runs in the main thread, the first SIGINT does not kill the step in
flight: a flag is set and the loop stops at the next *batch boundary*, writes a checkpoint of that
exact state (mid-epoch: the epoch's data-order state, the batch index and the running loss are saved
with it, so resuming replays the rest of the epoch identically) and raises :class:`Interrupted` (a
``KeyboardInterrupt``). A second Ctrl-C interrupts at once; the last checkpoint on disk (the end of
the previous epoch, or the previous boundary) is then the one to resume from. Fixes must keep
within-epoch accumulators in their ``state_dict`` for batch-boundary resumes to be exact.

Several processes. Started by ``torchrun`` (environment ``WORLD_SIZE`` > 1), :func:`fit` joins the
process group through :mod:`mmdiag.runtime.distributed` (``gloo`` on CPU, ``nccl`` on CUDA, using
``LOCAL_RANK`` for the device), wraps the model in ``DistributedDataParallel``, shards every epoch
with a ``DistributedSampler`` seeded with ``seed``, and only rank 0 writes files. A process group that
:func:`fit` joined stays joined for later calls in the same process (it is left at exit);
:func:`mmdiag.runtime.process_group` scopes it explicitly. ``fix.after_backward`` runs after
``loss.backward()`` returned, i.e. after DDP's gradient all-reduce, so every rank sees the same
averaged gradients and makes the same change (fixes synchronise their batch statistics with
:meth:`~mmdiag.fixes.base.FixContext.all_reduce_sum`). Fixes that run the fusion head again on the
cached features (readouts through encoder stubs) do several forwards per step through the DDP
wrapper; this works with DDP's defaults as long as every parameter receives a gradient in every
step. ``ddp_kwargs`` passes options such as ``static_graph`` to ``DistributedDataParallel``;
``find_unused_parameters=True`` is *not* compatible with stub forwards (DDP would mark the encoder
parameters unused after the head-only forward and then see their gradients arrive), so it is refused.
Validation runs on every rank on the full validation set with the unwrapped model (identical
weights, no communication), so every rank returns the same history.
"""

from mmdiag.specs import OPTIMIZERS, TrainSpec
from mmdiag.train.evaluate import evaluate
from mmdiag.train.history import History, ProgressFn, TrainProgress
from mmdiag.train.loop import fit
from mmdiag.train.state import CHECKPOINT, Interrupted, load_training_checkpoint

__all__ = ["CHECKPOINT", "OPTIMIZERS", "History", "Interrupted", "ProgressFn", "TrainProgress", "TrainSpec",
           "evaluate", "fit", "load_training_checkpoint"]
