"""mmdiag: diagnose, fix and gate modality imbalance in multimodal classifiers.

The public API::

    import mmdiag
    report = mmdiag.analyze(model, data)          # data: Dataset, DataLoader or dict of arrays
    print(report.verdict.headline())

Settings that several entry points share travel as specs: ``AdapterSpec`` (how to drive the model),
``AnalysisSpec`` (what to diagnose) and ``TrainSpec`` (the training budget of ``fit`` and ``rebalance``).
"""

import os as _os
import sys as _sys

try:
    from mmdiag._version import __version__
    from mmdiag.adapter import ModelAdapter
    from mmdiag.api import analyze, analyze_evidence, analyze_with
    from mmdiag.collect import CollectSettings, collect
    from mmdiag.diagnostics import DIAGNOSTICS, Diagnostic, register_diagnostic
    from mmdiag.errors import (AdapterError, ConfigError, EvidenceError, GateError, LoadError, MmdiagError,
                               TrainError)
    from mmdiag.evidence import Evidence
    from mmdiag.fixes import FIXES, Fix, FixContext, Step, fix_step, register_fix
    from mmdiag.rebalance import rebalance
    from mmdiag import acquire  # the active-learning API: mmdiag.acquire.rank_pool, mmdiag.acquire.simulate
    from mmdiag.report import Failure, Report, Result, Verdict
    from mmdiag.specs import AdapterSpec, AnalysisSpec, TrainSpec
    from mmdiag.train import History, fit
    from mmdiag.verdict import VerdictThresholds
except KeyboardInterrupt:
    # Ctrl-C while the command line starts (torch and SciPy take a second or two to import) ends as
    # it does inside a command: "interrupted", exit code 130, no traceback; a library import re-raises
    if _os.path.basename(_sys.argv[0] if _sys.argv else "") in ("mmdiag", "-m"):
        _sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    raise

__all__ = [
    "__version__", "analyze", "analyze_evidence", "analyze_with", "AdapterSpec", "AnalysisSpec", "TrainSpec",
    "collect", "CollectSettings", "ModelAdapter", "Evidence",
    "Report", "Result", "Failure", "Verdict", "VerdictThresholds", "Diagnostic", "DIAGNOSTICS",
    "register_diagnostic", "MmdiagError", "ConfigError", "LoadError", "AdapterError", "EvidenceError",
    "GateError", "TrainError", "rebalance", "fit", "History", "Fix", "FixContext", "Step", "fix_step",
    "FIXES", "register_fix", "acquire",
]
