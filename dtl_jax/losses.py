"""Per-batch losses on logits (docs/methods.md §1.2, §1.3). All return the mean over the batch.

Shapes: ``logits [B, C]`` float, ``labels [B]`` int in ``[0, C)``. ``mask [B]`` (optional, bool)
restricts the mean to the marked examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax

from dtl_jax.errors import UserError


def _mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def per_example_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``-log softmax(logits)[label]`` for each example."""
    chex.assert_rank(logits, 2)  # shapes are checked once, when traced
    chex.assert_shape(labels, logits.shape[:1])
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
    chex.assert_equal_shape([student, teacher])
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


@dataclasses.dataclass(frozen=True)
class DisposalLoss:
    """One unlearning loss of the disposal stage (docs/methods.md §1.1, §1.3), on the source batch.

    ``family`` names the term function that computes it (``dtl_jax.disposal_objective.TERMS``) and the λ
    it is weighted by: ``collision``, a GC-family loss computed from the chunk gradients
    (``dtl_jax.gc.gc_loss``), ``normalized`` for NGC, ``bounded`` for ``max(GC, −m)``
    (``disposal.gc_bound``); ``fooling``, ``fooling(logits, labels)`` on the whole batch, where ``labels`` are
    the true labels or (``wrong_labels``) labels drawn uniformly from the other classes for the whole global
    batch before it is split over devices (so the draw does not depend on the device count); ``sophon``, the
    suppression loss after simulated fine-tuning (``dtl_jax.sophon``). ``separate_clip``: the retain and
    unlearning gradients are clipped apart (``disposal.term_clip``) before λ combines them, instead of only
    their sum (docs/methods.md §1.1).
    """

    family: str = "fooling"  # collision | fooling | sophon
    normalized: bool = False
    fooling: Callable[[jax.Array, jax.Array], jax.Array] | None = None
    wrong_labels: bool = False
    bounded: bool = False
    separate_clip: bool = False

    @property
    def collision(self) -> bool:
        return self.family == "collision"


# The one list of disposal methods: the experiment resolves disposal.methods against it, the disposal
# objective and the stage keys read it.
DISPOSAL_LOSSES: dict[str, DisposalLoss] = {
    "gc": DisposalLoss("collision"),
    "ngc": DisposalLoss("collision", normalized=True),
    "gc_sep": DisposalLoss("collision", separate_clip=True),
    "gc_bound": DisposalLoss("collision", bounded=True),
    "gc_sep_bound": DisposalLoss("collision", bounded=True, separate_clip=True),
    "sophon": DisposalLoss("sophon", separate_clip=True),
    "rtf": DisposalLoss(fooling=cross_entropy, wrong_labels=True),
    "utf": DisposalLoss(fooling=lambda logits, labels: uniform_target_fooling(logits)),
    "ga": DisposalLoss(fooling=gradient_ascent),
}


def disposal_loss(name: str) -> DisposalLoss:
    """The disposal loss called ``name``; an unknown name is a ``UserError`` (never a silent fallback)."""
    if name not in DISPOSAL_LOSSES:
        raise UserError(f"unknown disposal loss {name!r}: expected one of {', '.join(DISPOSAL_LOSSES)}")
    return DISPOSAL_LOSSES[name]
