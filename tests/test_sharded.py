"""The sharded disposal step (jax.shard_map over 4 CPU devices) against the single-device step.

JAX fixes its device count when it starts, so the comparison runs in a subprocess started with
``JAX_NUM_CPU_DEVICES=4`` (tests/sharded_check.py).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return str(s.getsockname()[1])


def _two_processes(command, env) -> None:
    """Runs ``command(0)`` and ``command(1)`` together (a 2-process job) and checks both succeed."""
    procs = [
        subprocess.Popen(command(i), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [log[-2000:] for log in logs]


@pytest.fixture(scope="module")
def report():
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharded_check.py"), "1"], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["gc", "ngc", "rtf", "gc_low_memory", "ngc_low_memory"])
def test_four_devices_equal_one(report, method):
    """``*_low_memory``: the low-memory GC path on 4 devices against the default path on one."""
    assert report[f"{method}_unlearn_rel"] <= 1e-5  # the GC / NGC / RTF value
    assert report[f"{method}_param_rel"] <= 1e-5  # the updated parameters


@pytest.mark.parametrize("method", ["gc", "ngc", "gc_low_memory", "ngc_low_memory"])
def test_exactly_two_parameter_size_all_reduces(report, method):
    sizes = report[f"{method}_all_reduces"]
    big = [s for s in sizes if s >= report["param_count"] // 2]
    assert len(big) == 2, sizes  # G (or U) inside GC, then the fused gradient sum
    assert len(sizes) == 2  # XLA combines the scalar reductions into those two


def test_bad_mesh_and_chunk_combination(report):
    assert report["mesh_error"].startswith("disposal.num_chunks=5 is not a multiple of the 4 devices")


def test_two_processes_on_localhost_equal_one(tmp_path):
    """jax.distributed over gloo: one GC disposal step on a 2-process mesh equals the 1-process step."""
    port = _free_port()
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "JAX_NUM_CPU_DEVICES": "1"}
    script = str(HERE / "multiprocess_check.py")
    _two_processes(lambda i: [sys.executable, script, str(i), port, str(out)], env)
    report = json.loads(out.read_text())
    assert report["processes"] == 2 and report["devices"] == 2
    assert abs(report["gc"] - report["gc_reference"]) <= 1e-5 * max(1.0, abs(report["gc_reference"]))
    assert report["param_rel"] <= 1e-5


def test_dtl_jax_run_as_two_processes_equals_one(tmp_path):
    """`dtl-jax run --coordinator ...` as a 2-process job gives the single-process results.json."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "JAX_NUM_CPU_DEVICES": "1"}
    tiny = ["run", str(HERE.parent / "configs" / "digits.py"), "--quiet", "--set", "disposal.num_chunks=2",
            "--set", "disposal.steps=6", "--set", "piggyback.epochs=2", "--set", "disposal.methods=gc,rtf"]  # fmt: skip
    cli = [sys.executable, "-m", "dtl_jax.cli", *tiny]
    _two_processes(
        lambda i: [*cli, "--workdir", str(tmp_path / "multi"), "--coordinator", f"localhost:{port}",
                   "--num-processes", "2", "--process-id", str(i)],
        env,
    )  # fmt: skip
    single = subprocess.run([*cli, "--workdir", str(tmp_path / "single")], env=env, capture_output=True, timeout=240)
    assert single.returncode == 0, single.stderr[-2000:]
    two_devices = subprocess.run(  # one process, the disposal step sharded over 2 devices
        [*cli, "--workdir", str(tmp_path / "devices")], env={**env, "JAX_NUM_CPU_DEVICES": "2"}, capture_output=True,
        timeout=240,
    )  # fmt: skip
    assert two_devices.returncode == 0, two_devices.stderr[-2000:]
    one = json.loads((tmp_path / "single" / "results.json").read_text())["models"]
    for other in ("multi", "devices"):
        rows = json.loads((tmp_path / other / "results.json").read_text())["models"]
        assert set(rows) == {"random_init", "tl", "gc", "rtf"}
        for name, row in one.items():
            for key in ("target_acc", "source_acc", "pl_acc", "mia_acc"):
                assert abs(row[key] - rows[name][key]) <= 1e-6, (other, name, key)
