"""Demo and test fixtures kept apart from the core: AV-digits, its demo model, synthetic toys.

Nothing in the library's core imports these modules except the ``mmdiag demo`` command.
"""
