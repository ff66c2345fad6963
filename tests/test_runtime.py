"""Run-level settings (dtl_jax/runtime.py): deterministic XLA flags, step profiling, and their record in
results.json; with the bfloat16 compute dtype in one end-to-end run."""

import json
import os
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
