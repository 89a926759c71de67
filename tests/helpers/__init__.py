"""Shared test helpers: toy data and models (``toys``), the fix test kit (``fixkit``), hand-built
evidence (``fake``), the in-process CLI runner (``cli_run``) and two-process set-up (``dist``). Import them as ``tests.helpers.<module>``."""
