"""Each loss on inputs whose answer can be worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtl_jax import losses


def test_cross_entropy_by_hand():
    logits = jnp.array([[0.0, jnp.log(3.0)], [0.0, 0.0]])  # p = [1/4, 3/4], [1/2, 1/2]
    got = losses.cross_entropy(logits, jnp.array([1, 0]))
    assert float(got) == pytest.approx((-np.log(0.75) - np.log(0.5)) / 2, rel=1e-6)
    masked = losses.cross_entropy(logits, jnp.array([1, 0]), mask=jnp.array([True, False]))
    assert float(masked) == pytest.approx(-np.log(0.75), rel=1e-6)


def test_distillation_by_hand():
    teacher = jnp.array([[jnp.log(3.0), 0.0]])  # p = [3/4, 1/4] at T=1
    student = jnp.array([[0.0, 0.0]])  # q = [1/2, 1/2]
    expected = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
    assert float(losses.distillation(student, teacher, temperature=1.0)) == pytest.approx(expected, rel=1e-6)
    # T² scaling: at T = 2 the teacher's logits are halved, the loss multiplied by 4
    half = jnp.array([[jnp.log(3.0) * 2, 0.0]])
    assert float(losses.distillation(student, half, temperature=2.0)) == pytest.approx(4 * expected, rel=1e-5)


def test_distillation_sends_no_gradient_to_teacher():
    g = jax.grad(lambda t: losses.distillation(jnp.zeros((1, 3)), t))(jnp.ones((1, 3)) * jnp.arange(3.0))
    assert np.all(np.asarray(g) == 0)


def test_random_target_fooling_never_picks_the_true_label():
    labels = jnp.arange(1000) % 5
    logits = jnp.zeros((1000, 5))

    def targets(key):  # recover the random labels from the gradient of each row
        grad = jax.grad(lambda z: losses.random_target_fooling(z, labels, key))(logits)
        return jnp.argmin(grad, axis=-1)

    chosen = targets(jax.random.PRNGKey(0))
    assert not np.any(np.asarray(chosen) == np.asarray(labels))
    assert len(np.unique(np.asarray(chosen))) == 5
    # uniform logits: CE toward any label is log 5
    assert float(losses.random_target_fooling(logits, labels, jax.random.PRNGKey(0))) == pytest.approx(np.log(5))


def test_uniform_target_fooling_is_minimal_at_uniform():
    assert float(losses.uniform_target_fooling(jnp.zeros((2, 4)))) == pytest.approx(np.log(4), rel=1e-6)
    peaked = jnp.array([[5.0, 0.0, 0.0, 0.0]])
    assert float(losses.uniform_target_fooling(peaked)) > np.log(4)


def test_gradient_ascent_is_negative_cross_entropy():
    logits = jnp.array([[1.0, 2.0, 3.0]])
    assert float(losses.gradient_ascent(logits, jnp.array([0]))) == pytest.approx(
        -float(losses.cross_entropy(logits, jnp.array([0])))
    )
