"""The disposal objective alone (no mesh, no sharding): its terms, per-example weights for padding, λ as an
argument; and the disposal step compiled once for every λ."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtl_jax.config import Config, DisposalConfig, ModelConfig, OptimConfig
from dtl_jax.disposal_objective import DisposalObjective, weights
from dtl_jax.gc import gc_loss
from dtl_jax.models import build
from dtl_jax.stages.disposal import program_key
from dtl_jax.train import steps
from dtl_jax.train.disposal_step import disposal_program
from dtl_jax.train.mesh import data_mesh
from dtl_jax.train.optim import make_optimizer

K, M, N_TARGET = 4, 3, 6  # chunks, examples a chunk, target examples


def _setup():
    network = build(ModelConfig(name="mlp", widths=(8,)))
    variables = network.init(jax.random.PRNGKey(0), (4, 4, 1), {"source": K, "target": 3})
    rng = np.random.default_rng(0)
    source = {
        "image": rng.normal(size=(K * M, 4, 4, 1)).astype(np.float32),
        "label": np.repeat(np.arange(K), M).astype(np.int32),
    }
    target = {"image": rng.normal(size=(N_TARGET, 4, 4, 1)).astype(np.float32),
              "label": rng.integers(0, 3, N_TARGET).astype(np.int32)}  # fmt: skip
    return network, variables, source, target


def _objective(network, method: str, retain: str) -> DisposalObjective:
    return DisposalObjective.from_config(network, method, DisposalConfig(retain=retain, num_chunks=K))


def _terms(objective, variables, source, target):
    source = objective.prepare_source(jax.random.PRNGKey(1), source, K)
    terms, _ = objective.terms(variables["params"], variables["batch_stats"], variables, source, target)
    return {name: float(value) for name, value in terms.items()}


def _pad(batch: dict, rows: np.ndarray, size: int) -> dict:
    """``batch[rows]`` with the global-batch weights ``1/size`` on the real rows and 0 on repeated ones."""
    real = np.zeros(len(rows), bool)
    real[np.unique(rows, return_index=True)[1]] = True
    return {**{k: v[rows] for k, v in batch.items()}, "weight": np.where(real, 1.0 / size, 0.0).astype(np.float32)}


FAST = {("gc", "tgt_kd")}  # the other losses: the slow tier
CASES = [
    pytest.param(method, retain, marks=() if (method, retain) in FAST else pytest.mark.slow)
    for method, retain in [("gc", "tgt_kd"), ("ngc", "ce"), ("rtf", "ce"), ("utf", "src_kd"), ("ga", "tgt_kd")]
]


@pytest.mark.slow  # the fast tier checks the weighted GC through the sharded step (tests/test_sharded.py)
@pytest.mark.parametrize(("method", "retain"), CASES)
def test_weights_one_over_n_give_the_plain_means(method, retain):
    network, variables, source, target = _setup()
    objective = _objective(network, method, retain)
    plain = _terms(objective, variables, source, target)
    weighted = _terms(
        objective, variables, _pad(source, np.arange(K * M), K * M), _pad(target, np.arange(N_TARGET), N_TARGET)
    )
    assert plain.keys() == weighted.keys() == {"retain", "unlearn"}
    for name in plain:
        assert weighted[name] == pytest.approx(plain[name], rel=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize(("method", "retain"), CASES)
def test_padding_weighted_zero_changes_no_term(method, retain):
    """Each chunk padded with repeats of its first example (as a sharded layout pads it), the target batch
    with repeats of the first two, all weighing 0: every term as without padding."""
    network, variables, source, target = _setup()
    objective = _objective(network, method, retain)
    plain = _terms(objective, variables, source, target)
    source_rows = np.concatenate([np.r_[k * M : (k + 1) * M, k * M] for k in range(K)])  # M + 1 a chunk
    padded = _terms(
        objective, variables, _pad(source, source_rows, K * M), _pad(target, np.r_[0:N_TARGET, 0, 1], N_TARGET)
    )
    if method == "rtf":  # its wrong labels are drawn for the batch as given (the step draws before padding)
        padded["unlearn"] = plain["unlearn"]
    for name in plain:
        assert padded[name] == pytest.approx(plain[name], rel=1e-5), name


@pytest.mark.slow
def test_the_objective_is_retain_plus_lambda_unlearn_and_linear_in_lambda():
    network, variables, source, target = _setup()
    objective = _objective(network, "gc", "tgt_kd")
    source = objective.prepare_source(jax.random.PRNGKey(1), source, K)

    def value_and_grad(lam):
        fn = lambda p: objective(
            p, variables["batch_stats"], variables, {"retain": 1.0, "unlearn": lam}, source, target
        )  # noqa: E731
        (value, (terms, _)), grads = jax.value_and_grad(fn, has_aux=True)(variables["params"])
        return float(value), terms, grads

    value, terms, g1 = value_and_grad(0.5)
    assert value == pytest.approx(float(terms["retain"]) + 0.5 * float(terms["unlearn"]), rel=1e-6)
    _, _, g0 = value_and_grad(0.0)
    _, _, g2 = value_and_grad(1.0)
    for a, b, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(b - a, 0.5 * (c - a), rtol=1e-4, atol=1e-6)


def test_weights_read_lambda_from_the_config():
    d = DisposalConfig(gc_lambda=0.3, fooling_lambda=0.7)
    assert weights("gc", d) == weights("ngc", d) == {"retain": 1.0, "unlearn": 0.3}
    assert weights("rtf", d) == weights("ga", d) == {"retain": 1.0, "unlearn": 0.7}


def test_gc_loss_weights_are_a_weighted_mean_and_padding_weighs_nothing():
    """``gc_loss(..., weights=1/m)`` with per-example losses is ``gc_loss`` of the mean loss; each chunk
    padded with a repeated example of weight 0, the value and gradient are unchanged."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    w = jax.random.normal(k1, (3, 2))
    batch = {"x": jax.random.normal(k2, (8, 3)), "y": jnp.arange(8) % 2}

    def per_example(p, b):
        return -jax.nn.log_softmax(b["x"] @ p)[jnp.arange(b["y"].shape[0]), b["y"]]

    plain = jax.value_and_grad(lambda p: gc_loss(lambda q, b: jnp.mean(per_example(q, b)), p, batch, 2))(w)
    weighted = jax.value_and_grad(lambda p: gc_loss(per_example, p, batch, 2, weights=jnp.full(8, 0.25)))(w)
    rows = np.r_[0:4, 0, 4:8, 4]
    padded_batch = jax.tree.map(lambda x: x[rows], batch)
    zero = jnp.asarray(np.r_[np.full(4, 0.25), 0.0, np.full(4, 0.25), 0.0], jnp.float32)
    padded = jax.value_and_grad(lambda p: gc_loss(per_example, p, padded_batch, 2, weights=zero))(w)
    for other in (weighted, padded):
        assert float(other[0]) == pytest.approx(float(plain[0]), rel=1e-5)
        np.testing.assert_allclose(other[1], plain[1], rtol=1e-5, atol=1e-7)


def test_lambda_is_an_argument_the_step_compiles_once_for_every_lambda():
    """Two λ, one program: the jitted step's cache holds one executable, the updates differ with λ, and the
    compile-cache key of the stage (``program_key``) does not read λ."""
    network, variables, source, target = _setup()
    config = DisposalConfig(
        num_chunks=K, source_batch_size=K * M, optim=OptimConfig(optimizer="sgd", learning_rate=0.1)
    )
    tx = make_optimizer(config.optim, 10)
    mesh = data_mesh(1)
    step, _ = disposal_program(network, "gc", config, tx, mesh)
    teacher = steps.replicate(mesh, variables)
    params = []
    for lam in (0.1, 2.0):
        _, placed = disposal_program(network, "gc", dataclasses.replace(config, gc_lambda=lam), tx, mesh)
        state, _ = step(steps.init_state(variables, tx, 0, mesh), teacher, placed, source, target)
        params.append(jax.device_get(state["params"]["backbone"]))
    assert step._cache_size() == 1
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, *params)))  # λ is read
    d = Config().disposal
    assert program_key(dataclasses.replace(d, gc_lambda=0.1, fooling_lambda=9.0)) == program_key(d)
    assert program_key(dataclasses.replace(d, num_chunks=4)) != program_key(d)
