"""Thin adapters of mmdiag's fixes and diagnostics to other training frameworks and to experiment trackers.

Each module imports its framework (an optional dependency) itself; importing this package imports
none of them. ``mmdiag.integrations.lightning`` needs ``pip install mmdiag[lightning]``,
``mmdiag.integrations.hf`` ``pip install mmdiag[hf]``, and ``mmdiag.integrations.trackers`` (TensorBoard,
MLflow, W&B) ``pip install mmdiag[trackers]`` for the tracker it logs to. ``_fixrun`` (a fix inside a
framework's loop) and ``_diagnose`` (the light analysis during training) are shared by the callbacks.
"""
