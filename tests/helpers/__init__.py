"""Shared test helpers: toy data and models (``toys``), the fix test kit (``fixkit``), hand-built
evidence (``fake``) and the in-process CLI runner (``cli_run``). Import them as ``tests.helpers.<module>``."""
