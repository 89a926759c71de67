"""Per-fix tests and the conformance kit every registered fix passes."""
