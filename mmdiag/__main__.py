"""``python -m mmdiag``."""

from mmdiag.cli.app import main

main()
