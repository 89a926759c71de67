"""The run of :func:`leaderboard`: train every candidate fix and the plain baseline, score, rank, write.

Every candidate is trained exactly as :func:`~mmdiag.rebalance.rebalance` trains its fix: a fresh
model from the factory under ``torch.manual_seed(train.seed)`` (or fine-tuned from the checkpoint),
the same :class:`~mmdiag.specs.TrainSpec` (budget, optimizer, seed, so the same data order) and the
same training rows. Each lives in ``out_dir/candidates/<fix>/`` (``checkpoint.pt``, ``history.csv``,
``candidate.json``, ``model.safetensors``), so ``resume=True`` skips finished candidates and
continues an interrupted one. The models are then scored on the validation data
(:func:`~mmdiag.rebalance.scoring.score_model`) and ranked (:mod:`~mmdiag.rebalance.board_table`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from mmdiag.errors import ConfigError
from mmdiag.rebalance.board_table import (Entry, Leaderboard, check_objective, leaderboard_columns, leaderboard_rows,
                                          rank_rows, write_leaderboard)
from mmdiag.rebalance.candidate import CANDIDATE_FILE, CandidateJob, TrainedCandidate, load_candidate_model
from mmdiag.rebalance.candidates import BASELINE, candidate_params, parse_fix_list
from mmdiag.rebalance.choice import make_fix
from mmdiag.rebalance.pool import train_all
from mmdiag.rebalance.run import _Session, make_session
from mmdiag.rebalance.scoring import Scores, has_deployment, score_model
from mmdiag.runtime.distributed import barrier, is_main_process, process_group
from mmdiag.train import CHECKPOINT

__all__ = ["CANDIDATES_DIR", "candidate_job", "leaderboard", "prepared_fixes", "session_of", "start_over"]

#: The folder (inside ``out_dir``) holding one sub-folder per candidate.
CANDIDATES_DIR = "candidates"


def session_of(factory: Callable[[], nn.Module], train_data: Any, **run: Any) -> _Session:
    """The checked, coerced settings every candidate shares, from the arguments of
    :func:`~mmdiag.rebalance.rebalance` of the same names (one list, for the leaderboard and the race)."""
    if run.get("out_dir") is None:
        raise ConfigError("Training several fixes needs an output folder (`out_dir`): each candidate keeps "
                          "its checkpoint in a sub-folder of its own.")
    return make_session(factory, train_data, **run)


def prepared_fixes(fixes: str | Sequence[str], fix_params: Mapping[str, Any] | None,
                   with_baseline: bool = False) -> dict[str, dict[str, Any]]:
    """Candidate -> its parameters, every fix built once so a bad parameter fails before training
    (``with_baseline``: plain training is a candidate too, see :func:`parse_fix_list`)."""
    names = parse_fix_list(fixes, with_baseline)
    params = candidate_params(names, fix_params)
    for name in names:
        make_fix(name, params[name])
    return params


def candidate_job(s: _Session, fix: str, params: Mapping[str, Any], *, train_data: Any = None,
                  stop_after: int | None = None) -> CandidateJob:
    """The job training ``fix`` in ``out/candidates/<fix>`` under the session's budget."""
    return CandidateJob(fix=fix, params=dict(params), factory=s.factory,
                        train_data=s.train_ds if train_data is None else train_data, train=s.train,
                        adapter=s.adapter, folder=s.out / CANDIDATES_DIR / fix,  # type: ignore[operator]
                        init=s.init, checkpoint=s.checkpoint, load=s.load, stop_after=stop_after)


def start_over(jobs: Sequence[CandidateJob]) -> None:
    """Forget earlier training in the candidates' folders (a new run, not a resumed one). Under
    torchrun rank 0 deletes and every rank waits for it: a rank that still saw the old files would
    skip a training the others do, and wait for them forever."""
    if is_main_process():
        for job in jobs:
            for name in (CHECKPOINT, CANDIDATE_FILE):
                path = Path(job.folder) / name
                if path.is_file():
                    path.unlink()
    barrier()


def leaderboard(
    factory: Callable[[], nn.Module],
    train_data: Any,
    *,
    fixes: str | Sequence[str] = "all",
    fix_params: Mapping[str, Any] | None = None,
    objective: str = "fused",
    jobs: int = 1,
    formats: Sequence[str] = ("csv", "json", "png", "html"),
    **run: Any,
) -> Leaderboard:
    """Train every fix in ``fixes`` and the plain baseline under one budget; rank them.

    Args:
        fixes: ``all`` (every registered fix), ``"a,b,c"`` or a list of names.
        fix_params: parameters; ``fix.key`` (or a table named like the fix) for one fix, an unprefixed
            key for every fix (each must have it); see :mod:`mmdiag.rebalance.candidates`.
        objective: ``fused`` (default), ``weakest``, ``balance`` or ``deployment`` (the last needs a
            deployment distribution in ``analysis.params``); see :func:`~mmdiag.rebalance.board_table.rank_rows`.
        jobs: candidates trained at once, each in its own process (spawned; torch threads divided).
        formats: what to write: ``csv``, ``json``, ``png`` (``leaderboard.png``), ``html``.
        **run: the arguments of :func:`~mmdiag.rebalance.rebalance` of the same names (``val_data``,
            ``checkpoint``, ``init``, ``train``, ``adapter``, ``analysis``, ``out_dir``, ``resume``, ...,
            see :func:`session_of`); ``out_dir`` is required (``candidates/<fix>/`` and the
            leaderboard files go there); ``resume`` continues it (finished candidates are not
            trained again).

    Returns:
        the :class:`~mmdiag.rebalance.board_table.Leaderboard`; only rank 0 writes under torchrun.
    """
    s = session_of(factory, train_data, **run)
    deployment = has_deployment(s.analysis)
    check_objective(objective, deployment)
    params = prepared_fixes(fixes, fix_params)
    with process_group(s.train.device):
        job_list = [candidate_job(s, BASELINE, {})] + [candidate_job(s, f, p) for f, p in params.items()]
        if not s.resume:
            start_over(job_list)
        trained = train_all(job_list, jobs, _train_progress(s))
        warned: list[str] = []
        entries = [_entry(s, job, done, warned) for job, done in zip(job_list, trained)]
        mods = tuple(s.adapter.modalities or ())
        rows = leaderboard_rows(entries[1:], entries[0], mods, deployment, s.analysis.bootstrap, s.analysis.seed)
        board = Leaderboard(rank_rows(rows, objective, mods), leaderboard_columns(mods, deployment), objective,
                            mods, notes=s.notes, warnings=warned, out_dir=s.out if is_main_process() else None)
        if is_main_process():
            write_leaderboard(board, s.out, s.extra, formats)  # type: ignore[arg-type]
    return board


def _train_progress(s: _Session) -> Callable[[str, Any], None]:
    return lambda fix, p: s.phase(f"train {fix}", p)


def _entry(s: _Session, job: CandidateJob, done: TrainedCandidate, warned: list[str]) -> Entry:
    """Score one trained candidate on the validation data (the training data without); its notes
    join the session's, its changes of method ``warned``, and rank 0 keeps its weights in its folder."""
    from mmdiag.loading import save_state_dict

    s.notes.extend(done.notes)
    warned.extend(w for w in done.warnings if w not in warned)
    model = load_candidate_model(job)
    if is_main_process():
        save_state_dict(model.state_dict(), Path(job.folder) / "model.safetensors")
    s.phase(f"score {job.fix}")
    data = s.val_ds if s.val_ds is not None else s.train_ds
    scores: Scores = score_model(model, data, s.adapter, s.analysis, settings={**s.extra, "stage": job.fix})
    warned.extend(f"{job.fix}: {n}" for n in scores.notes if f"{job.fix}: {n}" not in warned)
    steps = done.steps_per_epoch * done.epochs if done.steps_per_epoch else None
    return Entry(job.fix, scores, done.train_seconds, steps)
