"""A race between fixes: successive halving on a held-out part of the training data.

``race(...)`` picks a fix by evidence instead of by the verdict's rule:

1. **Held-out rows.** A seeded random ``holdout`` fraction of the *training* rows (default 0.2) is
   set aside (:func:`holdout_split`); every candidate (and the baseline) trains on the rest. The
   validation data of the report is never used to choose.
2. **Rungs** (:func:`race_schedule`). With K candidates there are R = ceil(log2 K) rungs; rung
   r = 0..R-1 trains every candidate still in the race up to epoch
   e_r = min(E, max(floor(E / 2^(R-1-r)), e_{r-1} + 1)) of the full budget E (e_{-1} = 0: for R = 4,
   E/8, E/4, E/2 and E; a small budget still trains at least one more epoch per rung, so no rung
   halves on the same scores as the one before), scores them on the held-out rows by the objective
   and keeps the better half, ceil(k/2) of k (:func:`halve`; ties as in the leaderboard).
3. **The winner** is the better of the last two, both trained to the full budget E: a fix that looks
   good early and degrades later (it happens) is caught at the budget the user asked for. Every
   candidate continues from its own checkpoint at each rung, so its weights are exactly those of one
   run of E epochs (only the stopping points differ).
4. **The report.** The winner is handed to :func:`~mmdiag.rebalance.rebalance`, which analyses it
   (``after/``), the plain baseline trained on the same rows (``baseline/``, with ``baseline``), and
   the checkpoint (``before/``), and writes ``comparison.*`` as for a single fix.

Cost: candidate-epochs sum_r k_r (e_r - e_{r-1}) (k_r candidates enter rung r, e_{-1} = 0) against
K x E for a leaderboard of the same candidates (both without the baseline); :class:`RaceCost` also
gives training seconds, the leaderboard's estimated from each candidate's measured seconds per epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from mmdiag.errors import ConfigError
from mmdiag.io import write_atomic
from mmdiag.rebalance.board_run import candidate_job
from mmdiag.rebalance.board_table import rank_rows
from mmdiag.rebalance.candidate import TrainedCandidate, load_candidate_model
from mmdiag.rebalance.pool import train_all
from mmdiag.rebalance.scoring import Scores, score_model
from mmdiag.runtime.distributed import is_main_process

__all__ = ["DEFAULT_HOLDOUT", "SCORES_FILE", "RaceCost", "RaceRow", "Rung", "RowSubset", "forget_scores", "halve",
           "holdout_split",
           "race_schedule", "run_rungs"]

#: The fraction of the training rows held out to score the rungs.
DEFAULT_HOLDOUT = 0.2


@dataclass(frozen=True)
class Rung:
    """One rung: train every remaining candidate up to ``epochs``, then keep ``keep`` of them."""

    epochs: int
    keep: int


@dataclass(frozen=True)
class RaceRow:
    """A line of ``race.csv``: a candidate's held-out score at a rung and what became of it
    (``kept``, ``dropped``, or ``winner`` on the final line, at the full budget)."""

    fix: str
    rung: int
    epochs: int
    score: float
    decision: str


@dataclass(frozen=True)
class RaceCost:
    """Candidate training of the race against a leaderboard of the same candidates (baseline excluded).

    ``all_seconds`` is estimated: each candidate's measured seconds per epoch in the race x E."""

    epochs: int
    seconds: float
    all_epochs: int
    all_seconds: float


def race_schedule(epochs: int, candidates: int) -> list[Rung]:
    """The rungs for ``candidates`` fixes and a budget of ``epochs`` (see the module doc); empty for one."""
    if candidates < 1:
        raise ConfigError("A race needs at least one candidate fix.")
    rungs_n = math.ceil(math.log2(candidates)) if candidates > 1 else 0
    rungs: list[Rung] = []
    left = candidates
    for r in range(rungs_n):
        left = math.ceil(left / 2)
        before = rungs[-1].epochs if rungs else 0
        rungs.append(Rung(min(epochs, max(epochs // 2 ** (rungs_n - 1 - r), before + 1)), left))
    return rungs


def halve(scores: Mapping[str, Scores], keep: int, objective: str, modalities: Sequence[str]) -> list[str]:
    """The ``keep`` best candidates by ``objective`` (order: best first; ties as
    :func:`~mmdiag.rebalance.board_table.rank_rows`, then the order of ``scores``)."""
    rows = [{"fix": f, "accuracy": s.accuracy, "balance": s.balance, "deployment": s.deployment,
             **{f"unimodal.{m}": s.unimodal[m] for m in modalities}} for f, s in scores.items()]
    return [r["fix"] for r in rank_rows(rows, objective, modalities)[:keep]]


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(rows to train on, held-out rows) of ``n`` training rows: a seeded random ``fraction``
    (at least one row, and at least one row left to train on), each list in row order."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"The race's held-out fraction must be between 0 and 1; found {fraction}.")
    k = min(n - 1, max(1, round(n * fraction)))
    if k < 1:
        raise ConfigError(f"A race needs at least 2 training rows to hold some out; found {n}.")
    held = np.sort(np.random.default_rng(seed).permutation(n)[:k])
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask).tolist(), held.tolist()


class RowSubset(Dataset):
    """The rows ``rows`` of ``base``, keeping the in-memory fast path (``tensors()``) when it has one."""

    def __init__(self, base: Any, rows: Sequence[int]) -> None:
        self.base, self.rows = base, list(rows)
        self.modalities = getattr(base, "modalities", None)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.rows[i]]

    def tensors(self) -> Any:
        whole = getattr(self.base, "tensors", None)
        if not callable(whole):
            return None
        import torch

        index = torch.as_tensor(self.rows, dtype=torch.long)
        return {k: v[index] for k, v in whole().items()}


@dataclass
class RungsOutcome:
    """What the rungs decided: the winner, the ``race.csv`` lines so far, and each candidate's
    training state after its last rung."""

    winner: str
    rows: list[RaceRow]
    trained: dict[str, TrainedCandidate]


def run_rungs(s: Any, params: Mapping[str, Mapping[str, Any]], train_part: Any, held: Any, objective: str,
              jobs: int) -> RungsOutcome:
    """Train and halve rung by rung (``s`` a rebalance session; ``train_part`` the rows trained on,
    ``held`` the held-out rows). Nothing here sees the session's validation data."""
    mods = tuple(s.adapter.modalities)
    cache = _ScoreCache(s.out / SCORES_FILE)
    left, rows, trained = list(params), [], {}
    for r, rung in enumerate(race_schedule(s.train.epochs, len(left))):
        jobs_now = [candidate_job(s, f, params[f], train_data=train_part, stop_after=rung.epochs) for f in left]
        for job, done in zip(jobs_now, train_all(jobs_now, jobs, lambda f, p: s.phase(f"race {f}", p))):
            trained[job.fix] = done
        scores = {job.fix: cache.get(job.fix, rung.epochs) or cache.put(job.fix, rung.epochs, held_score(s, job, held))
                  for job in jobs_now}
        kept = halve(scores, rung.keep, objective, mods)
        last = rung.keep == 1
        rows += [RaceRow(f, r, rung.epochs, scores[f].objective(objective),
                         ("winner" if last else "kept") if f in kept else "dropped") for f in left]
        s.phase(f"race rung {r} at epoch {rung.epochs}: {len(kept)} of {len(left)} go on")
        left = kept
    return RungsOutcome(left[0], rows, trained)


#: The held-out scores of every rung so far (``race_scores.json`` in the output folder).
SCORES_FILE = "race_scores.json"


class _ScoreCache:
    """Each candidate's held-out scores by the epochs it had, kept on disk as they are measured.

    A resumed race decides with the scores measured at each rung, not with weights trained further
    since (a finalist is at the full budget by then; the baseline ``none`` may be too)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saved: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, fix: str, epochs: int) -> Scores | None:
        got = self.saved.get(f"{fix}@{epochs}")
        if got is None:
            return None
        return Scores(got["accuracy"], None, dict(got["unimodal"]), got["balance"], got["deployment"], np.zeros(0))

    def put(self, fix: str, epochs: int, scores: Scores) -> Scores:
        self.saved[f"{fix}@{epochs}"] = {"accuracy": scores.accuracy, "unimodal": scores.unimodal,
                                        "balance": scores.balance, "deployment": scores.deployment}
        if is_main_process():
            write_atomic(self.path, json.dumps(self.saved, indent=1) + "\n")
        return scores


def forget_scores(out: Path) -> None:
    """Drop the held-out scores of an earlier race in ``out`` (a new race, not a resumed one)."""
    path = Path(out) / SCORES_FILE
    if is_main_process() and path.is_file():
        path.unlink()


def held_score(s: Any, job: Any, held: Any) -> Scores:
    """The candidate's scores on the held-out training rows (no resampling: only the values rank)."""
    model = load_candidate_model(job)
    return score_model(model, held, s.adapter, dataclasses.replace(s.analysis, bootstrap=0),
                       settings={**s.extra, "stage": f"race {job.fix}"})


def race_cost(trained: Mapping[str, TrainedCandidate], epochs: int) -> RaceCost:
    """The race's candidate training against training every candidate for ``epochs``."""
    spent = sum(t.epochs for t in trained.values())
    seconds = sum(t.train_seconds for t in trained.values())
    estimate = sum(t.train_seconds / t.epochs * epochs for t in trained.values() if t.epochs)
    return RaceCost(spent, seconds, epochs * len(trained), estimate)


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a finished candidate's training state to where :func:`rebalance` resumes it from."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
