"""Training one candidate fix in its own folder, resumably, up to a number of epochs.

A leaderboard and a race train many fixes under one budget. Each candidate lives in its own folder
(``candidates/<fix>/``) with the training state of :func:`mmdiag.train.fit` (``checkpoint.pt``,
written after every epoch), its ``history.csv`` and ``candidate.json`` (how far it got, its training
seconds and steps per epoch). :func:`train_candidate` continues from that state, so an interrupted
run resumes where it stopped and a finished candidate is not trained again.

Stopping early (race rungs). A rung trains a candidate for the first ``stop_after`` epochs *of the
full budget*: the :class:`~mmdiag.specs.TrainSpec` keeps the full ``epochs`` (fixes whose schedule
depends on the planned epochs see the same plan), and training stops once epoch ``stop_after`` has
been checkpointed. Continuing later resumes from that checkpoint, so a candidate trained rung by rung
ends with exactly the weights of one trained in one go (``fit``'s resume guarantee).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from mmdiag.errors import ConfigError, TrainError
from mmdiag.io import write_atomic
from mmdiag.rebalance.choice import make_fix
from mmdiag.runtime.distributed import barrier, is_main_process
from mmdiag.specs import AdapterSpec, TrainSpec
from mmdiag.train import CHECKPOINT, History, TrainProgress, fit, load_training_checkpoint
from mmdiag.train.state import json_params

__all__ = ["CANDIDATE_FILE", "CandidateJob", "TrainedCandidate", "load_candidate_model", "train_candidate"]

#: What a candidate folder records about its training (written after every call that trained).
CANDIDATE_FILE = "candidate.json"


@dataclass(frozen=True)
class CandidateJob:
    """Everything one candidate's training needs (picklable when its factory and data are, so it
    can go to a worker process).

    Attributes:
        fix, params: the fix and its parameters.
        factory: builds the fresh model (called under ``torch.manual_seed(train.seed)``).
        train_data: the training rows; train: the full budget (the same for every candidate).
        adapter: how to drive the model (modalities set).
        folder: the candidate's own folder.
        init, checkpoint, load: ``scratch`` or ``checkpoint`` (fine-tune from ``checkpoint``, read
            with ``load``'s trust, key and strip_prefix).
        stop_after: train up to this many epochs of the budget (None: all of them).
    """

    fix: str
    params: Mapping[str, Any]
    factory: Callable[[], nn.Module]
    train_data: Any
    train: TrainSpec
    adapter: AdapterSpec
    folder: Path
    init: str = "scratch"
    checkpoint: Any = None
    load: Mapping[str, Any] = field(default_factory=dict)
    stop_after: int | None = None

    @property
    def target(self) -> int:
        """The epochs this job trains up to."""
        return self.train.epochs if self.stop_after is None else min(self.stop_after, self.train.epochs)


@dataclass(frozen=True)
class TrainedCandidate:
    """Where one candidate stands after :func:`train_candidate`.

    Attributes:
        fix: the fix; folder: its folder; epochs: epochs trained so far (in every call together).
        train_seconds: training time summed over those epochs (``time_s`` of the history: the
            batches, the fix's hooks and its epoch-end work).
        steps_per_epoch: optimizer steps in one epoch (None when no epoch was seen).
        trained_now: whether this call trained any batch (False: it had finished before).
        notes: what is worth telling the user (resumes); warnings: changes of method during training.
    """

    fix: str
    folder: Path
    epochs: int
    train_seconds: float
    steps_per_epoch: int | None
    trained_now: bool
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


class _EpochReached(Exception):
    """Raised from the progress callback once the job's last epoch is checkpointed (a rung ends)."""


def _build(job: CandidateJob) -> nn.Module:
    """The job's fresh model, as :func:`mmdiag.rebalance.rebalance` builds it (seeded; fine-tuned
    from the checkpoint with ``init='checkpoint'``)."""
    from mmdiag.loading import load_checkpoint

    torch.manual_seed(job.train.seed)
    model = job.factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"The model factory returned {type(model).__name__}, expected a torch.nn.Module.")
    if job.init == "checkpoint":
        load_checkpoint(model, job.checkpoint, **dict(job.load))
    return model


def _recorded(folder: Path) -> dict[str, Any]:
    path = folder / CANDIDATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _saved_epoch(folder: Path) -> int:
    """Epochs complete in the folder's checkpoint (0 without one; a mid-epoch state counts the
    epochs before it)."""
    path = folder / CHECKPOINT
    return int(load_training_checkpoint(path)["epoch"]) if path.is_file() else 0


def train_candidate(job: CandidateJob, progress: Callable[[TrainProgress], None] | None = None) -> TrainedCandidate:
    """Train ``job``'s fix up to ``job.target`` epochs in ``job.folder``, continuing from its
    checkpoint; nothing is trained when it is there already.

    Raises:
        TrainError: the folder holds a candidate trained past ``job.target`` (another schedule).
    """
    folder = job.folder
    record = _recorded(folder)
    if record.get("epochs", -1) >= job.target and _saved_epoch(folder) == record["epochs"]:
        return _result(job, record, trained_now=False, notes=())
    done = _saved_epoch(folder)
    if done > job.target:
        raise TrainError(f"{folder} holds {job.fix} trained for {done} epochs, past the {job.target} asked for "
                         "now; it was trained under another schedule. Use another output folder.")
    folder.mkdir(parents=True, exist_ok=True)
    model = _build(job)
    adapter = job.adapter.build(model, seed=job.train.seed)
    steps: list[int] = []

    def on_progress(p: TrainProgress) -> None:
        steps.append(p.batches)
        if progress is not None:
            progress(p)
        if p.stage == "epoch" and p.epoch + 1 >= job.target and job.target < job.train.epochs:
            raise _EpochReached  # the state of this epoch is on disk already (fit saves, then reports)

    fix = make_fix(job.fix, job.params)
    history: History | None = None
    try:
        history = fit(adapter, job.train_data, job.train, fix=fix, out_dir=folder,
                      resume=(folder / CHECKPOINT).is_file(), progress=on_progress)
    except _EpochReached:
        pass
    barrier()  # under torchrun rank 0 has written the checkpoint every rank reads next
    notes = [f"{job.fix}: continued from epoch {done}"] if done else []
    warned = [f"{job.fix} training: {w}" for w in adapter.warnings]  # a change of method, said
    rows = history.rows if history is not None else load_training_checkpoint(folder / CHECKPOINT)["history"]
    record = {"fix": job.fix, "params": json_params(fix.params()), "epochs": len(rows),
              "train_seconds": float(sum(r.get("time_s", 0.0) for r in rows)),
              "steps_per_epoch": steps[-1] if steps else record.get("steps_per_epoch"),
              "warnings": list(dict.fromkeys([*record.get("warnings", []), *warned]))}
    if is_main_process():
        write_atomic(folder / CANDIDATE_FILE, json.dumps(record, indent=2) + "\n")
        History(rows=rows).to_csv(folder / "history.csv")
    barrier()
    return _result(job, record, trained_now=bool(steps), notes=tuple(notes))


def _result(job: CandidateJob, record: Mapping[str, Any], trained_now: bool,
            notes: tuple[str, ...]) -> TrainedCandidate:
    return TrainedCandidate(job.fix, job.folder, int(record["epochs"]), float(record["train_seconds"]),
                            record.get("steps_per_epoch"), trained_now, notes, tuple(record.get("warnings", ())))


def load_candidate_model(job: CandidateJob) -> nn.Module:
    """The candidate's model with the weights of its folder's last checkpoint, in eval mode."""
    model = _build(job)
    model.load_state_dict(load_training_checkpoint(job.folder / CHECKPOINT)["model"])
    return model.eval()
