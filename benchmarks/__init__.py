"""mmdiag's performance harness (run it with ``python benchmarks/run.py`` or ``make bench``)."""
