"""The model zoo: end-to-end CLI checks of mmdiag on real-world model shapes (see test_zoo.py)."""
