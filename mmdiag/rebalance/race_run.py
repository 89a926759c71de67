"""The run of :func:`race` (see :mod:`mmdiag.rebalance.halving` for the method): the rungs, the winner to
the full budget, then a single-fix :func:`~mmdiag.rebalance.rebalance` of the winner."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from mmdiag.io import write_atomic
from mmdiag.rebalance.board_run import candidate_job, prepared_fixes, session_of, start_over
from mmdiag.rebalance.board_table import check_objective
from mmdiag.rebalance.candidate import CandidateJob
from mmdiag.rebalance.candidates import BASELINE
from mmdiag.rebalance.choice import make_fix
from mmdiag.rebalance.halving import (DEFAULT_HOLDOUT, RaceCost, RaceRow, RowSubset, copy_checkpoint, forget_scores,
                                      held_score, holdout_split, race_cost, race_schedule, run_rungs)
from mmdiag.rebalance.pool import train_all
from mmdiag.rebalance.result import RebalanceResult, write_json
from mmdiag.rebalance.run import _Session, rebalance
from mmdiag.rebalance.scoring import has_deployment
from mmdiag.runtime.distributed import barrier, is_main_process, process_group
from mmdiag.train import CHECKPOINT

__all__ = ["RACE_COLUMNS", "RaceResult", "race"]

#: Columns of ``race.csv``.
RACE_COLUMNS = ("fix", "rung", "epochs", "score", "decision")


@dataclass
class RaceResult:
    """What :func:`race` did: the ``winner``, the ``rows`` of ``race.csv``, the ``cost`` against a
    leaderboard, the ``objective``, the ``held_out`` row count, and the winner's ``rebalance`` result."""

    winner: str
    rows: list[RaceRow]
    cost: RaceCost
    objective: str
    held_out: int
    rebalance: RebalanceResult


def race(
    factory: Callable[[], nn.Module],
    train_data: Any,
    *,
    candidates: str | Sequence[str] = "all",
    fix_params: Mapping[str, Any] | None = None,
    objective: str = "fused",
    holdout: float = DEFAULT_HOLDOUT,
    jobs: int = 1,
    baseline: bool = False,
    report_formats: str | Sequence[str] | None = None,
    **run: Any,
) -> RaceResult:
    """Pick a fix by successive halving on held-out training rows, train it to the full budget and
    compare it as :func:`~mmdiag.rebalance.rebalance` does (see :mod:`mmdiag.rebalance.halving`).

    Args:
        candidates: the fixes that race: ``all`` (every registered fix, plain training ``none``
            included: when no fix beats it, the race says so) or ``"a,b,c"`` / a list.
        objective: what the rungs select by (``fused``, ``weakest``, ``balance``, ``deployment``),
            measured on the held-out training rows.
        holdout: the fraction of the training rows held out for the rungs' scores (not trained on;
            the winner and the baseline also train without them).
        jobs: candidates of a rung trained at once, each in its own process.
        baseline: also train the plain model (on the same rows) and compare.
        report_formats: renderings of the winner's before/after/baseline reports.
        **run: the arguments of :func:`~mmdiag.rebalance.rebalance` of the same names (``val_data``,
            ``checkpoint``, ``init``, ``train``, ``adapter``, ``analysis``, ``out_dir``, ``resume``, ...);
            ``out_dir`` is required (``candidates/<fix>/`` holds each candidate's training state).
    """
    s = session_of(factory, train_data, **run)
    check_objective(objective, has_deployment(s.analysis))
    params = prepared_fixes(candidates, fix_params, with_baseline=True)
    with process_group(s.train.device):
        train_rows, held_rows = holdout_split(len(s.train_ds), holdout, s.train.seed)
        train_part, held = RowSubset(s.train_ds, train_rows), RowSubset(s.train_ds, held_rows)
        if not s.resume:
            forget_scores(s.out)
            start_over([candidate_job(s, f, {}) for f in dict.fromkeys([BASELINE, *params])])
        outcome = run_rungs(s, params, train_part, held, objective, jobs)
        winner, rows = outcome.winner, list(outcome.rows)
        final = candidate_job(s, winner, params[winner], train_data=train_part)
        if not rows:  # a single candidate: no rung, it simply trains to the full budget
            outcome.trained[winner] = train_all([final], 1, lambda f, p: s.phase(f"race {f}", p))[0]
            rows.append(RaceRow(winner, 0, s.train.epochs, held_score(s, final, held).objective(objective), "winner"))
        if baseline:
            _train_baseline(s, train_part)
        cost = race_cost(outcome.trained, s.train.epochs)
        if is_main_process():
            _write_race(s, rows, cost, objective, len(held_rows), holdout, final)
        barrier()  # every rank resumes the winner (and the baseline) from the copies rank 0 made
    note = (f"won a race of {len(params)} fixes (successive halving by {objective} on {len(held_rows)} held-out "
            f"training rows; race.csv); trained on the other {len(train_rows)} rows")
    given = {**run, "val_data": s.val_ds, "train": s.train, "adapter": s.adapter, "analysis": s.analysis}
    result = rebalance(factory, train_part, **{**given, "resume": True}, fix=make_fix(winner, params[winner]),
                       baseline=baseline, report_formats=report_formats,
                       choice={"requested": "race", "note": note, "reasons": []})
    return RaceResult(winner, rows, cost, objective, len(held_rows), result)


def _train_baseline(s: _Session, train_part: Any) -> None:
    """The plain run on the race's training rows, placed where rebalance resumes its baseline from."""
    job: CandidateJob = candidate_job(s, BASELINE, {}, train_data=train_part)
    train_all([job], 1, lambda f, p: s.phase("train baseline", p))
    if is_main_process():
        copy_checkpoint(Path(job.folder) / CHECKPOINT, s.out / "baseline" / CHECKPOINT)  # type: ignore[operator]


def _write_race(s: _Session, rows: Sequence[RaceRow], cost: RaceCost, objective: str, held: int,
                holdout: float, final: CandidateJob) -> None:
    """``race.csv``, ``race.json`` and the winner's state where rebalance resumes it from."""
    out: Path = s.out  # type: ignore[assignment]
    copy_checkpoint(Path(final.folder) / CHECKPOINT, out / CHECKPOINT)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(RACE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    write_atomic(out / "race.csv", buf.getvalue())
    write_json(out / "race.json", {
        "winner": final.fix, "objective": objective, "held_out_rows": held, "holdout": holdout,
        "schedule": [asdict(r) for r in race_schedule(s.train.epochs, sum(1 for r in rows if r.rung == 0))],
        "rows": [asdict(r) for r in rows], "cost": asdict(cost),
        "note": "cost: candidate epochs and training seconds of the race against training every candidate for "
                "the full budget (all_seconds estimated from each candidate's seconds per epoch); the baseline "
                "is not counted in either",
    })
