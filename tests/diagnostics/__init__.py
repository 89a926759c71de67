"""Per-diagnostic tests: a slow reference implementation, edge cases and a direction check each."""
