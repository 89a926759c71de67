"""acquire: modality-balanced, difficulty-aware active learning (RL-MBA, PROPOSED) and its baselines.

* :func:`rank_pool` (:mod:`~mmdiag.acquire.select`): one pass over an unlabelled pool, then a
  strategy picks the rows to label: ``rlmba``, ``bmmal``, ``badge``, ``entropy`` or ``random``
  (:mod:`~mmdiag.acquire.strategies`).
* :func:`simulate` (:mod:`~mmdiag.acquire.simulate`): the learning-curve simulation that compares them.

The pieces: :mod:`~mmdiag.acquire.pool` (the pass), :mod:`~mmdiag.acquire.evidence` (EFDA difficulty,
per-sample Shapley shares), :mod:`~mmdiag.acquire.embeddings` (per-modality gradient embeddings),
:mod:`~mmdiag.acquire.diversity` (k-means++ seeding), :mod:`~mmdiag.acquire.policy` (AMCB) and
:mod:`~mmdiag.acquire.curves` (curve rows and areas). See ``docs/acquire.md``.
"""

from mmdiag.acquire.curves import area, summary
from mmdiag.acquire.policy import PolicySettings, PolicyState, from_json, new_state, to_json
from mmdiag.acquire.pool import PoolPass, pool_pass
from mmdiag.acquire.select import Selection, rank_pool
from mmdiag.acquire.simulate import SimulationResult, SimulationSpec, simulate
from mmdiag.acquire.strategies import STRATEGIES

__all__ = ["STRATEGIES", "PolicySettings", "PolicyState", "PoolPass", "Selection", "SimulationResult", "SimulationSpec", "area",
           "from_json", "new_state", "pool_pass", "rank_pool", "simulate", "summary", "to_json"]
