"""Run-level settings (dtl_jax/runtime.py): deterministic XLA flags, step profiling, and their record in
results.json; with the bfloat16 compute dtype in one end-to-end run; Ctrl-C that Python drops."""

import gc
import json
import os
import signal
import subprocess
import sys

import pytest

from dtl_jax import runtime


def test_deterministic_flags_after_the_backend_started(monkeypatch):
    import jax

    jax.devices()
    monkeypatch.setenv("XLA_FLAGS", "")
    assert runtime.set_deterministic() is False  # too late for this process
    assert os.environ["XLA_FLAGS"] == ""
    monkeypatch.setenv("XLA_FLAGS", " ".join(runtime.DETERMINISTIC_FLAGS))
    assert runtime.set_deterministic() is True  # already in force
    record = runtime.determinism_record(True)
    assert record["flags_set"] and record["platform"] == "cpu" and "deterministic already" in record["note"]


def test_deterministic_flags_before_the_backend_starts():
    code = (
        "import os; from dtl_jax import runtime; ok = runtime.set_deterministic(); "
        "import jax; jax.numpy.ones(3).sum().block_until_ready(); print(ok, os.environ['XLA_FLAGS'])"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_enable_fast_min_max=false"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr  # XLA accepts the flags on a CPU
    ok, flags = done.stdout.split(" ", 1)
    assert ok == "True" and all(f in flags for f in runtime.DETERMINISTIC_FLAGS)
    assert flags.startswith("--xla_cpu_enable_fast_min_max=false")


def test_profiler_traces_each_stage_once(tmp_path):
    import jax.numpy as jnp

    profiler = runtime.StepProfiler(tmp_path, warmup=1, steps=1)
    for stage in ("pretrain", "piggyback tl 10-shot #0", "piggyback gc 10-shot #1"):
        for done in range(1, 4):
            profiler.after_step(stage, done, jnp.ones(2) * done, last=done == 3)
    profiler.close()
    assert profiler.traced == ["pretrain", "piggyback"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["piggyback", "pretrain"]
    assert len(list(tmp_path.rglob("*.xplane.pb"))) == 2


@pytest.mark.slow
def test_digits_run_deterministic_profiled_bfloat16(tmp_path):
    """`dtl-jax run configs/digits.py --deterministic --profile DIR --set model.dtype=bfloat16` finishes and
    results.json records all three; a trace file is left under DIR for each traced stage."""
    workdir, traces = tmp_path / "w", tmp_path / "prof"
    argv = ["run", "digits", "--workdir", str(workdir), "--quiet", "--deterministic",
            "--profile", str(traces), "--set", "model.dtype=bfloat16"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "dtl_jax.cli", *argv], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["runtime"]["compute_dtype"] == "bfloat16"
    assert results["runtime"]["deterministic"]["requested"] and results["runtime"]["deterministic"]["flags_set"]
    assert results["runtime"]["profile"] == str(traces)
    assert results["config"]["model"]["dtype"] == "bfloat16"
    stages = {p.parent.parent.parent.parent.name for p in traces.rglob("*.xplane.pb")}
    assert {"pretrain", "transfer", "disposal-gc", "piggyback"} <= stages
    assert list(traces.rglob("*.trace.json.gz"))  # for Perfetto


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt itself
def test_ctrl_c_dropped_in_a_gc_callback_still_stops_the_next_step():
    """Ctrl-C while JAX's garbage-collector callback runs: Python prints "Exception ignored" and drops the
    KeyboardInterrupt (seen as a Ctrl-C'd ``dtl-jax run`` finishing with exit code 0). With
    ``catch_interrupts`` the next training step raises it."""
    import numpy as np

    from dtl_jax.train.loop import run_steps

    previous = signal.getsignal(signal.SIGINT)
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the callback
            sum(range(100))

    def steps():
        state = {"w": np.float32(0.0), "halted": np.bool_(False), "halted_at": np.int32(0)}
        step = lambda s, x: ({**s, "w": s["w"] + x}, {"loss": s["w"]})  # noqa: E731
        return run_steps(step, state, ((np.float32(i),) for i in range(100)), 5, desc="stage", quiet=True)

    try:
        runtime.catch_interrupts()
        assert steps()[0]["w"] == 10.0  # nothing pending: all five steps run
        gc.callbacks.append(callback)
        try:
            gc.collect()  # raises nothing: the interrupt was dropped inside the callback
        finally:
            gc.callbacks.remove(callback)
        assert fired
        with pytest.raises(KeyboardInterrupt):
            steps()
        runtime.catch_interrupts()  # a new run forgets it
        assert steps()[0]["w"] == 10.0
    finally:
        signal.signal(signal.SIGINT, previous)
        runtime._interrupted = False


def test_ctrl_c_during_a_checkpoint_write_waits_for_it(tmp_path, monkeypatch):
    """SIGINT in the middle of ``checkpoint.save`` (raised from inside orbax's save): the checkpoint is
    written whole (``meta.json``, the mark of a finished one, is there and restores), then
    ``KeyboardInterrupt``. Before, orbax's threads were left waiting on each other and the process hung at
    exit."""
    import numpy as np
    import orbax.checkpoint as ocp

    from dtl_jax import checkpoint

    original = ocp.StandardCheckpointer.save

    def interrupted_save(self, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        sum(range(100))  # where the interrupt would be raised, were it not held
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", interrupted_save)
    previous = signal.getsignal(signal.SIGINT)
    try:
        runtime.catch_interrupts()
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(tmp_path / "stage", {"w": np.arange(3.0)}, {"step": 7})
        assert runtime._interrupted  # remembered for the next training step too
    finally:
        signal.signal(signal.SIGINT, previous)
        runtime._interrupted = False
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", original)
    tree, meta = checkpoint.restore(tmp_path / "stage", {"w": np.zeros(3)})
    assert meta == {"step": 7} and np.array_equal(tree["w"], np.arange(3.0))
    with runtime.deferred_interrupts():  # nothing held: nothing raised
        pass
