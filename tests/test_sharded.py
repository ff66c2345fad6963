"""The sharded disposal step (``jax.shard_map``) on 2, 3 and 4 CPU devices against the one-device step, its
communication read from the compiled HLO, ``gc_loss`` itself on device grids, and the chunk layout.

In-process: ``tests/conftest.py`` gives this process 4 CPU devices, and each case builds meshes over the
first N of them. Every N-device step runs under ``jax.transfer_guard("disallow")`` with its state, teacher
and weights placed beforehand, so an implicit transfer inside the step fails the test. Subprocesses remain
only where a process boundary is the point (the 2-process jobs at the end).
"""

import dataclasses
import functools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dtl_jax.config import DisposalConfig, ModelConfig, OptimConfig
from dtl_jax.disposal_objective import split_gc_params
from dtl_jax.errors import UserError
from dtl_jax.gc import gc_loss
from dtl_jax.models import build
from dtl_jax.train import steps
from dtl_jax.train.disposal_step import disposal_program
from dtl_jax.train.mesh import (
    ChunkLayout,
    all_reduce_sizes,
    chunk_layout,
    data_mesh,
    padded_rows,
    place_disposal_batches,
)
from dtl_jax.train.optim import make_optimizer

HERE = Path(__file__).resolve().parent
slow = pytest.mark.slow
OTHER_COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")

# name: (method, K, source batch, target batch, gc_low_memory on N devices, retain, device counts N).
# Layouts (c x e): K = 4 on 2: 2x1; on 3: 1x3, parts of 3 padded from 8 (target 16 in parts of 6); on 4: 4x1.
# K = 5 on 2: 1x2; on 3: 1x3 padded; on 4: 1x4. K = 2 on 4: 2x2 (chunks and examples both split).
CASES = {
    "gc": ("gc", 4, 32, 16, False, "tgt_kd", (2, 3, 4)),
    "ngc": ("ngc", 4, 32, 16, False, "tgt_kd", (4,)),
    "rtf": ("rtf", 4, 32, 16, False, "tgt_kd", (3,)),
    "gc_low_memory": ("gc", 4, 32, 16, True, "tgt_kd", (2, 4)),
    "ngc_low_memory": ("ngc", 4, 32, 16, True, "tgt_kd", (3,)),
    "gc_k5": ("gc", 5, 40, 16, False, "tgt_kd", (2, 4)),
    "gc_k2": ("gc", 2, 32, 16, False, "tgt_kd", (4,)),
    "ga_ce": ("ga", 4, 32, 16, False, "ce", (3,)),
    "ngc_k5_src_kd": ("ngc", 5, 40, 16, False, "src_kd", (3,)),
    # terms clipped apart (two gradient all-reduces), bounded GC, SOPHON (k = K - 1 simulated steps, each with
    # an all-reduce of its gradient; every device holds a part of each of the K parts: a 1 x N layout)
    "gc_sep": ("gc_sep", 4, 32, 16, False, "tgt_kd", (2, 3)),
    "gc_sep_bound": ("gc_sep_bound", 4, 32, 16, False, "ce", (4,)),
    "sophon": ("sophon", 4, 32, 16, False, "tgt_kd", (2, 3)),
    "sophon_source_head": ("sophon", 4, 32, 16, False, "ce", (4,)),
    "gc_mlp": ("gc", 4, 32, 16, False, "tgt_kd", (3,)),
}
MODELS = {"gc_mlp": ModelConfig(name="mlp", widths=(16,))}  # the others: ModelConfig(name="cnn", widths=(4, 8))
FAST = {("gc_mlp", 3)}  # the fast tier: GC with its chunks split over 3 devices and padded (1x3), an MLP
RUNS = [
    pytest.param(name, n, marks=() if (name, n) in FAST else slow) for name, case in CASES.items() for n in case[-1]
]
# The all-reduce counts the chunk layout states are GC's and the fooling losses' (one gradient sum).
COMMUNICATION = [p for p in RUNS if CASES[p.values[0]][0] in ("gc", "ngc", "rtf", "utf", "ga")]


@functools.cache
def _network(name: str):
    network = build(MODELS.get(name, ModelConfig(name="cnn", widths=(4, 8))))
    return network, network.init(jax.random.PRNGKey(0), (8, 8, 3), {"source": 5, "target": 3})


def _batches(k: int, n_source: int, n_target: int):
    rng = np.random.default_rng(0)
    source = {
        "image": rng.normal(size=(n_source, 8, 8, 3)).astype(np.float32),
        "label": np.repeat(np.arange(k), n_source // k).astype(np.int32),  # by_class: a class a chunk
    }
    target = {
        "image": rng.normal(size=(n_target, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, 3, n_target).astype(np.int32),
    }
    return source, target


def _config(name: str) -> DisposalConfig:
    method, k, n_source, _, _, retain, _ = CASES[name]
    return DisposalConfig(num_chunks=k, source_batch_size=n_source, gc_lambda=0.5, fooling_lambda=0.5, retain=retain,
                          optim=OptimConfig(optimizer="sgd", learning_rate=0.05, clip_norm=1.0),
                          term_clip=0.05, gc_bound=0.001, sophon_lambda=0.5, sophon_steps=k - 1,
                          sophon_learning_rates=(0.5, 0.2), sophon_first_order=False,
                          sophon_head="source" if name == "sophon_source_head" else "fresh")  # fmt: skip


@functools.cache
def _reference(name: str) -> tuple[float, list]:
    """One step on one device (the default GC path): the unlearning value and the updated parameters."""
    method, k, n_source, n_target, _, _, _ = CASES[name]
    network, variables = _network(name)
    config = _config(name)
    tx = make_optimizer(config.optim, 10)
    mesh = data_mesh(1)
    step, weights = disposal_program(network, method, config, tx, mesh)
    state, teacher = steps.init_state(variables, tx, 0, mesh), steps.replicate(mesh, variables)
    state, metrics = step(state, teacher, weights, *_batches(k, n_source, n_target))
    return float(metrics["unlearn"]), jax.tree.leaves(jax.device_get(state["params"]))


@functools.cache
def _run(name: str, devices: int) -> dict:
    """One step on ``devices`` devices (``gc_low_memory`` as the case says), compiled ahead of time so that
    its HLO can be read, then run with every input placed and implicit transfers disallowed."""
    method, k, n_source, n_target, low_memory, _, _ = CASES[name]
    network, variables = _network(name)
    config = dataclasses.replace(_config(name), gc_low_memory=low_memory)
    tx = make_optimizer(config.optim, 10)
    mesh = data_mesh(devices)
    step, weights = disposal_program(network, method, config, tx, mesh)
    state, teacher = steps.init_state(variables, tx, 0, mesh), steps.replicate(mesh, variables)
    placed = place_disposal_batches(mesh, k, *_batches(k, n_source, n_target))
    compiled = step.lower(state, teacher, weights, *placed).compile()
    with jax.transfer_guard("disallow"):
        state, metrics = compiled(state, teacher, weights, *placed)
    params = jax.tree.leaves(jax.device_get(state["params"]))
    hlo = compiled.as_text()
    sizes = (sum(x.size for x in jax.tree.leaves(split_gc_params(variables["params"], "backbone_source")[0])),
             sum(x.size for x in jax.tree.leaves(variables["params"])))  # fmt: skip
    layout = chunk_layout(devices, k, n_source)
    return {
        "layout": (layout.chunk_devices, layout.example_devices, layout.padded),
        "unlearn": float(metrics["unlearn"]),
        "params": params,
        "all_reduces": all_reduce_sizes(hlo),
        "expected": layout.all_reduces(*sizes, low_memory) if method in ("gc", "ngc") else [sizes[1]],
        "gc_param_count": sizes[0],
        "param_count": sizes[1],
        "other_collectives": sorted({c for c in OTHER_COLLECTIVES if re.search(rf"\b{c}(-start)?\(", hlo)}),
    }


@pytest.mark.parametrize(("name", "devices"), RUNS)
def test_n_devices_equal_one(name, devices):
    """``*_low_memory``: the low-memory GC path on N devices against the default path on one. N = 3 pads
    both batches (K = 4: chunks of 8 in parts of 3; K = 5: 8 in parts of 3; target 16 in 6s)."""
    ref_unlearn, ref_params = _reference(name)
    run = _run(name, devices)
    assert abs(run["unlearn"] - ref_unlearn) <= 1e-5 * abs(ref_unlearn) + 1e-12
    for a, b in zip(ref_params, run["params"], strict=True):  # the updated parameters, leaf by leaf
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a)) + 1e-7


@pytest.mark.parametrize(("name", "devices"), COMMUNICATION)
def test_communication_is_what_the_layout_states(name, devices):
    """The parameter-size all-reduces of the compiled step are those ``ChunkLayout.all_reduces`` states, and
    all-reduces carry as many elements in all as it states plus a few scalars. (XLA may send the target
    head's gradient, which does not depend on GC, and scalars in an all-reduce of their own or with
    another.) Nothing else is communicated."""
    run = _run(name, devices)
    head = run["param_count"] - run["gc_param_count"]  # the target head: not in the chunk gradients
    big = [s for s in run["all_reduces"] if s >= run["gc_param_count"] // 2]
    small = [s for s in run["all_reduces"] if s < run["gc_param_count"] // 2]
    assert len(big) == len(run["expected"]), (run["all_reduces"], run["expected"])
    assert 0 <= sum(run["all_reduces"]) - sum(run["expected"]) <= 8, (run["all_reduces"], run["expected"])
    assert all(s <= head + 8 for s in small), run["all_reduces"]
    assert run["other_collectives"] == []


@slow
@pytest.mark.parametrize("name", ["gc", "ngc", "gc_low_memory"])
def test_exactly_two_parameter_size_all_reduces_where_devices_divide_k(name):
    run = _run(name, 4)  # K = 4 on 4 devices: whole chunks per device
    assert run["layout"] == (4, 1, False)
    big = [s for s in run["all_reduces"] if s >= run["gc_param_count"] // 2]
    assert len(big) == 2, run["all_reduces"]  # G (or U) inside GC, then the fused gradient sum
    assert len(run["all_reduces"]) == 2  # XLA combines the scalar reductions into those two


# --- gc_loss itself inside shard_map, on a tiny MLP: (c, e) grids --------------------------------------

GC_LAYOUTS = {"4x1": (4, 1), "1x4": (1, 4), "2x2": (2, 2), "1x3_padded": (1, 3)}


def _per_example(p, b):
    logits = jnp.tanh(b["x"] @ p["w1"]) @ p["w2"]
    return -jax.nn.log_softmax(logits)[jnp.arange(b["y"].shape[0]), b["y"]]


def _rel(a, b) -> float:
    return max(float(np.max(np.abs(x - y)) / np.max(np.abs(x))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _gc_loss_case(c, e, normalized, options, vary) -> tuple[float, float]:
    """``(value error, gradient error)`` of ``gc_loss`` on a ``c x e`` grid against one device. A padded
    layout weighs its padding out with ``gc_loss``'s ``weights`` (``1/m`` for a chunk's real examples)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w1": jax.random.normal(k1, (3, 5)), "w2": jax.random.normal(k2, (5, 3))}
    batch = {"x": jax.random.normal(k3, (16, 3)), "y": jnp.arange(16) % 3}
    k, m = 4, 4
    layout = ChunkLayout(k, m, c, e)
    axes = tuple(a for a, size in (("c", c), ("e", e)) if size > 1)
    axis_name = "c" if e == 1 else ("c" if c > 1 else None, "e")
    mesh = Mesh(np.array(jax.devices()[: c * e]).reshape([{"c": c, "e": e}[a] for a in axes]), axes)
    rows, mask = layout.source_rows()
    local = batch if rows is None else jax.tree.map(lambda x: x[rows], batch)
    weights = None if mask is None else jnp.asarray(mask, jnp.float32) / m

    def sharded(p, b, w):
        p = jax.lax.pcast(p, axes, to="varying") if vary else p
        fn = _per_example if w is not None else lambda q, d: jnp.mean(_per_example(q, d))
        loss = lambda q: gc_loss(fn, q, b, k, normalized=normalized, axis_name=axis_name, weights=w, **options)  # noqa: E731
        value, grad = jax.value_and_grad(loss)(p)
        return value, (jax.lax.psum(grad, axes) if vary else grad)

    def single(p):
        return gc_loss(lambda q, b: jnp.mean(_per_example(q, b)), p, batch, k, normalized=normalized, **options)

    ref_value, ref_grad = jax.value_and_grad(single)(params)
    w_spec = None if weights is None else P(axes)
    run = jax.jit(jax.shard_map(sharded, mesh=mesh, in_specs=(P(), P(axes), w_spec), out_specs=(P(), P())))
    value, grad = run(params, local, weights)
    return abs(float(value) - float(ref_value)) / abs(float(ref_value)), _rel(ref_grad, grad)


GC_FAST = {("2x2", False, "jvp")}  # chunks and examples both split
GC_CASES = [
    pytest.param(layout, normalized, mode, marks=() if (layout, normalized, mode) in GC_FAST else slow)
    for layout in GC_LAYOUTS
    for normalized in (False, True)
    for mode in ("jvp", "linearize", "batched", "low_memory", *(("replicated",) if layout == "2x2" else ()))
]


@pytest.mark.parametrize(("layout", "normalized", "mode"), GC_CASES)
def test_gc_loss_sharded_equals_one_device(layout, normalized, mode):
    """``gc_loss(..., axis_name=...)`` on c x e grids (1x3 padded, the padding weighted out by ``weights``),
    GC and NGC, every HVP mode, and (2x2) with replicated parameters: the value and the summed gradient."""
    options = {"low_memory": True} if mode == "low_memory" else {"hvp": "jvp" if mode == "replicated" else mode}
    value_error, grad_error = _gc_loss_case(*GC_LAYOUTS[layout], normalized, options, mode != "replicated")
    assert value_error <= 2e-6 and grad_error <= 1e-5, (value_error, grad_error)


# --- the layout -------------------------------------------------------------------------------------


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


def test_this_process_has_several_devices():
    """The in-process multi-device tests above need ``tests/conftest.py``'s CPU devices."""
    assert jax.device_count() >= 4


# --- a process boundary: 2-process jobs (jax.distributed over gloo) -------------------------------------


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
    one = json.loads((tmp_path / "single" / "results.json").read_text())["models"]
    rows = json.loads((tmp_path / "multi" / "results.json").read_text())["models"]
    assert set(rows) == {"random_init", "tl", "gc", "rtf"}
    for name, row in one.items():
        for key in ("target_acc", "source_acc", "pl_acc", "mia_acc"):
            assert abs(row[key] - rows[name][key]) <= 1e-6, (name, key)
