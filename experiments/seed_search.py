"""The default-config search over seeds (docs/methods.md §3), validation metrics only.

For every setting of a small grid, GC disposal runs on the tuning seeds (default 0-4) through
``dtl.run_seeds`` in one workdir, so pre-training, transfer, TL and random-init PL are computed once per
seed and shared by every setting (stage keys). Per seed it records, from validation splits only:

- ``pl_val_cut``: PL accuracy of the TL model minus that of the GC model, both measured on the source
  **validation** split after piggyback learning (mean over the attacker's draws);
- ``target_val_drop``: the TL model's held-out target accuracy minus the GC model's (the returned state).

The objective is the mean ``pl_val_cut`` over the tuning seeds among settings whose mean
``target_val_drop`` is at most 0.03. Test accuracies are never read. Writes one JSON line a setting to
``LOG`` and prints a table; the chosen setting is then reported on fresh seeds (``dtl-jax run --seeds
100-104``).

    python experiments/seed_search.py WORKDIR [--seeds 0-4] [--set key=v1,v2 ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np

from dtl_jax import cli, dtl
from dtl_jax import config as C
from dtl_jax.summary import describe, mean_ci
from dtl_jax.train.compiled import Compiled
from dtl_jax.workdir import seed_dir

GRID = {"disposal.gc_lambda": ["0.001", "0.003", "0.01", "0.03", "0.1"]}
MAX_TARGET_DROP = 0.03


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--set", dest="grid", action="append", default=[], help="key=v1,v2 (replaces GRID)")
    parser.add_argument("--fixed", action="append", default=[], help="key=value applied to every setting")
    args = parser.parse_args()
    seeds = cli.parse_seeds(args.seeds)
    grid = dict(g.split("=", 1) for g in args.grid) if args.grid else {k: ",".join(v) for k, v in GRID.items()}
    grid = {k: v.split(",") for k, v in grid.items()}
    base = C.apply_overrides(C.Config(), ["disposal.methods=gc", *args.fixed])
    compiled = Compiled()
    log = os.environ.get("LOG", os.path.join(args.workdir, "seed-search.jsonl"))
    rows = []
    for values in itertools.product(*grid.values()):
        overrides = [f"{k}={v}" for k, v in zip(grid, values)]
        config = C.validate(C.apply_overrides(base, overrides))
        start = time.time()
        dtl.run_seeds(config, seeds, args.workdir, quiet=True, overwrite=True, compiled=compiled)
        cut, drop = [], []
        for seed in seeds:
            models = json.loads((seed_dir(args.workdir, seed) / "results.json").read_text())["models"]
            cut.append(models["tl"]["pl_val_acc"] - models["gc"]["pl_val_acc"])
            drop.append(models["tl"]["target_val_acc"] - models["gc"]["target_val_acc"])
        row = {"overrides": overrides, "seeds": seeds, "pl_val_cut": describe(cut), "target_val_drop": describe(drop)}
        row["seconds"] = round(time.time() - start, 1)
        rows.append(row)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{' '.join(overrides):<40} PL-val cut {mean_ci(row['pl_val_cut'])}  "
              f"target-val drop {mean_ci(row['target_val_drop'])}  ({row['seconds']} s)", flush=True)  # fmt: skip
    allowed = [r for r in rows if r["target_val_drop"]["mean"] <= MAX_TARGET_DROP] or rows
    best = max(allowed, key=lambda r: r["pl_val_cut"]["mean"])
    print(
        "chosen:", " ".join(best["overrides"]), "mean PL-val cut", round(float(np.mean(best["pl_val_cut"]["mean"])), 4)
    )


if __name__ == "__main__":
    main()
