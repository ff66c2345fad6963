"""Command-line argument types shared by the benchmark scripts."""

from __future__ import annotations

import argparse


def positive_ints(text: str) -> tuple[int, ...]:
    """``"16,32,64"`` -> ``(16, 32, 64)``; anything else is argparse's one-line error (exit code 2)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers separated by commas, e.g. 16,32,64")
    return values
