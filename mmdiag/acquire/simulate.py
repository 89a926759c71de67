"""The simulation that shows whether a strategy helps: hide the labels of a training set, start
every strategy from the same labelled set and round-0 model, and acquire, retrain, evaluate.

Protocol (BMMAL's, methods.md §17.6). For each seed s: ``initial`` rows drawn at random (seeded by
s) are labelled and a model is trained on them (round 0, shared by every strategy). Then for each
strategy and round r = 1..``rounds``: the current model scores the unlabelled rest (their labels
are never read), the strategy picks ``budget`` rows, their labels are revealed, a fresh model
(the factory, seeded by (s, r): the same initialisation and data-order seed for every strategy)
is trained from scratch on all labelled rows with the reference loop (and ``fix``), and evaluated
on the validation data (fused and unimodal accuracies). rlmba's AMCB reward reads that validation
evaluation, as real rounds would read a labelled validation set.

Files under ``out_dir`` (each written atomically, so an interrupted run resumes at the last
finished round): ``simulation.json`` (settings), ``seed<s>/round0.{json,pt}``,
``chains/<strategy>-seed<s>.{json,pt}`` (labelled rows, curve rows, the policy and the model).
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Subset

from mmdiag.acquire import policy as amcb
from mmdiag.acquire.curves import curve_row
from mmdiag.acquire.select import KAPPA, rank_pool
from mmdiag.acquire.strategies import STRATEGIES
from mmdiag.errors import ConfigError
from mmdiag.io import write_atomic, write_atomic_with
from mmdiag.loading import ArrayDataset
from mmdiag.rebalance.choice import make_fix
from mmdiag.specs import AdapterSpec, TrainSpec
from mmdiag.train import evaluate, fit

ProgressFn = Callable[[str, int, "int | None"], None]


@dataclass(frozen=True)
class SimulationSpec:
    """The simulation's settings (see the module docstring).

    ``seeds``: how many seeds, ``seed``, ``seed + 1``, …; ``train``: the training budget of every
    retraining (its own seed is replaced per seed and round); ``fix``/``fix_params``: the rebalancing
    fix the retraining uses (``none``: plain); ``kappa`` and ``policy``: rlmba's settings.
    """

    initial: int = 200
    budget: int = 100
    rounds: int = 8
    strategies: tuple[str, ...] = ("rlmba", "bmmal", "badge", "entropy", "random")
    seeds: int = 3
    seed: int = 0
    train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=10))
    fix: str = "none"
    fix_params: Mapping[str, Any] = field(default_factory=dict)
    kappa: float = KAPPA
    policy: amcb.PolicySettings = field(default_factory=amcb.PolicySettings)
    eval_batch_size: int = 256

    def check(self, n_rows: int) -> None:
        """Refuse settings that cannot run on ``n_rows`` training rows."""
        for name in ("initial", "budget", "rounds", "seeds"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"`{name}` of the simulation must be at least 1; found {getattr(self, name)}.")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ConfigError(f"Unknown strategy {', '.join(unknown) or '(none given)'}; expected some of "
                              f"{', '.join(STRATEGIES)}.")
        needed = self.initial + self.budget * self.rounds
        if needed > n_rows:
            raise ConfigError(f"`initial` + `budget` x `rounds` = {needed} labels, more than the {n_rows} rows of the "
                              "training data. Lower `rounds`, `budget` or `initial`.")
        make_fix(self.fix, self.fix_params)

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = {k: str(v) if k == "device" else v for k, v in d["train"].items()}
        d["strategies"] = list(self.strategies)
        d["fix_params"] = dict(self.fix_params)
        return d


@dataclass(frozen=True)
class SimulationResult:
    """Every curve row (strategy, seed, round order) and the changes of method met (notes)."""

    rows: list[dict[str, Any]]
    notes: list[str]


@dataclass(frozen=True)
class Task:
    """What one process needs to run one chain (or a round 0): all picklable."""

    factory: Callable[[], torch.nn.Module]
    train_data: Any
    val_data: Any
    spec: SimulationSpec
    adapter: AdapterSpec
    out_dir: str
    seed: int
    strategy: str | None = None


def round_seed(seed: int, round_: int) -> int:
    """The training seed of round r for seed s: the same for every strategy."""
    return seed * 1000 + round_


def evaluation_of(adapter: Any, data: Any, *, batch_size: int = 256, device: Any = "auto", seed: int = 0) -> dict[str, Any]:
    """``{"accuracy": a, "unimodal": {m: a_m}}`` on ``data`` (see :func:`mmdiag.train.evaluate`,
    which estimates a ``mean`` or ``noise`` mask's statistics on ``data`` itself)."""
    ev = evaluate(adapter, data, batch_size=batch_size, device=device, seed=seed)
    return {"accuracy": ev["val_accuracy"], "unimodal": {m: ev[f"unimodal_acc.{m}"] for m in adapter.modalities}}


def evaluate_task(task: Task, adapter: Any) -> dict[str, Any]:
    return evaluation_of(adapter, task.val_data, batch_size=task.spec.eval_batch_size,
                         device=task.spec.train.device, seed=task.seed)


def subset(data: Any, rows: Sequence[int]) -> Any:
    """The rows of a dataset (an ArrayDataset stays one, anything else becomes a ``Subset``)."""
    idx = np.asarray(rows, dtype=np.int64)
    if isinstance(data, ArrayDataset):
        return ArrayDataset({m: a[idx] for m, a in data.arrays.items()}, data.labels[idx],
                            {k: a[idx] for k, a in data.extras.items()}, n_classes=data.n_classes, source=data.source)
    return Subset(data, idx.tolist())


def pool_view(data: Any, rows: Sequence[int], modalities: Sequence[str]) -> Any:
    """The unlabelled pool: only the modality arrays of ``rows`` (no label entry at all)."""
    if isinstance(data, ArrayDataset):
        idx = np.asarray(rows, dtype=np.int64)
        return {m: data.arrays[m][idx] for m in modalities}
    return subset(data, rows)


def train_model(task: Task, rows: Sequence[int], round_: int) -> Any:
    """A fresh model from the factory trained on ``rows``; returns its adapter."""
    rs = round_seed(task.seed, round_)
    torch.manual_seed(rs)
    adapter = task.adapter.build(task.factory(), seed=rs)
    fit(adapter, subset(task.train_data, rows), task.spec.train.replace(seed=rs),
        fix=make_fix(task.spec.fix, task.spec.fix_params))
    return adapter


def load_model(task: Task, path: Path) -> Any:
    adapter = task.adapter.build(task.factory(), seed=task.seed)
    adapter.model.load_state_dict(torch.load(path, weights_only=True))
    adapter.model.eval()
    return adapter


def save(path: Path, state: Mapping[str, Any], model: torch.nn.Module) -> None:
    """The model first, then the JSON that says the round is done (so a crash between them redoes it)."""
    write_atomic_with(path.with_suffix(".pt"), lambda tmp: torch.save(model.state_dict(), tmp))
    write_atomic(path.with_suffix(".json"), json.dumps(state) + "\n")


def run_round0(task: Task) -> dict[str, Any]:
    """The initial labelled set and round-0 model of a seed (loaded when already done)."""
    path = Path(task.out_dir) / f"seed{task.seed}" / "round0"
    if path.with_suffix(".json").is_file():
        return json.loads(path.with_suffix(".json").read_text())
    n = len(task.train_data)
    rows = sorted(np.random.default_rng(task.seed).choice(n, task.spec.initial, replace=False).tolist())
    adapter = train_model(task, rows, 0)
    evaluation = evaluate_task(task, adapter)
    state = {"labelled": rows, "evaluation": evaluation}
    save(path, state, adapter.model)
    return state


def run_chain(task: Task, progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """All rounds of one strategy for one seed, resuming after the last finished round; its final
    state (``rows``: the curve rows, ``notes``: changes of method met on the way)."""
    assert task.strategy is not None
    out = Path(task.out_dir)
    path = out / "chains" / f"{task.strategy}-seed{task.seed}"
    if path.with_suffix(".json").is_file():
        state = json.loads(path.with_suffix(".json").read_text())
        model_path = path.with_suffix(".pt")
    else:
        r0 = run_round0(task)
        state = {"round": 0, "labelled": r0["labelled"], "evaluation": r0["evaluation"], "policy": None,
                 "rows": [curve_row(task.strategy, task.seed, 0, len(r0["labelled"]), r0["evaluation"])]}
        model_path = out / f"seed{task.seed}" / "round0.pt"
    adapter = load_model(task, model_path)
    for _ in range(state["round"] if progress is not None else 0):
        progress()  # rounds finished by an earlier run
    for round_ in range(state["round"] + 1, task.spec.rounds + 1):
        adapter, state = _one_round(task, adapter, state, round_)
        save(path, state, adapter.model)
        if progress is not None:
            progress()
    return state


def _one_round(task: Task, adapter: Any, state: dict[str, Any], round_: int) -> tuple[Any, dict[str, Any]]:
    spec = task.spec
    labelled = list(state["labelled"])
    taken = set(labelled)
    rest = [i for i in range(len(task.train_data)) if i not in taken]
    policy = None
    if state["policy"] is not None:
        policy = amcb.from_json(json.dumps(state["policy"]))
    elif task.strategy == "rlmba":
        policy = amcb.new_state(adapter.modalities, spec.policy)
    selection = rank_pool(adapter, pool_view(task.train_data, rest, adapter.modalities), spec.budget,
                          strategy=task.strategy, policy=policy, evaluation=state["evaluation"],
                          seed=round_seed(task.seed, round_), kappa=spec.kappa, device=str(spec.train.device))
    labelled = sorted(labelled + [rest[i] for i in selection.indices])
    adapter = train_model(task, labelled, round_)
    evaluation = evaluate_task(task, adapter)
    rows = state["rows"] + [curve_row(task.strategy, task.seed, round_, len(labelled), evaluation)]  # type: ignore[arg-type]
    saved_policy = json.loads(amcb.to_json(selection.policy)) if selection.policy is not None else None
    notes = sorted(set(state.get("notes", [])) | set(selection.warnings))
    return adapter, {"round": round_, "labelled": labelled, "evaluation": evaluation, "policy": saved_policy,
                     "rows": rows, "notes": notes}


def _worker(task: Task) -> dict[str, Any]:
    torch.set_num_threads(1)  # several chains share the machine's cores
    return run_round0(task) if task.strategy is None else run_chain(task)


def check_out(out_dir: Path, spec: SimulationSpec, resume: bool) -> None:
    """Refuse to mix runs: an ``out_dir`` holding another simulation needs ``resume`` and the same settings."""
    path = out_dir / "simulation.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if not resume:
            raise ConfigError(f"{out_dir} already holds a simulation. Pass `resume` to continue it, or choose "
                              "another output folder.")
        if saved != json.loads(json.dumps(spec.describe())):
            changed = sorted(k for k in saved if saved.get(k) != json.loads(json.dumps(spec.describe())).get(k))
            raise ConfigError(f"{out_dir} holds a simulation with other settings ({', '.join(changed)} differ); "
                              "resume it with the same settings or choose another output folder.")
    write_atomic(path, json.dumps(spec.describe(), indent=2) + "\n")


def simulate(factory: Callable[[], torch.nn.Module], train_data: Any, val_data: Any, spec: SimulationSpec,
             adapter: AdapterSpec, out_dir: str | Path, *, jobs: int = 1, resume: bool = False,
             progress: ProgressFn | None = None) -> SimulationResult:
    """Run the simulation (see the module docstring): every curve row and the notes.

    Args:
        factory: builds a fresh model (picklable, e.g. ``functools.partial``, when ``jobs > 1``).
        train_data, val_data: labelled datasets (the training labels are revealed only when chosen).
        adapter: how to drive the model (modalities must be set).
        jobs: processes running chains in parallel (1: in this process).
        resume: continue the simulation in ``out_dir`` (same settings) after its last finished round.
        progress: ``progress("simulating", done, total)`` after every round of every chain.
    """
    spec.check(len(train_data))
    out = Path(out_dir)
    check_out(out, spec, resume)
    seeds = [spec.seed + k for k in range(spec.seeds)]
    base = Task(factory, train_data, val_data, spec, adapter, str(out), spec.seed)
    zero = [replace(base, seed=s) for s in seeds]
    chains = [replace(base, seed=s, strategy=st) for s in seeds for st in spec.strategies]
    total, done = len(seeds) + len(chains) * spec.rounds, 0

    def tick(k: int = 1) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress("simulating", done, total)

    results: dict[tuple[int, str | None], dict[str, Any]] = {}
    if jobs <= 1:
        for t in zero:
            run_round0(t)
            tick()
        for t in chains:
            results[(t.seed, t.strategy)] = run_chain(t, tick)
        return _gather(chains, results)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for fut in as_completed([pool.submit(_worker, t) for t in zero]):
            fut.result()
            tick()
        futures = {pool.submit(_worker, t): t for t in chains}
        for fut in as_completed(futures):
            results[(futures[fut].seed, futures[fut].strategy)] = fut.result()
            tick(spec.rounds)
    return _gather(chains, results)


def _gather(chains: list[Task], results: Mapping[tuple[int, str | None], dict[str, Any]]) -> SimulationResult:
    """The rows in the serial order (whatever order processes finished in) and the notes, once each."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for t in chains:
        rows += results[(t.seed, t.strategy)]["rows"]
        notes += [n for n in results[(t.seed, t.strategy)].get("notes", []) if n not in notes]
    return SimulationResult(rows, notes)
