"""What ``dtl-jax run`` and ``dtl-jax unlearn`` share: several seeds in one process (``run_seeds``) and a
stage's entry in ``results.json`` (``stage_record``)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

from dtl_jax.config import Config, to_dict, validate
from dtl_jax.summary import summarize
from dtl_jax.train.compiled import Compiled
from dtl_jax.workdir import seed_dir, write_json


def stage_record(halted_at: int | None, devices: int) -> dict:
    """A stage's entry in ``results["stages"]``: the divergence guard's record (a halted stage kept its last
    good state: ``diverged``, ``halted_at``) and where it ran: ``devices``, and ``processes`` (every process
    of the job when it used every device, else 1)."""
    import jax

    processes = jax.process_count() if devices == jax.device_count() else 1
    return {"diverged": halted_at is not None, "halted_at": halted_at, "devices": devices, "processes": processes}


def run_seeds(
    run: Callable[..., dict],
    config: Config,
    seeds: list[int],
    workdir: str | os.PathLike,
    *,
    rows: Callable[[dict], dict[str, dict]],
    references: tuple[str, ...],
    kind: str,
    quiet: bool = False,
    overwrite: bool = False,
    compiled: Compiled | None = None,
) -> dict:
    """``run(config with seed s, workdir/seed-<s>, quiet=, overwrite=, compiled=)`` for every seed of
    ``seeds`` in this process (the jitted functions shared through ``compiled``), each seed's workdir exactly
    as a single run writes it; then writes and returns ``workdir/summary.json`` (``summary.summarize`` of
    ``rows(results)``, each row's metrics over the seeds and the paired differences to ``references``, with
    ``kind``, the first seed's config and the seconds taken)."""
    config = validate(config)
    compiled = compiled or Compiled()
    start = time.perf_counter()
    per_seed = {}
    for seed in seeds:
        one = dataclasses.replace(config, seed=seed)
        results = run(one, seed_dir(workdir, seed), quiet=quiet, overwrite=overwrite, compiled=compiled)
        per_seed[seed] = rows(results)
    summary = summarize(per_seed, references)
    summary.update(
        kind=kind, config=to_dict(dataclasses.replace(config, seed=seeds[0])), seconds=time.perf_counter() - start
    )
    os.makedirs(workdir, exist_ok=True)
    write_json(Path(workdir) / "summary.json", summary)
    return summary
