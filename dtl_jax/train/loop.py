"""The one training loop: steps with a progress bar, periodic host-side checks, divergence stop."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from dtl_jax import runtime
from dtl_jax.checkpoint import Progress
from dtl_jax.train.mesh import place_like
from dtl_jax.train.metrics import MetricsWriter


class Bookkeeping:
    """What a stage's ``on_check`` accumulates on the host, saved with mid-stage checkpoints:
    ``dump() -> (json_dict, array_tree)`` and ``load(json_dict, array_tree)``. The default keeps nothing."""

    def dump(self) -> tuple[dict, Any]:
        return {}, {}

    def load(self, data: dict, arrays: Any) -> None:
        pass


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
    progress: Progress | None = None,
    bookkeeping: Bookkeeping | None = None,
    writer: MetricsWriter | None = None,
    place: Callable | None = None,
) -> tuple[dict, list[dict], int | None]:
    """Runs ``num_steps`` of ``state, metrics = step(state, *next(batches))``.

    Every ``every`` steps (and after the last) ``on_check(state, steps_done)`` runs on the host; it
    returns True to stop early. Metrics are fetched every ``log_every`` steps (one host sync) into the
    returned history. Returns ``(state, history, halted_at)`` where ``halted_at`` is the step at which
    the divergence guard stopped the stage (``None`` if it did not).

    With ``progress``, the state, the history, ``bookkeeping`` and the position in ``batches`` are saved
    every ``progress.every`` steps; a later call with the same arguments resumes from the newest such
    checkpoint, replaying ``batches`` to the saved position (the streams are seeded, so the resumed run
    sees the same batches as an uninterrupted one and ends with the same state); the restored state is
    placed where ``state`` was (``mesh.place_like``).

    ``writer`` (a ``MetricsWriter``) receives the fetched metrics under the stage name ``desc``; the rows it
    holds of ``desc`` after the step the stage starts from are dropped first (``MetricsWriter.begin``).
    ``place(*batch)`` (e.g. sharding onto a device mesh) is applied to each batch just before its step,
    so that replaying the stream on resume moves nothing to the devices.
    """
    history: list[dict] = []
    bookkeeping = bookkeeping or Bookkeeping()
    start = 0
    if progress is not None:
        restored = progress.restore({"state": state, "book": bookkeeping.dump()[1]})
        if restored is not None:
            tree, extra = restored
            state, start, history = place_like(tree["state"], state), extra["done"], extra["history"]
            progress.resumed_from = start
            bookkeeping.load(extra["book"], tree["book"])
            for _ in range(start):
                next(batches)
    if hasattr(writer, "begin"):  # a resumed (or re-run) stage drops what it logged after ``start``
        writer.begin(desc, start)
    bar = tqdm(  # disable=None: bars on a terminal only (a log file or a pipe gets no bar lines)
        total=num_steps, initial=start, desc=desc, disable=True if quiet else None, file=sys.stderr, leave=True,
        dynamic_ncols=True,
    )  # fmt: skip
    pending: list[tuple[int, dict]] = []

    def flush() -> bool:
        rows = jax.device_get(pending)
        pending.clear()
        new = [{"step": i, **{k: float(np.asarray(v)) for k, v in metrics.items()}} for i, metrics in rows]
        history.extend(new)
        if writer is not None:
            writer.write(desc, new)
        if history:
            bar.set_postfix(loss=f"{history[-1]['loss']:.4g}", refresh=False)
        return bool(jax.device_get(state["halted"]))

    halted = bool(jax.device_get(state["halted"])) if start else False
    for done in range(start + 1, num_steps + 1):
        if halted:
            break
        runtime.check_interrupt()  # Ctrl-C whose KeyboardInterrupt Python dropped (runtime: "Interrupts")
        batch = next(batches)
        state, metrics = step(state, *(place(*batch) if place is not None else batch))
        if (profiler := runtime.profiler()) is not None:  # --profile: a few steps of each stage
            profiler.after_step(desc, done, state, last=done == num_steps)
        pending.append((done, metrics))
        bar.update(1)
        if done % log_every == 0 or done == num_steps:
            halted = flush()
        if halted:
            break
        if on_check is not None and ((every and done % every == 0) or done == num_steps):
            if on_check(state, done):
                break
        if progress is not None and progress.every and done % progress.every == 0 and done < num_steps:
            halted = flush()
            book, arrays = bookkeeping.dump()
            progress.save(done, {"state": state, "book": arrays}, {"done": done, "history": history, "book": book})
    if pending:
        halted = flush()
    if (profiler := runtime.profiler()) is not None:
        profiler.close()  # a stage that stopped before its traced steps were done
    bar.close()
    halted_at = int(jax.device_get(state["halted_at"])) if halted else None
    return state, history, halted_at
