"""The metrics logs: a resumed or re-run stage logs each (stage, step) once, in metrics.jsonl and in the
TensorBoard event file; a write that fails raises where it happens."""

import errno
import json
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest

from dtl_jax.checkpoint import Progress
from dtl_jax.train import metrics
from dtl_jax.train.loop import run_steps

pytest.importorskip("tensorboardX")


def _keys(workdir):
    rows = [json.loads(line) for line in (workdir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"]) for r in rows]


def _event_keys(workdir):
    return [(tag, step) for tag, step, _ in metrics.read_events(workdir / "logs" / "tensorboard" / metrics.EVENTS)]


def test_begin_drops_the_stage_rows_after_its_start_and_cut_lines(tmp_path):
    writer = metrics.MetricsWriter(tmp_path)
    writer.write("a", [{"step": s, "loss": float(s)} for s in range(1, 11)])
    writer.write("b", [{"step": s, "loss": -float(s)} for s in range(1, 6)])
    with open(writer.jsonl, "a") as f:
        f.write('{"stage": "a", "st')  # cut by a kill or a full disk
    writer.begin("a", 4)
    assert _keys(tmp_path) == [("a", s) for s in range(1, 5)] + [("b", s) for s in range(1, 6)]
    assert _event_keys(tmp_path) == [("a/loss", s) for s in range(1, 5)] + [("b/loss", s) for s in range(1, 6)]
    writer.write("a", [{"step": 5, "loss": 50.0}])
    assert metrics.read(tmp_path)["a"][-1] == {"step": 5, "loss": 50.0}
    writer.begin("b", 0)  # a stage that starts over (e.g. under another config) keeps nothing of its old rows
    assert ("b", 1) not in _keys(tmp_path) and not any(t.startswith("b/") for t, _ in _event_keys(tmp_path))


def _state():
    return {"w": jnp.zeros(()), "halted": jnp.zeros((), bool), "halted_at": jnp.full((), -1, jnp.int32)}


class Interrupt(Exception):
    pass


def _run(workdir, stop_at=None, num_steps=20):
    """``run_steps`` of a counter with mid-stage checkpoints every 4 steps and logs every 3; an exception
    from inside step ``stop_at`` stands in for Ctrl-C (the rows of steps 9 and after the checkpoint at 8
    are logged by then)."""

    def step(state, x):
        if stop_at is not None and int(x) == stop_at:
            raise Interrupt
        return {**state, "w": state["w"] + x}, {"loss": state["w"] + x}

    progress = Progress(workdir / "progress", every=4)
    try:
        return run_steps(
            step, _state(), ((np.float32(i),) for i in range(1, 100)), num_steps, desc="stage", log_every=3,
            quiet=True, progress=progress, writer=metrics.MetricsWriter(workdir),
        )  # fmt: skip
    finally:
        progress.close()


def test_an_interrupted_then_resumed_stage_logs_every_step_once(tmp_path):
    with pytest.raises(Interrupt):
        _run(tmp_path, stop_at=10)
    assert max(step for _, step in _keys(tmp_path)) == 9  # logged past the newest checkpoint (8)
    state, history, _ = _run(tmp_path)
    assert float(state["w"]) == sum(range(1, 21))  # resumed from step 8, not from scratch
    assert _keys(tmp_path) == [("stage", s) for s in range(1, 21)]
    assert _event_keys(tmp_path) == [("stage/loss", s) for s in range(1, 21)]
    assert [r["loss"] for r in metrics.read(tmp_path)["stage"]] == [float(sum(range(1, s + 1))) for s in range(1, 21)]


def test_a_full_disk_raises_from_the_write_itself(tmp_path, monkeypatch):
    """No background thread swallows or defers the error (tensorboardX's did, then failed again at exit)."""
    writer = metrics.MetricsWriter(tmp_path)
    writer.write("a", [{"step": 1, "loss": 1.0}])
    real_open = open

    def full(path, mode="r", *args, **kwargs):
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(OSError) as err:
        writer.write("a", [{"step": 2, "loss": 2.0}])
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert Counter(_keys(tmp_path)) == Counter({("a", 1): 1})
