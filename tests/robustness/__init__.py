"""Robustness: bad inputs, fuzzing, kill and resume, loud errors, trust and atomic writes."""
