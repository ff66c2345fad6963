"""Every stage data-parallel (``steps.DataParallel``): the supervised and custom steps, the head refit's and
the prediction function on 2, 3 and 4 CPU devices against one device, and ``dtl-jax run`` / ``unlearn`` end
to end on 4 devices against one (and 2 processes against 1).

In-process: ``tests/conftest.py`` gives this process 4 CPU devices; each comparison builds meshes over the
first N. The steps run under ``jax.transfer_guard("disallow")`` with the state placed once beforehand
(batches are new data every call, placed by the step explicitly), so an implicit transfer fails the test.
Subprocesses remain only for the 2-process job.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import PartitionSpec as P

from dtl_jax import evaluate, losses
from dtl_jax.config import Config, DataConfig, ModelConfig, OptimConfig, TaskConfig, UnlearnConfig
from dtl_jax.data.sources import ImageSplit
from dtl_jax.models import Network, build
from dtl_jax.train import steps
from dtl_jax.train.mesh import all_reduce_sizes, data_mesh, default_devices
from dtl_jax.train.optim import make_optimizer

HERE = Path(__file__).resolve().parent
DEVICES = (2, 3, 4)
slow = pytest.mark.slow


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)) if a.size else 0.0


def _tree_rel(a, b) -> float:
    return max(_rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def batch_norm_net():
    """A backbone with BatchNorm and no max-pool: Conv, BatchNorm, ReLU, twice, then the spatial mean."""
    import flax.linen as nn

    class BatchNormNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            for width in (4, 8):
                x = nn.Conv(width, (3, 3), use_bias=False)(x)
                x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
            return x.mean(axis=(1, 2))

    return BatchNormNet()


MODELS = {
    "bn": lambda: Network(batch_norm_net()),
    "cnn": lambda: build(ModelConfig(name="cnn", widths=(4, 8))),
    "mlp": lambda: build(ModelConfig(name="mlp", widths=(16,))),
}
SIZES = (26, 32, 26)  # 26: split unevenly on 3 and 4 devices; 32: evenly on 2 and 4


@functools.cache
def _inputs():
    rng = np.random.default_rng(0)

    def batch(n, classes=4):
        return {
            "image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
            "label": rng.integers(0, classes, n).astype(np.int32),
        }

    batches = [batch(n) for n in SIZES]
    domain = [{"image": rng.normal(size=(6, 8, 8, 3)).astype(np.float32), "domain": np.repeat([1.0, 0.0], 3)}
              for _ in SIZES]  # fmt: skip
    eval_split = ImageSplit((rng.random((37, 8, 8, 3)) * 255).astype(np.uint8), np.zeros(37, np.int32))
    return batches, domain, eval_split


def _global_loss(network):
    def global_loss(params, batch_stats, key, aux, retain, dom):
        """Written for the global batches: one forward pass over both, split by the retain batch's size, a
        balanced mean over the domain batch's two groups, and a replicated constant."""
        n = retain["label"].shape[0]
        images = jnp.concatenate([retain["image"], dom["image"]])
        logits, features, stats = network.apply(
            {"params": params, "batch_stats": batch_stats}, images, head="source", train=True
        )
        ce = losses.cross_entropy(logits[:n], retain["label"])
        score = jnp.mean(features[n:], axis=-1)
        is_one = dom["domain"] > 0.5
        balanced = 0.5 * (jnp.sum(jnp.where(is_one, score, 0)) / jnp.sum(is_one)
                          + jnp.sum(jnp.where(is_one, 0, score)) / jnp.sum(~is_one))  # fmt: skip
        return ce + aux * balanced, (stats, {"balanced": balanced})

    return global_loss


@functools.cache
def _steps_on(name: str, n: int) -> dict:
    """Three supervised and three custom steps from the same state and batches on a mesh of ``n`` devices,
    and the prediction function over an eval split, with every step under ``transfer_guard("disallow")``."""
    network = MODELS[name]()
    batches, domain, eval_split = _inputs()
    tx = make_optimizer(OptimConfig(optimizer="sgd", learning_rate=0.1, momentum=0.9), 10)
    variables = network.init(jax.random.PRNGKey(0), (8, 8, 3), {"source": 4})
    mesh = data_mesh(n)
    supervised = steps.supervised_step(network, "source", tx, mesh=mesh)
    custom = steps.custom_step(_global_loss(network), tx, mesh=mesh)
    predict = steps.predict_fn(network, "source", mesh)
    state, losses_seen, modes = steps.init_state(variables, tx, 0, mesh), [], []
    custom_state, aux = steps.init_state(variables, tx, 0, mesh), steps.replicate(mesh, np.float32(0.5))
    with jax.transfer_guard("disallow"):
        for b, d in zip(batches, domain, strict=True):
            fn, placed = supervised.program(state, b)
            mode = next(mode for (_, mode), f in supervised._programs.items() if f is fn)
            modes.append("whole" if mode == "whole" else ("split" if placed[1]["label"].sharding.spec else "uneven"))
            state, metrics = supervised(state, b)
            losses_seen.append(float(jax.device_get(metrics["loss"])))
            custom_state, custom_metrics = custom(custom_state, aux, b, d)
    sharding = state["params"]["heads"]["source"]["kernel"].sharding
    logits, features = evaluate.predict(predict, steps.variables_of(state), eval_split, batch_size=10, mean=0.5,
                                        std=0.25)  # fmt: skip
    out = {
        "variables": jax.device_get(steps.variables_of(state)),
        "losses": losses_seen,
        "custom": jax.device_get(steps.variables_of(custom_state)),
        "balanced": float(jax.device_get(custom_metrics["balanced"])),
        "logits": logits,
        "features": features,
        "modes": modes,
        "replicated": sharding.spec == P() and sharding.mesh.devices.size == n,
    }
    if n in (1, 4):  # the compiled step for the even batch: its collectives
        hlo = supervised.lower(steps.init_state(variables, tx, 0, mesh), batches[1]).compile().as_text()
        out["all_reduces"] = all_reduce_sizes(hlo)
        out["all_gathers"] = sum(" all-gather(" in line or " all-gather-start(" in line for line in hlo.splitlines())
        out["param_count"] = int(sum(x.size for x in jax.tree.leaves(variables["params"])))
    return out


def _case(name: str, n: int, fast: bool = False):
    return pytest.param(name, n, marks=() if fast else slow)


CASES = [_case(name, n, fast=(name, n) == ("mlp", 3)) for name in MODELS for n in DEVICES]


@pytest.mark.parametrize(("name", "devices"), CASES)
def test_supervised_step_on_n_devices_equals_one(name, devices):
    """Three SGD-momentum steps (batches of 26, 32, 26 examples) give the one-device parameters, BatchNorm
    statistics and losses; the state stays replicated on the mesh."""
    one, run = _steps_on(name, 1), _steps_on(name, devices)
    assert _tree_rel(one["variables"], run["variables"]) <= 1e-5
    assert _rel(one["losses"], run["losses"]) <= 1e-6
    assert run["replicated"]


@pytest.mark.parametrize(("name", "devices"), CASES)
def test_uneven_batches_split_only_without_batch_norm(name, devices):
    """An even batch arrives split; one the device count does not divide arrives whole and is split inside
    the step for models without BatchNorm, computed whole on every device with it (``DataParallel``)."""
    expected = ["split" if size % devices == 0 else ("whole" if name == "bn" else "uneven") for size in SIZES]
    assert _steps_on(name, devices)["modes"] == expected


@pytest.mark.parametrize(("name", "devices"), CASES)
def test_custom_step_with_a_global_batch_loss_on_n_devices_equals_one(name, devices):
    """A loss written for the global batches (one forward pass over two batches, sliced by a batch's size,
    a balanced mean over groups) computes the same on any device count."""
    one, run = _steps_on(name, 1), _steps_on(name, devices)
    assert _tree_rel(one["custom"], run["custom"]) <= 1e-5 and _rel(one["balanced"], run["balanced"]) <= 1e-5


@pytest.mark.parametrize(("name", "devices"), CASES)
def test_prediction_on_n_devices_equals_one(name, devices):
    """37 examples in batches of 10, padded to a multiple of the device count (12 on 3 and 4 devices)."""
    one, run = _steps_on(name, 1), _steps_on(name, devices)
    assert _rel(one["logits"], run["logits"]) <= 1e-5 and _rel(one["features"], run["features"]) <= 1e-5


@slow
@pytest.mark.parametrize("name", ["bn", "cnn", "mlp"])
def test_communication_of_the_supervised_step(name):
    """One device: no collectives. Four, an even batch: all-reduces only (no all-gather of the batch or the
    activations), which together carry the gradient (every parameter) plus, with BatchNorm, its batch
    sums, and scalars."""
    one, four = _steps_on(name, 1), _steps_on(name, 4)
    assert one["all_reduces"] == [] and one["all_gathers"] == 0
    assert four["all_gathers"] == 0
    assert four["param_count"] <= sum(four["all_reduces"]) <= 2 * four["param_count"], four


@functools.cache
def _head_fit(n: int) -> dict:
    """Three steps of ``fit_head``'s step (a linear head on fixed features: never BatchNorm, uneven batches
    split) on ``n`` devices, head and optimiser state placed once."""
    rng = np.random.default_rng(1)
    features = rng.normal(size=(26, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 26).astype(np.int32)
    head = {"kernel": rng.normal(size=(8, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}
    tx = make_optimizer(OptimConfig(optimizer="sgd", learning_rate=0.1, momentum=0.9), 10)

    def head_step(head, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda h: losses.cross_entropy(x @ h["kernel"] + h["bias"], y))(head)
        updates, opt_state = tx.update(grads, opt_state, head)
        return jax.tree.map(lambda p, u: p + u, head, updates), opt_state, loss

    fit = steps.DataParallel(head_step, data_mesh(n), replicated=2, donate_argnums=(0, 1))
    h, s = fit.replicate((jax.tree.map(jnp.array, head), tx.init(head)))
    with jax.transfer_guard("disallow"):
        for _ in range(3):
            h, s, _ = fit(h, s, features, labels)
    return jax.device_get(h)


@slow
@pytest.mark.parametrize("devices", [2, 3, 4])
def test_head_fit_step_on_n_devices_equals_one(devices):
    assert _tree_rel(_head_fit(1), _head_fit(devices)) <= 1e-5


def test_place_batch_splits_what_divides_and_replicates_the_rest():
    batch = {"image": np.zeros((4, 2), np.float32), "label": np.arange(4)}
    placed = steps.place_batch(data_mesh(4), batch)
    assert all(x.sharding.spec == P("data") for x in jax.tree.leaves(placed))
    assert steps.place_batch(data_mesh(4), placed) is placed  # already on the mesh: kept
    uneven = steps.place_batch(data_mesh(3), {"image": np.zeros((4, 2), np.float32)})
    assert uneven["image"].sharding.spec == P()


def test_an_unplaced_state_is_an_implicit_transfer_the_guard_refuses():
    """The step does not place its state (placing once is the caller's job): a state left on the host is an
    implicit transfer, which ``jax.transfer_guard("disallow")`` turns into an error; placed, it runs."""
    network = MODELS["mlp"]()
    tx = make_optimizer(OptimConfig(optimizer="sgd", learning_rate=0.1), 10)
    variables = network.init(jax.random.PRNGKey(0), (8, 8, 3), {"source": 4})
    step = steps.supervised_step(network, "source", tx, mesh=data_mesh(2))
    batch = _inputs()[0][1]
    host, placed = jax.device_get(steps.init_state(variables, tx, 0)), steps.init_state(variables, tx, 0, data_mesh(2))
    with jax.transfer_guard("disallow"), pytest.raises(Exception, match="[Dd]isallowed"):
        step(host, batch)
    with jax.transfer_guard("disallow"):
        step(placed, batch)


# ---------------------------------------------------------------------------------------------------
# End to end: 1 vs 4 devices, 1 vs 2 processes


def tiny_run_config(devices: int = 0):
    """tests/conftest.py's tiny DTL run with a pre-training batch of 30 (split unevenly over 4 devices), on
    ``devices`` devices (``disposal.devices``: the mesh of every DTL stage; 0 = all)."""
    config = tiny_config()
    return dataclasses.replace(
        config,
        pretrain=dataclasses.replace(config.pretrain, batch_size=30),
        disposal=dataclasses.replace(config.disposal, devices=devices),
    )


def tiny_unlearn_config():
    """Every unlearning method on digits with a small CNN, a few steps each. (Not the CNN with BatchNorm:
    its steps agree with one device (``test_*_on_n_devices_equals_one``), but over whole runs its metrics
    moved by a few forget examples more than this test's bound, for a reason not established; the max-pool
    derivative once suspected was a separate, jit-only bug, now fixed: ``tests/test_models.py``.)"""
    sgd = OptimConfig(optimizer="sgd", learning_rate=0.01, momentum=0.9, epochs=1, batch_size=32)
    unlearn = UnlearnConfig(
        task=TaskConfig(dataset="digits"), original=OptimConfig(learning_rate=0.01, epochs=2, batch_size=32),
        optim=sgd, ga_epochs=1, scrub_epochs=1, scrub_max_epochs=1, scrub_forget_batch=32,
        sure_optim=dataclasses.replace(sgd, momentum=0.0),
    )  # fmt: skip
    return Config(
        data=DataConfig(image_size=0, channels=1, flip=False),
        model=ModelConfig(name="cnn", widths=(4, 8)),
        unlearn=unlearn,
        checkpoint_every=0,
    )


RUN_KEYS = ("target_acc", "source_acc", "pl_acc", "mia_acc")
UNLEARN_KEYS = ("ua", "ra", "ta", "mia_efficacy", "loss_mia")


def _compare(one: dict, other: dict, table: str, keys: tuple, tolerance: float) -> None:
    assert set(one[table]) == set(other[table])
    for name, row in one[table].items():
        for key in keys:
            assert abs(row[key] - other[table][name][key]) <= tolerance, (name, key, row[key], other[table][name][key])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["run", "unlearn"])
def test_end_to_end_on_four_devices_equals_one(tmp_path, kind):
    """``run`` (an MLP; the pre-training batch of 30 split unevenly) and ``unlearn`` (every method, a small
    CNN) on 4 devices give the 1-device metrics, and every stage records 4 devices. Both in this process,
    the 4-device run with device-to-device implicit transfers disallowed (a state or constant left off the
    mesh would be one). (Metrics are counts over 61 to a few hundred examples: a float-rounding difference
    can move an example across a decision boundary, so the bound is 2 points, not 0.)"""
    from dtl_jax import dtl
    from dtl_jax.unlearn import runner

    if kind == "run":
        one = dtl.run(tiny_run_config(1), tmp_path / "1", quiet=True)
        with jax.transfer_guard_device_to_device("disallow"):
            four = dtl.run(tiny_run_config(4), tmp_path / "4", quiet=True)
        table, keys = "models", RUN_KEYS
    else:
        with default_devices(1):
            one = runner.run(tiny_unlearn_config(), tmp_path / "1", quiet=True)
        with default_devices(4), jax.transfer_guard_device_to_device("disallow"):
            four = runner.run(tiny_unlearn_config(), tmp_path / "4", quiet=True)
        table, keys = "methods", UNLEARN_KEYS
    _compare(one, four, table, keys, 0.02)
    assert {stage["devices"] for stage in four["stages"].values()} == {4}
    assert {stage["devices"] for stage in one["stages"].values()} == {1}
    if kind == "run":
        assert {"pretrain", "transfer", "refit", "disposal gc", "piggyback tl"} <= set(four["stages"])
    else:
        assert set(four["stages"]) == set(four["methods"])  # the original model and every method


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return str(s.getsockname()[1])


def _child(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, __file__, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen, timeout: int = 900) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return out


@pytest.mark.slow
def test_unlearn_as_two_processes_equals_one(tmp_path):
    """``unlearn`` as a 2-process job (jax.distributed over gloo, one CPU device each): every stage on both
    processes' devices, each process feeding its slice of every batch, gives the 1-process metrics.
    (tests/test_sharded.py runs ``dtl-jax run`` the same way.)"""
    port = _free_port()
    multi = [_child(str(tmp_path / "multi"), f"localhost:{port}", str(i)) for i in range(2)]
    single = _child(str(tmp_path / "single"))
    for proc in (*multi, single):
        _finish(proc)
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("single", "multi"))
    _compare(one, two, "methods", UNLEARN_KEYS, 0.02)
    assert {(s["devices"], s["processes"]) for s in two["stages"].values()} == {(2, 2)}


def main(workdir: str, *distributed: str) -> None:
    """The child of ``test_unlearn_as_two_processes_equals_one``: one process of the job, or the single one."""
    from dtl_jax.train.mesh import initialize_distributed
    from dtl_jax.unlearn import runner

    if distributed:
        initialize_distributed(distributed[0], 2, int(distributed[1]))
    runner.run(tiny_unlearn_config(), workdir, quiet=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
