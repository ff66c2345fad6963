"""Selective unlearning (docs/methods.md §2): scenarios, SURE and the baselines, metrics, the runner."""
