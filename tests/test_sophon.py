"""SOPHON-style suppression (dtl_jax/sophon.py, docs/methods.md §1.5): the suppression losses against
hand-computed values; the gradient through k simulated fine-tuning steps against central finite differences
in float64 on an MLP and on a CNN with BatchNorm (second order, exact); the first-order approximation
against its definition; k = 0; several attackers; a fresh head; an optax attacker; and the sharded form."""

import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dtl_jax import losses
from dtl_jax.config import ModelConfig
from dtl_jax.models import build, init_head
from dtl_jax.sophon import (
    SUPPRESSION_KINDS,
    per_example_suppression,
    simulated_finetune,
    sophon_loss,
    suppression_loss,
)

REPO = Path(__file__).resolve().parent.parent


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------------------------------------------
# The suppression losses


def _by_hand(z, y, kind):
    """Each example's loss from the definitions, in NumPy float64."""
    p = _softmax(z)
    rows = np.arange(len(y))
    if kind == "inverse_ce":
        return -np.log(1.0 - p[rows, y])
    if kind == "inverse_ce_logits":
        return -np.log(_softmax(1.0 - z)[rows, y])
    u = np.full_like(p, 1.0 / p.shape[-1])
    return np.sum(u * np.log(u / p), axis=-1)


@pytest.mark.parametrize("kind", SUPPRESSION_KINDS)
def test_suppression_losses_equal_their_definitions(x64, kind):
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(6, 4)) * 2.0, rng.integers(0, 4, size=6)
    expected = _by_hand(z, y, kind)
    np.testing.assert_allclose(per_example_suppression(jnp.asarray(z), jnp.asarray(y), kind), expected, rtol=1e-12)
    np.testing.assert_allclose(suppression_loss(jnp.asarray(z), jnp.asarray(y), kind), expected.mean(), rtol=1e-12)
    mask = np.array([1, 0, 1, 1, 0, 0], bool)
    masked = suppression_loss(jnp.asarray(z), jnp.asarray(y), kind, mask=jnp.asarray(mask))
    np.testing.assert_allclose(masked, expected[mask].mean(), rtol=1e-12)


def test_hand_computed_values():
    """``p = (1/2, 1/4, 1/4)``, label 0: ``−log(1 − 1/2)``; ``softmax(1 − z) = (2, 4, 4)/10`` so ``−log 0.2``;
    ``KL(u‖p) = log(1/3) − (log 1/2 + 2 log 1/4)/3``."""
    z = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
    y = jnp.array([0])
    assert float(suppression_loss(z, y, "inverse_ce")) == pytest.approx(math.log(2), rel=1e-6)
    assert float(suppression_loss(z, y, "inverse_ce_logits")) == pytest.approx(math.log(5), rel=1e-6)
    kl = -math.log(3) - (math.log(0.5) + 2 * math.log(0.25)) / 3
    assert float(suppression_loss(z, y, "kl_uniform")) == pytest.approx(kl, rel=1e-5)


def test_kl_uniform_is_utf_minus_log_classes(x64):
    z = jnp.asarray(np.random.default_rng(1).normal(size=(5, 7)))
    y = jnp.zeros(5, int)
    utf = losses.uniform_target_fooling(z)
    np.testing.assert_allclose(suppression_loss(z, y, "kl_uniform"), utf - math.log(7), rtol=1e-12)


def test_inverse_ce_is_finite_for_a_confident_model(x64):
    """``p_y = 1`` in float arithmetic: ``−log(1 − p_y)`` naively is ``inf``; the log-sum-exp form is ``≈ 200``,
    with finite first and second derivatives, and minimising it lowers the true class's logit."""
    z = jnp.array([[200.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    y = jnp.array([0, 1])
    value = per_example_suppression(z, y, "inverse_ce")
    assert value[0] == pytest.approx(200.0 - math.log(1 + math.exp(-1)), rel=1e-12)
    f = lambda z: suppression_loss(z, y, "inverse_ce")  # noqa: E731
    grad = jax.grad(f)(z)
    hessian = jax.hessian(f)(z)
    assert np.all(np.isfinite(grad)) and np.all(np.isfinite(hessian))
    assert grad[0, 0] > 0 and grad[1, 1] > 0  # descent lowers z_y


def test_bad_kind_and_single_class_are_errors():
    with pytest.raises(ValueError, match="unknown suppression loss 'ce'"):
        suppression_loss(jnp.zeros((2, 3)), jnp.zeros(2, int), "ce")
    with pytest.raises(ValueError, match="at least 2 classes"):
        suppression_loss(jnp.zeros((2, 1)), jnp.zeros(2, int), "inverse_ce")


# ---------------------------------------------------------------------------------------------------
# The loss after simulated fine-tuning, on real networks (float64)

MODELS = {
    "mlp": (ModelConfig(name="mlp", widths=(6,)), (3, 3, 1)),
    "cnn_bn": (ModelConfig(name="cnn", widths=(3,), batch_norm=True), (6, 6, 1)),
}
NUM_CLASSES = 3


def _problem(model="mlp", kind="inverse_ce", batch=8, steps=3, seed=0):
    """Float64 params and ``steps + 1`` inner batches (the last is for the outer losses); loss functions
    through the train-mode forward of the source head (new BatchNorm statistics dropped)."""
    config, shape = MODELS[model]
    network = build(config)
    variables = network.init(jax.random.PRNGKey(seed), shape, {"source": NUM_CLASSES})
    up = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)  # noqa: E731
    params, stats = up(variables["params"]), up(variables["batch_stats"])
    rng = np.random.default_rng(seed)
    batches = [
        {"image": jnp.asarray(rng.normal(size=(batch, *shape))), "label": jnp.asarray(rng.integers(0, 3, batch))}
        for _ in range(steps + 1)
    ]

    def logits(p, b, head="source"):
        return network.apply({"params": p, "batch_stats": stats}, b["image"], head=head, train=True)[0]

    inner = lambda p, b: losses.cross_entropy(logits(p, b), b["label"])  # noqa: E731
    outer = lambda p, b: suppression_loss(logits(p, b), b["label"], kind)  # noqa: E731
    return network, params, batches, inner, outer, logits


def _direction(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _vdot(a, b):
    return sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _finite_difference(f, params, direction, eps=1e-6):
    """Central difference of ``f`` along ``direction``: ``(f(θ + εv) − f(θ − εv)) / 2ε``."""
    shift = lambda s: jax.tree.map(lambda p, v: p + s * v, params, direction)  # noqa: E731
    return (float(f(shift(eps))) - float(f(shift(-eps)))) / (2 * eps)


def _check_against_finite_differences(f, params, seeds=(0, 1, 2), rtol=1e-6):
    """``<∇f, v>`` against central differences along random directions; returns the directional derivatives."""
    f = jax.jit(f)
    grad = jax.jit(jax.grad(f))(params)
    derivatives = []
    for seed in seeds:
        v = _direction(params, seed)
        fd, analytic = _finite_difference(f, params, v), _vdot(grad, v)
        assert analytic == pytest.approx(fd, rel=rtol, abs=1e-9), (seed, analytic, fd)
        derivatives.append(analytic)
    return grad, derivatives


@pytest.mark.parametrize(("model", "steps"), [("mlp", 1), ("mlp", 3), ("cnn_bn", 2)])
def test_second_order_gradient_matches_finite_differences(x64, model, steps):
    """The exact gradient through ``k`` unrolled SGD steps; the first-order one differs from it by far more
    than the tolerance (so this test would catch a dropped Hessian term)."""
    _, params, batches, inner, outer, _ = _problem(model, steps=steps)
    lr = 0.5

    def loss(first_order):
        return lambda p: sophon_loss(inner, outer, p, batches[:steps], batches[steps], lr, first_order)

    grad, _ = _check_against_finite_differences(loss(False), params)
    first = jax.jit(jax.grad(loss(True)))(params)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(grad)))
    scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(grad))
    assert gap > 1e-3 * scale


@pytest.mark.parametrize("model", ["mlp", pytest.param("cnn_bn", marks=pytest.mark.slow)])
def test_trajectory_mean_gradient_matches_finite_differences(x64, model):
    """One outer batch per step (the reference's form): ``1/k Σ_j S(θ_j; Q_j)``, value and gradient."""
    steps = 3
    _, params, batches, inner, outer, _ = _problem(model, kind="kl_uniform", steps=2 * steps)
    inner_batches, outer_batches = batches[:steps], batches[steps : 2 * steps]
    f = lambda p: sophon_loss(inner, outer, p, inner_batches, outer_batches, 0.5)  # noqa: E731
    _check_against_finite_differences(f, params)
    thetas = [simulated_finetune(inner, params, inner_batches[:j], 0.5) for j in range(1, steps + 1)]
    expected = np.mean([outer(t, q) for t, q in zip(thetas, outer_batches)])
    np.testing.assert_allclose(f(params), expected, rtol=1e-12)


def test_zero_steps_is_the_plain_suppression_loss(x64):
    _, params, batches, inner, outer, _ = _problem("cnn_bn")
    plain_value, plain_grad = jax.value_and_grad(outer)(params, batches[0])
    for first_order in (False, True):
        f = lambda p, fo=first_order: sophon_loss(inner, outer, p, [], batches[0], 0.5, fo)  # noqa: E731
        value, grad = jax.value_and_grad(f)(params)
        assert float(value) == float(plain_value)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), grad, plain_grad)
    assert simulated_finetune(inner, params, [], 0.5) is params


def test_first_order_is_the_outer_gradient_at_the_fine_tuned_weights(x64):
    """MAML-FO: one step: ``∇S(θ_1)``; along the trajectory: ``1/k Σ_j ∇S(θ_j; Q_j)``; the value is the
    second-order one's."""
    _, params, batches, inner, outer, _ = _problem("cnn_bn", steps=6)
    theta1 = simulated_finetune(inner, params, batches[:1], 0.3)
    f1 = lambda p, fo: sophon_loss(inner, outer, p, batches[:1], batches[1], 0.3, fo)  # noqa: E731
    expected = jax.grad(outer)(theta1, batches[1])
    got = jax.grad(f1)(params, True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), got, expected)
    assert float(f1(params, True)) == pytest.approx(float(f1(params, False)), rel=1e-12)

    inner_batches, outer_batches = batches[:3], batches[3:6]
    thetas = [simulated_finetune(inner, params, inner_batches[:j], 0.3) for j in (1, 2, 3)]
    grads = [jax.grad(outer)(t, q) for t, q in zip(thetas, outer_batches)]
    expected = jax.tree.map(lambda *g: sum(g) / 3, *grads)
    got = jax.grad(lambda p: sophon_loss(inner, outer, p, inner_batches, outer_batches, 0.3, True))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), got, expected)


def test_simulated_finetune_takes_plain_sgd_steps(x64):
    _, params, batches, inner, _, _ = _problem("mlp", steps=2)
    theta = params
    for b in batches[:2]:
        theta = jax.tree.map(lambda p, g: p - 0.1 * g, theta, jax.grad(inner)(theta, b))
    for first_order in (False, True):
        got = simulated_finetune(inner, params, batches[:2], 0.1, first_order)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), got, theta)


def test_several_attackers_are_averaged(x64):
    _, params, batches, inner, outer, _ = _problem("mlp", steps=2)

    def f(p, lr, first_order=False):
        return sophon_loss(inner, outer, p, batches[:2], batches[2], lr, first_order)

    for first_order in (False, True):
        value, grad = jax.value_and_grad(f)(params, (0.1, 0.4), first_order)
        singles = [jax.value_and_grad(f)(params, lr, first_order) for lr in (0.1, 0.4)]
        assert float(value) == pytest.approx(np.mean([float(v) for v, _ in singles]), rel=1e-12)
        mean = jax.tree.map(lambda a, b: (a + b) / 2, singles[0][1], singles[1][1])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), grad, mean)
    assert float(f(params, (0.1, 0.4))) != pytest.approx(float(f(params, 0.1)), rel=1e-6)  # they differ


def test_fresh_head_fine_tuned_but_not_differentiated(x64):
    """The piggyback attacker's form: the backbone with a fresh head, both fine-tuned; the gradient (with
    respect to the backbone only) through the steps against finite differences."""
    _, params, batches, _, _, logits = _problem("cnn_bn", steps=2)
    features_dim = params["heads"]["source"]["kernel"].shape[0]
    fresh = jax.tree.map(lambda x: x.astype(jnp.float64), init_head(jax.random.PRNGKey(7), features_dim, 3))

    def as_params(backbone, head):
        return {"backbone": backbone, "heads": {"fresh": head}}

    inner = lambda q, b: losses.cross_entropy(logits(q, b, "fresh"), b["label"])  # noqa: E731
    outer = lambda q, b: suppression_loss(logits(q, b, "fresh"), b["label"], "inverse_ce")  # noqa: E731

    def f(backbone):
        return sophon_loss(inner, outer, as_params(backbone, fresh), batches[:2], batches[2], 0.5)

    _check_against_finite_differences(f, params["backbone"])
    adapted = simulated_finetune(inner, as_params(params["backbone"], fresh), batches[:2], 0.5)
    assert float(jnp.max(jnp.abs(adapted["heads"]["fresh"]["kernel"] - fresh["kernel"]))) > 1e-3


def test_optax_attacker(x64):
    """An optax attacker (SGD with momentum): the steps equal the optimiser's, and the gradient through them
    matches finite differences."""
    _, params, batches, inner, outer, _ = _problem("mlp", steps=3)
    tx = optax.sgd(0.2, momentum=0.9)
    theta, state = params, tx.init(params)
    for b in batches[:3]:
        update, state = tx.update(jax.grad(inner)(theta, b), state, theta)
        theta = optax.apply_updates(theta, update)
    momentum = partial(optax.sgd, momentum=0.9)
    got = simulated_finetune(inner, params, batches[:3], 0.2, optimizer=momentum)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), got, theta)
    f = lambda p: sophon_loss(inner, outer, p, batches[:3], batches[3], 0.2, optimizer=momentum)  # noqa: E731
    _check_against_finite_differences(f, params)
    first = jax.grad(lambda p: sophon_loss(inner, outer, p, batches[:3], batches[3], 0.2, True, optimizer=momentum))
    expected = jax.grad(outer)(theta, batches[3])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), first(params), expected)


def _max_rel(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-300))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize(
    ("model", "along", "optimizer", "lrs"),
    [
        ("mlp", False, None, 0.5),
        ("mlp", True, "adam", (0.05, 0.2)),
        pytest.param("cnn_bn", False, "momentum", 0.3, marks=pytest.mark.slow),
        pytest.param("cnn_bn", True, None, (0.2, 0.5), marks=pytest.mark.slow),
    ],
)
def test_hvp_gradient_equals_reverse_over_reverse(x64, model, along, optimizer, lrs):
    """The custom-VJP (HVP) second order and ``jax.grad`` through the unrolled steps: the same gradient."""
    _, params, batches, inner, outer, _ = _problem(model, steps=6)
    opt = {"adam": optax.adam, "momentum": partial(optax.sgd, momentum=0.9), None: None}[optimizer]
    outer_batch = batches[3:6] if along else batches[3]

    def f(p, mode):
        return sophon_loss(inner, outer, p, batches[:3], outer_batch, lrs, second_order=mode, optimizer=opt)

    (v_hvp, g_hvp), (v_rev, g_rev) = (
        jax.jit(jax.value_and_grad(f), static_argnums=1)(params, m) for m in ("hvp", "reverse")
    )
    assert float(v_hvp) == pytest.approx(float(v_rev), rel=1e-12)
    assert _max_rel(g_hvp, g_rev) < 1e-10


def test_head_only_attacker_differentiates_the_closed_over_backbone(x64):
    """The attacker fine-tunes the head only; the losses close over the backbone (and the outer one over a
    temperature). The gradient with respect to (backbone, temperature) through the head's steps: HVP mode
    (cotangents of the closed-over constants via the mixed second derivative) against reverse mode and
    finite differences."""
    _, params, batches, _, _, logits = _problem("cnn_bn", steps=3)

    def f(outer_params, mode):
        backbone, temperature = outer_params["backbone"], outer_params["temperature"]
        full = lambda head: {"backbone": backbone, "heads": {"source": head}}  # noqa: E731
        inner = lambda h, b: losses.cross_entropy(logits(full(h), b), b["label"])  # noqa: E731
        outer = lambda h, b: suppression_loss(logits(full(h), b) / temperature, b["label"], "kl_uniform")  # noqa: E731
        head = params["heads"]["source"]
        return sophon_loss(inner, outer, head, batches[:3], batches[3], (0.5, 1.0), second_order=mode)

    point = {"backbone": params["backbone"], "temperature": jnp.asarray(1.5)}
    grad, _ = _check_against_finite_differences(lambda q: f(q, "hvp"), point)
    assert _max_rel(grad, jax.grad(f)(point, "reverse")) < 1e-10
    assert float(jnp.abs(grad["temperature"])) > 0


def test_hvp_mode_needs_batches_of_one_shape(x64):
    _, params, batches, inner, outer, _ = _problem("mlp", steps=2)
    short = jax.tree.map(lambda x: x[:5], batches[1])
    with pytest.raises(ValueError, match="of one shape"):
        sophon_loss(inner, outer, params, [batches[0], short], batches[2], 0.1)
    value = sophon_loss(inner, outer, params, [batches[0], short], batches[2], 0.1, second_order="reverse")
    assert np.isfinite(float(value))


def test_bad_arguments_are_errors():
    f = lambda p, b: jnp.sum(p)  # noqa: E731
    params = jnp.ones(2)
    with pytest.raises(TypeError, match="list or tuple"):
        sophon_loss(f, f, params, {"image": params}, None, 0.1)
    with pytest.raises(ValueError, match="at least one simulated attacker"):
        sophon_loss(f, f, params, [None], None, ())
    with pytest.raises(ValueError, match="one per step"):
        sophon_loss(f, f, params, [None, None], [None], 0.1)
    with pytest.raises(ValueError, match="one per step"):
        sophon_loss(f, f, params, [], [], 0.1)
    with pytest.raises(ValueError, match="second_order='rev'"):
        sophon_loss(f, f, params, [None], None, 0.1, second_order="rev")


# ---------------------------------------------------------------------------------------------------
# Sharded: shares summed over devices give the one-device loss and gradient


SHARDED_CASES = ("first_order", "hvp", "reverse", "head_only", "hvp_invariant")


def sharded_against_unsharded(devices: int, cases=SHARDED_CASES) -> dict:
    """``sophon_loss`` under ``jax.shard_map`` over ``devices`` devices (batches split by examples, loss
    functions returning this device's share) against the unsharded computation, for first order and both
    second-order modes; the parameters device-varying with the gradient shares summed (as in the disposal
    step) or invariant (JAX sums them); the head-only attacker with the losses closed over the backbone.
    Returns the worst relative errors of the value and the gradient for each case."""
    _, params, batches, _, _, logits = _problem("mlp", batch=8, steps=3)
    mesh = Mesh(np.array(jax.devices()[:devices]), ("d",))
    lrs = (0.3, 0.6)

    def losses_for(share, backbone=None):
        def full(p):
            return p if backbone is None else {"backbone": backbone, "heads": {"source": p}}

        def inner(p, b):
            return losses.cross_entropy(logits(full(p), b), b["label"]) * share

        def outer(p, b):
            return suppression_loss(logits(full(p), b), b["label"], "inverse_ce") * share

        return inner, outer

    def objective(p, bs, share, case, axis_name=None):
        first_order, mode = case in ("first_order",), "reverse" if case == "reverse" else "hvp"
        if case == "head_only":
            inner, outer = losses_for(share, p["backbone"])
            head = p["heads"]["source"]
            return sophon_loss(inner, outer, head, bs[:3], bs[3], lrs, axis_name=axis_name)
        inner, outer = losses_for(share)
        return sophon_loss(inner, outer, p, bs[:3], bs[3], lrs, first_order, second_order=mode, axis_name=axis_name)

    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-300))  # noqa: E731
    # the fine-tuned weights from device-invariant parameters (their gradient would be summed already)
    inner_share, inner = losses_for(1 / devices)[0], losses_for(1.0)[0]
    fine_tune = lambda p, bs: simulated_finetune(inner_share, p, bs[:3], 0.3, axis_name="d")  # noqa: E731
    got = jax.jit(jax.shard_map(fine_tune, mesh=mesh, in_specs=(P(), P("d")), out_specs=P()))(params, batches)
    want = simulated_finetune(inner, params, batches[:3], 0.3)
    errors = {"theta_k": {"value": max(rel(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))}}
    errors["theta_k"]["grad"] = 0.0
    for case in cases:

        def local(p, bs, case=case):
            f = lambda q: objective(q, bs, 1 / devices, case, axis_name="d")  # noqa: E731
            if case == "hvp_invariant":  # JAX sums the gradient shares of invariant parameters itself
                value, grads = jax.value_and_grad(f)(p)
                return jax.lax.psum(value, "d"), grads
            value, grads = jax.value_and_grad(f)(jax.lax.pcast(p, "d", to="varying"))
            return jax.lax.psum(value, "d"), jax.lax.psum(grads, "d")

        sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P(), P())))
        value, grads = sharded(params, batches)
        want_value, want_grads = jax.jit(jax.value_and_grad(lambda p, c=case: objective(p, batches, 1.0, c)))(params)
        errors[case] = {
            "value": rel(value, want_value),
            "grad": max(rel(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True)),
        }
    return errors


def test_sharded_on_one_device_equals_unsharded(x64):
    for name, errors in sharded_against_unsharded(1, ("hvp", "head_only")).items():
        assert errors["value"] < 1e-12 and errors["grad"] < 1e-10, (name, errors)


@pytest.mark.slow
def test_sharded_on_two_devices_equals_unsharded(tmp_path):
    """Two CPU devices (a subprocess: JAX fixes its device count when it starts), float64."""
    script = (
        "import json, jax; jax.config.update('jax_enable_x64', True); "
        "from test_sophon import sharded_against_unsharded; "
        "print(json.dumps(sharded_against_unsharded(2)))"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, errors in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert errors["value"] < 1e-12 and errors["grad"] < 1e-10, (name, errors)


@pytest.mark.slow
def test_a_digits_run_with_gc_and_sophon_has_a_sophon_row(tmp_path, capsys):
    """The issue's check: `dtl-jax run configs/digits.py --set disposal.methods=gc,sophon` finishes with a
    sophon row (printed and in results.json, with a finite PL accuracy)."""
    from dtl_jax import cli

    argv = ["run", str(REPO / "configs" / "digits.py"), "--set", "disposal.methods=gc,sophon", "--quiet"]
    assert cli.main([*argv, "--workdir", str(tmp_path / "w")]) == 0
    assert any(line.startswith("sophon ") for line in capsys.readouterr().out.splitlines())
    models = json.loads((tmp_path / "w" / "results.json").read_text())["models"]
    assert set(models) == {"random_init", "tl", "gc", "sophon"}
    assert np.isfinite(models["sophon"]["pl_acc"]) and np.isfinite(models["sophon"]["target_acc"])
