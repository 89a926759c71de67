"""rebalance: retrain a multimodal classifier with the fix that matches its diagnosis, and compare.

``rebalance(factory, train_data, val_data=..., checkpoint=..., fix="auto", baseline=True,
train=TrainSpec(...), adapter=AdapterSpec(...), analysis=AnalysisSpec(...))``; the specs (see
:mod:`mmdiag.specs`) carry the training budget, how to drive the model and what the analyses compute.

1. analyzes the trained model (``factory()`` + ``checkpoint``) on the validation data: the
   *before* report;
2. picks the fix: a registered name, or ``auto``, the ``recommended_fix`` of the before report's
   verdict (of the baseline's when there is no checkpoint), falling back to ``ogm_ge`` when the
   verdict recommends none or names a fix that is not registered (said in ``choice``);
3. trains the model with that fix with :func:`mmdiag.train.fit` (``init="scratch"``: a fresh model
   from the factory under ``torch.manual_seed(train.seed)``; ``"checkpoint"``: fine-tune from it), and
   with ``baseline=True`` also plain training (fix ``none``) under the same budget, seed and init;
4. analyzes the results on the validation data (*after*, *baseline*) and compares every headline
   and per-modality value with the differences and whether the bootstrap intervals separate.

Under torchrun every rank trains and takes part in the analyses (``collect`` shards the rows);
only rank 0 writes. With ``out_dir`` it writes::

    model.safetensors   the rebalanced weights, the user's own state_dict keys
    aux.pt              auxiliary modules a fix added (only when there are any)
    restore.safetensors, restore.json   the translator of the restore fix (mmdiag.deploy.load_restoration)
    history.csv         per-epoch loss, validation and unimodal accuracy, fix signals
    checkpoint.pt       the resumable training state (baseline/checkpoint.pt for the baseline)
    fix.json            the fix used, its parameters, and for auto the recommendation and reasons
    before/ after/ baseline/   report.json + metrics.csv of each analysis
    comparison.json, comparison.csv

The package: :mod:`~mmdiag.rebalance.run` (the run), :mod:`~mmdiag.rebalance.choice` (which fix, with
which parameters) and :mod:`~mmdiag.rebalance.result` (what is returned and written).

Several fixes: :func:`leaderboard` trains a list of fixes (or all) and the plain baseline under one
budget and ranks them (:mod:`~mmdiag.rebalance.board_run`, :mod:`~mmdiag.rebalance.board_table`,
:mod:`~mmdiag.rebalance.scoring`); :func:`race` picks one by successive halving on held-out training
rows and runs it as above (:mod:`~mmdiag.rebalance.race_run`, :mod:`~mmdiag.rebalance.halving`); both
train each candidate in its own folder (:mod:`~mmdiag.rebalance.candidate`,
:mod:`~mmdiag.rebalance.candidates`, :mod:`~mmdiag.rebalance.pool`). Nothing here
prints or parses config files; the command line lives in ``mmdiag.cli.rebalance_cmd``.
"""

from mmdiag.rebalance.choice import FALLBACK_FIX, choose_fix, make_fix, parse_param_value
from mmdiag.rebalance.result import RebalanceResult
from mmdiag.rebalance.run import DEFAULT_TRAINING, INITS, PhaseFn, rebalance
from mmdiag.rebalance.board_run import leaderboard
from mmdiag.rebalance.race_run import race

__all__ = ["DEFAULT_TRAINING", "FALLBACK_FIX", "INITS", "PhaseFn", "RebalanceResult", "choose_fix", "make_fix",
           "leaderboard", "parse_param_value", "race", "rebalance"]
