"""Several seeds in one process, and the persistent compilation cache, against one seed (same run).

Three ``dtl-jax run`` commands of the default (or ``--config``), each in a fresh workdir:

1. one seed, with an empty compilation cache (the baseline: what a first run costs);
2. the same seed again in a new workdir, reading the cache that (1) filled: the compile-cache effect
   (target: at most 0.75x of (1));
3. ``--seeds 0-4`` in one process with another empty cache: every compiled step shared by the seeds
   (target: at most 3.5x of (1)).

Reports wall times, the two ratios and each seed's wall time inside (3) (the first seed compiles for
all; the rest is per-seed work), and writes them as JSON (``--json``). Timings on a shared machine
vary; the ratios are measured in one run.

    python benchmarks/seeds.py [--config digits] [--seeds 0-4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from dtl_jax.cli import parse_seeds
from dtl_jax.workdir import seed_dir


def timed(argv: list[str], cache: str) -> float:
    env = {**os.environ, "DTL_JAX_COMPILATION_CACHE": cache}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dtl_jax.cli", *argv, "--quiet"], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = [args.config] if args.config else []
    n = len(parse_seeds(args.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        one = timed(["run", *config, "--workdir", f"{tmp}/one"], f"{tmp}/cache-a")
        again = timed(["run", *config, "--workdir", f"{tmp}/again"], f"{tmp}/cache-a")
        many = timed(["run", *config, "--seeds", args.seeds, "--workdir", f"{tmp}/many"], f"{tmp}/cache-b")
        # each seed's own wall time inside the shared process (the first one compiles for all)
        per_seed = [
            round(json.loads((seed_dir(f"{tmp}/many", seed) / "results.json").read_text())["seconds"], 1)
            for seed in parse_seeds(args.seeds)
        ]
    out = {
        "config": args.config or "default",
        "one_seed_s": round(one, 1),
        "second_run_warm_cache_s": round(again, 1),
        "seeds": args.seeds,
        "many_seeds_s": round(many, 1),
        "warm_cache_ratio": round(again / one, 3),
        "many_seeds_ratio": round(many / one, 3),
        "many_seeds_per_seed_ratio": round(many / one / n, 3),
        "many_seeds_each_s": per_seed,
    }
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
