"""Results over seeds (docs/methods.md §3): means with 95 % Student-t intervals, and paired differences.

A claim is a statement about the distribution over seeds. For every row (a model of ``dtl-jax run``, a
method of ``dtl-jax unlearn``) and every scalar metric, ``describe`` gives::

    {"mean", "std" (n - 1 in the denominator), "ci95" (half-width: t_{0.975, n-1} · std / sqrt(n)),
     "n", "values"}

and ``paired`` the same for the per-seed difference ``row − reference`` (same seed). A seed on which a
metric is missing (a diverged method's metrics) is left out of that metric's figures; ``n`` says how
many seeds remain. With ``n = 1`` the interval is undefined (NaN).

>>> s = describe([0.5, 0.7, 0.6])
>>> round(s["mean"], 6), round(s["std"], 6), round(s["ci95"], 4), s["n"]
(0.6, 0.1, 0.2484, 3)
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def describe(values) -> dict:
    """Mean, sample standard deviation, 95 % CI half-width (Student t, n − 1 dof), n and the values."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(kept)
    mean = float(np.mean(kept)) if n else float("nan")
    std = float(np.std(kept, ddof=1)) if n > 1 else float("nan")
    ci95 = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "mean": mean,
        "std": std,
        "ci95": ci95,
        "n": n,
        "values": [float(v) if v is not None else None for v in values],
    }


def _scalar_metrics(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in keys and (value is None or (isinstance(value, int | float) and not isinstance(value, bool))):
                keys.append(key)
    return keys


def summarize(per_seed: dict[int, dict[str, dict]], references: tuple[str, ...]) -> dict:
    """``per_seed[seed][row][metric]`` → ``{"seeds", "rows": {row: {metric: describe}}, "paired":
    {reference: {row: {metric: describe of row − reference}}}}``. Rows absent on a seed count as
    missing there."""
    seeds = sorted(per_seed)
    names: list[str] = []
    for seed in seeds:
        names += [name for name in per_seed[seed] if name not in names]
    rows_out, paired = {}, {}
    for name in names:
        rows = [per_seed[s].get(name, {}) for s in seeds]
        rows_out[name] = {key: describe([r.get(key) for r in rows]) for key in _scalar_metrics(rows)}
    for reference in references:
        if reference not in names:
            continue
        paired[reference] = {}
        for name in names:
            if name == reference:
                continue
            rows = [(per_seed[s].get(name, {}), per_seed[s].get(reference, {})) for s in seeds]
            keys = _scalar_metrics([r for r, _ in rows])
            paired[reference][name] = {
                key: describe([_difference(row.get(key), ref.get(key)) for row, ref in rows]) for key in keys
            }
    return {"seeds": seeds, "rows": rows_out, "paired": paired}


def _difference(a, b):
    if a is None or b is None:
        return None
    return float(a) - float(b)


def mean_ci(entry: dict, digits: int = 3) -> str:
    """``"0.512 ± 0.021"`` (or the mean alone when the interval is undefined)."""
    if entry["n"] == 0:
        return "-"
    if math.isnan(entry["ci95"]):
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['ci95']:.{digits}f}"


def shown(entry: dict) -> str:
    """Whether a paired difference's interval excludes 0: "shown" (an effect), or "not shown"."""
    if entry["n"] < 2 or math.isnan(entry["ci95"]):
        return "not shown (n < 2)"
    low, high = entry["mean"] - entry["ci95"], entry["mean"] + entry["ci95"]
    return "shown" if low > 0 or high < 0 else "not shown (interval contains 0)"


def format_table(
    rows: dict[str, dict], columns: tuple[tuple[str, str], ...], label: str, *, label_width: int = 16,
    width: int = 16, seeds: list[int] | None = None,
) -> str:  # fmt: skip
    """The one results table: a row per model or method, a column per ``(metric key, title)``. A cell is a
    number (``0.512``), a summary entry (``describe``: ``0.512 ± 0.021``, the mean ± 95 % CI) or ``-``
    (``None`` or missing). With ``seeds``, a first line says which seeds the intervals are over."""

    def cell(value) -> str:
        if value is None:
            return "-"
        return mean_ci(value) if isinstance(value, dict) else f"{value:.3f}"

    header = f"{label:<{label_width}}" + "".join(f"{title:>{width}}" for _, title in columns)
    lines = [header, "-" * len(header)]
    if seeds is not None:
        lines.insert(0, f"mean ± 95 % CI over seeds {seeds}")
    for name, metrics in rows.items():
        lines.append(f"{name:<{label_width}}" + "".join(f"{cell(metrics.get(k)):>{width}}" for k, _ in columns))
    return "\n".join(lines)
