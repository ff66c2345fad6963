"""Selective unlearning (METHODS.md §2): scenarios, SURE and the baselines, metrics, the runner."""
