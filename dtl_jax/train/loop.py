"""The one training loop: steps with a progress bar, periodic host-side checks, divergence stop."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm


def run_steps(
    step: Callable,
    state: dict,
    batches: Iterator[tuple],
    num_steps: int,
    *,
    desc: str,
    every: int = 0,
    on_check: Callable[[dict, int], bool] | None = None,
    log_every: int = 10,
    quiet: bool = False,
) -> tuple[dict, list[dict], int | None]:
    """Runs ``num_steps`` of ``state, metrics = step(state, *next(batches))``.

    Every ``every`` steps (and after the last) ``on_check(state, steps_done)`` runs on the host; it
    returns True to stop early. Metrics are fetched every ``log_every`` steps (one host sync) into the
    returned history. Returns ``(state, history, halted_at)`` where ``halted_at`` is the step at which
    the divergence guard stopped the stage (``None`` if it did not).
    """
    history: list[dict] = []
    bar = tqdm(total=num_steps, desc=desc, disable=quiet, file=sys.stderr, leave=True, dynamic_ncols=True)
    pending: list[tuple[int, dict]] = []

    def flush() -> bool:
        rows = jax.device_get(pending)
        pending.clear()
        for i, metrics in rows:
            history.append({"step": i, **{k: float(np.asarray(v)) for k, v in metrics.items()}})
        if history:
            bar.set_postfix(loss=f"{history[-1]['loss']:.4g}", refresh=False)
        return bool(jax.device_get(state["halted"]))

    done = 0
    halted = False
    for done in range(1, num_steps + 1):
        state, metrics = step(state, *next(batches))
        pending.append((done, metrics))
        bar.update(1)
        if done % log_every == 0 or done == num_steps:
            halted = flush()
        if halted:
            break
        if on_check is not None and ((every and done % every == 0) or done == num_steps):
            if on_check(state, done):
                break
    if pending:
        halted = flush()
    bar.close()
    halted_at = int(jax.device_get(state["halted_at"])) if halted else None
    return state, history, halted_at
