"""Thin adapters of mmdiag's fixes and diagnostics to other training frameworks.

Each module imports its framework (an optional dependency) itself; importing this package imports
none of them. ``mmdiag.integrations.lightning`` needs ``pip install mmdiag[lightning]``.
"""
