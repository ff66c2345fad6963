"""The sharded disposal step (jax.shard_map) on 3, 4 and 8 CPU devices against the single-device step, its
communication from the compiled HLO, and the chunk layout it chooses.

JAX fixes its device count when it starts, so the comparison runs in a subprocess started with
``JAX_NUM_CPU_DEVICES=8`` (tests/sharded_check.py), which builds meshes over the first N devices.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dtl_jax.errors import UserError
from dtl_jax.train.mesh import chunk_layout, data_mesh, padded_rows

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sharded_check import CASES, GC_LAYOUTS  # noqa: E402

# Everything that reads ``report`` (one subprocess with 8 CPU devices, about a minute) is slow.
slow = pytest.mark.slow


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
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharded_check.py")], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


RUNS = [(name, n) for name, case in CASES.items() for n in case[-1]]


@slow
@pytest.mark.parametrize(("name", "devices"), RUNS)
def test_n_devices_equal_one(report, name, devices):
    """``*_low_memory``: the low-memory GC path on N devices against the default path on one. N = 3 pads
    both batches (K = 4: chunks of 8 in parts of 3; K = 5: 8 in parts of 3; target 16 in 6s)."""
    run = report[name][str(devices)]
    assert run["unlearn_rel"] <= 1e-5  # the GC / NGC / RTF / GA value
    for diff, scale in run["params"]:  # the updated parameters, leaf by leaf
        assert diff <= 1e-5 * scale + 1e-7, (diff, scale)


@slow
@pytest.mark.parametrize(("name", "devices"), RUNS)
def test_communication_is_what_the_layout_states(report, name, devices):
    """The parameter-size all-reduces of the compiled step are those ``ChunkLayout.all_reduces`` states, and
    all-reduces carry as many elements in all as it states plus a few scalars. (XLA may send the target
    head's gradient, which does not depend on GC, and scalars in an all-reduce of their own or with
    another.) Nothing else is communicated."""
    run = report[name][str(devices)]
    head = report["param_count"] - report["gc_param_count"]  # the target head: not in the chunk gradients
    big = [s for s in run["all_reduces"] if s >= report["gc_param_count"] // 2]
    small = [s for s in run["all_reduces"] if s < report["gc_param_count"] // 2]
    assert len(big) == len(run["expected"]), (run["all_reduces"], run["expected"])
    assert 0 <= sum(run["all_reduces"]) - sum(run["expected"]) <= 8, (run["all_reduces"], run["expected"])
    assert all(s <= head + 8 for s in small), run["all_reduces"]
    assert run["other_collectives"] == []


@slow
@pytest.mark.parametrize("name", ["gc", "ngc", "gc_low_memory"])
def test_exactly_two_parameter_size_all_reduces_where_devices_divide_k(report, name):
    run = report[name]["4"]  # K = 4 on 4 devices: whole chunks per device
    assert run["layout"] == [4, 1, False]
    big = [s for s in run["all_reduces"] if s >= report["gc_param_count"] // 2]
    assert len(big) == 2, run["all_reduces"]  # G (or U) inside GC, then the fused gradient sum
    assert len(run["all_reduces"]) == 2  # XLA combines the scalar reductions into those two


@slow
@pytest.mark.parametrize("layout", list(GC_LAYOUTS))
def test_gc_loss_sharded_equals_one_device(report, layout):
    """``gc_loss(..., axis_name=...)`` on c x e grids (1x3 padded, its loss weighting the padding out), GC
    and NGC, every HVP mode, and (2x2) with replicated parameters: the value and the summed gradient."""
    runs = {key: errors for key, errors in report["gc_loss"].items() if key.startswith(layout + "/")}
    assert len(runs) == (8 if layout == "2x2" else 6), sorted(runs)
    for key, (value_error, grad_error) in runs.items():
        assert value_error <= 2e-6 and grad_error <= 1e-5, (key, value_error, grad_error)


@pytest.mark.parametrize(
    ("devices", "k", "batch", "layout", "counts"),
    [
        (1, 4, 80, (1, 1, False), []),
        (2, 4, 80, (2, 1, False), ["P_gc", "P"]),
        (3, 4, 80, (1, 3, True), ["P", "4P_gc"]),
        (4, 4, 80, (4, 1, False), ["P_gc", "P"]),
        (8, 4, 80, (4, 2, False), ["P_gc", "P_gc", "P"]),
        (1, 5, 80, (1, 1, False), []),
        (2, 5, 80, (1, 2, False), ["P", "5P_gc"]),
        (3, 5, 80, (1, 3, True), ["P", "5P_gc"]),
        (4, 5, 80, (1, 4, False), ["P", "5P_gc"]),
        (8, 5, 80, (1, 8, False), ["P", "5P_gc"]),
        (6, 4, 80, (2, 3, True), ["P_gc", "P", "2P_gc"]),
    ],
)
def test_chunk_layout_choice_and_stated_communication(devices, k, batch, layout, counts):
    """The layout for (devices, K) and the all-reduces it states (P_gc = 1000, P = 1500 here); the default
    source batch of 80 is used, so 3 devices pad its chunks (16 or 20 examples into parts of 6 or 7)."""
    got = chunk_layout(devices, k, batch)
    assert (got.chunk_devices, got.example_devices, got.padded) == layout
    value = {"P": 1500, "P_gc": 1000, "2P_gc": 2000, "4P_gc": 4000, "5P_gc": 5000}
    assert got.all_reduces(1000, 1500) == sorted(value[c] for c in counts)


@pytest.mark.parametrize(("devices", "k", "batch"), [(3, 4, 32), (8, 5, 40), (6, 4, 80), (4, 5, 80), (2, 2, 6)])
def test_source_rows_hold_every_example_once_and_each_part_in_its_chunk(devices, k, batch):
    layout = chunk_layout(devices, k, batch)
    rows, mask = layout.source_rows()
    rows = np.arange(batch) if rows is None else rows
    mask = np.ones(rows.size, bool) if mask is None else mask
    assert sorted(rows[mask]) == list(range(batch))  # every real example exactly once
    m, part, per_device = batch // k, layout.part, (k // layout.chunk_devices) * layout.part
    for device in range(devices):
        i = device // layout.example_devices  # its row in the grid: chunks i·K/c .. (i+1)·K/c - 1
        local = rows[device * per_device : (device + 1) * per_device].reshape(k // layout.chunk_devices, part)
        for offset, chunk_rows in enumerate(local):
            assert set(chunk_rows // m) == {i * (k // layout.chunk_devices) + offset}


def test_padded_rows_split_any_batch():
    rows, mask = padded_rows(16, 3)
    assert rows.size == 18 and mask.sum() == 16 and sorted(rows[mask]) == list(range(16))
    assert padded_rows(16, 4) == (None, None)


def test_layout_and_mesh_errors_are_in_their_own_terms():
    """Library modules name values, not config keys (``dtl_jax.errors``); the experiment names the key."""
    with pytest.raises(UserError, match=r"a source batch of 30 examples does not split into 4 equal chunks"):
        chunk_layout(2, 4, 30)
    with pytest.raises(UserError, match=r"a mesh of 64 devices: only \d+ are available"):
        data_mesh(64)


@pytest.mark.slow
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


@pytest.mark.slow
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
