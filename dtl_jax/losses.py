"""Per-batch losses on logits (METHODS.md §1.2, §1.3). All return the mean over the batch.

Shapes: ``logits [B, C]`` float, ``labels [B]`` int in ``[0, C)``. ``mask [B]`` (optional, bool)
restricts the mean to the marked examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def per_example_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``-log softmax(logits)[label]`` for each example."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """CE: mean ``-log p(label)``.

    >>> import jax.numpy as jnp
    >>> round(float(cross_entropy(jnp.zeros((1, 4)), jnp.array([2]))), 4)  # log 4
    1.3863
    """
    return _mean(per_example_cross_entropy(logits, labels), mask)


def distillation(student: jax.Array, teacher: jax.Array, temperature: float = 4.0) -> jax.Array:
    """KD (TGT-KD / SRC-KD, §1.2): ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, batch mean.

    The teacher's logits are treated as constants.

    >>> import jax.numpy as jnp
    >>> float(distillation(jnp.ones((2, 3)), jnp.ones((2, 3))))
    0.0
    """
    teacher = jax.lax.stop_gradient(teacher)
    t_log = jax.nn.log_softmax(teacher / temperature)
    s_log = jax.nn.log_softmax(student / temperature)
    kl = jnp.sum(jnp.exp(t_log) * (t_log - s_log), axis=-1)
    return temperature**2 * jnp.mean(kl)


def random_wrong_labels(key: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """For each label, a label drawn uniformly from the ``num_classes - 1`` other classes."""
    return (labels + jax.random.randint(key, labels.shape, 1, num_classes)) % num_classes


def random_target_fooling(logits: jax.Array, labels: jax.Array, key: jax.Array) -> jax.Array:
    """RTF (§1.3): CE toward a uniformly random *wrong* label for each example."""
    return cross_entropy(logits, random_wrong_labels(key, labels, logits.shape[-1]))


def uniform_target_fooling(logits: jax.Array) -> jax.Array:
    """UTF (§1.3): CE toward the uniform distribution, ``-mean_c log p(c)``.

    >>> import jax.numpy as jnp
    >>> round(float(uniform_target_fooling(jnp.zeros((1, 4)))), 4)  # already uniform: log 4
    1.3863
    """
    return jnp.mean(-jnp.mean(jax.nn.log_softmax(logits), axis=-1))


def gradient_ascent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """GA (§1.3): ``-CE`` on the true labels."""
    return -cross_entropy(logits, labels)
