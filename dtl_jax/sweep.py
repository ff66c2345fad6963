"""``dtl-jax sweep``: a grid over config keys, e.g. the λ trade-off curve.

``--set key=v1,v2,v3`` on a scalar key sweeps it (the grid is the product of every swept key); other
``--set`` values are fixed. Every point runs in the same workdir, so pre-training and transfer (whose
checkpoint hashes do not depend on the swept disposal keys) run once. Writes ``sweep.json`` (one row a
point: the swept values and every model's metrics), ``sweep.png`` (target and PL accuracy of each
disposal method against the first swept key) and each point's ``results.json`` under ``points/``.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import typing
from pathlib import Path

from dtl_jax import config as config_lib
from dtl_jax import dtl, stages
from dtl_jax.config import Config
from dtl_jax.errors import UserError
from dtl_jax.train.compiled import Compiled
from dtl_jax.workdir import write_json


def _is_tuple_key(config: Config, key: str) -> bool:
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = getattr(node, part, None)
        if not dataclasses.is_dataclass(node):
            return False
    hints = typing.get_type_hints(type(node)) if dataclasses.is_dataclass(node) else {}
    return typing.get_origin(hints.get(parts[-1])) is tuple


def grid(config: Config, assignments: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Splits ``--set`` assignments into fixed ones and swept ``(key, values)``."""
    fixed, swept = [], []
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if sep and "," in value and not _is_tuple_key(config, key.strip()):
            swept.append((key.strip(), [v.strip() for v in value.split(",") if v.strip()]))
        else:
            fixed.append(assignment)
    return fixed, swept


METRICS = ("target_acc", "source_acc", "pl_acc", "mia_acc")


def run(
    config: Config, assignments: list[str], workdir, *, quiet: bool = False, seeds: list[int] | None = None
) -> dict:
    """Runs every point of the grid (each over ``seeds`` when given: then a point's metrics are means
    over the seeds, with their 95 % intervals in ``ci95``); writes and returns ``sweep.json``."""
    fixed, swept = grid(config, assignments)
    if not swept:
        raise UserError("sweep: no key to sweep: give one as --set key=v1,v2,... (e.g. disposal.gc_lambda=0.01,0.1,1)")
    workdir = Path(workdir)
    base = config_lib.apply_overrides(config, fixed)
    points = []
    combos = list(itertools.product(*[values for _, values in swept]))
    for combo in combos:  # validate every point before running any
        stages.check(config_lib.apply_overrides(base, [f"{k}={v}" for (k, _), v in zip(swept, combo)]))
    compiled = Compiled()  # every point and seed shares the compiled steps (λ is an argument of them)
    for combo in combos:
        overrides = [f"{k}={v}" for (k, _), v in zip(swept, combo)]
        point_config = config_lib.apply_overrides(base, overrides)
        name = "_".join(f"{k}={v}" for (k, _), v in zip(swept, combo)).replace("/", "-")
        (workdir / "points" / name).mkdir(parents=True, exist_ok=True)
        point = {"values": dict(zip([k for k, _ in swept], combo))}
        if seeds is None:
            results = dtl.run(point_config, workdir, quiet=quiet, overwrite=True, compiled=compiled)
            shutil.copy(workdir / "results.json", workdir / "points" / name / "results.json")
            point["models"] = {m: {k: row[k] for k in METRICS} for m, row in results["models"].items()}
        else:
            summary = dtl.run_seeds(point_config, seeds, workdir, quiet=quiet, overwrite=True, compiled=compiled)
            shutil.copy(workdir / "summary.json", workdir / "points" / name / "summary.json")
            rows = summary["rows"]
            point["models"] = {m: {k: row[k]["mean"] for k in METRICS} for m, row in rows.items()}
            point["ci95"] = {m: {k: row[k]["ci95"] for k in METRICS} for m, row in rows.items()}
        points.append(point)
    summary = {"swept": [k for k, _ in swept], "fixed": fixed, "seeds": seeds, "points": points}
    write_json(workdir / "sweep.json", summary)
    plot(summary, workdir / "sweep.png")
    return summary


def plot(summary: dict, path: Path) -> Path:
    from dtl_jax.report import colours, plt

    key = summary["swept"][0]
    xs = [p["values"][key] for p in summary["points"]]
    try:
        numeric = [float(x) for x in xs]
    except ValueError:
        numeric = list(range(len(xs)))
    methods = [m for m in summary["points"][0]["models"] if m not in ("random_init", "tl")]
    palette = colours(summary["points"][0]["models"])  # the report's colours
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0), sharex=True)
    for ax, metric in zip(axes, ("target_acc", "pl_acc")):
        for method in methods:
            ys = [p["models"][method][metric] for p in summary["points"]]
            errors = [p["ci95"][method][metric] for p in summary["points"]] if "ci95" in summary["points"][0] else None
            ax.errorbar(numeric, ys, yerr=errors, fmt="o-", capsize=3, label=method, color=palette[method])
        for ref, style in (("tl", "--"), ("random_init", ":")):
            ax.axhline(summary["points"][0]["models"][ref][metric], linestyle=style, color="gray", label=ref)
        ax.set(xlabel=key, ylabel=metric, title=f"{metric} against {key}")
        if all(v > 0 for v in numeric) and max(numeric) / min(numeric) >= 100:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(summary: dict) -> str:
    methods = [m for m in summary["points"][0]["models"]]
    keys = summary["swept"]
    header = "".join(f"{k:>22} " for k in keys) + "".join(f"{m + ' target/PL':>22}" for m in methods)
    lines = [header, "-" * len(header)]
    for p in summary["points"]:
        cells = "".join(f"{p['values'][k]:>22} " for k in keys)
        cells += "".join(f"{p['models'][m]['target_acc']:>15.3f}/{p['models'][m]['pl_acc']:<6.3f}" for m in methods)
        lines.append(cells)
    return "\n".join(lines)
