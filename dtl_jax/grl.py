"""Gradient reversal layer (docs/methods.md §2.1, DANN): identity forward, ``-alpha ×`` cotangent backward.

``R_α(x) = x`` and ``∂R_α/∂x = -α I``. Placed between the feature extractor and the domain classifier,
it lets one minimisation train the domain classifier to separate forget from validation representations
while pushing the features to make them indistinguishable.

It is a ``jax.custom_vjp`` and so has no JVP rule: keep it out of anything differentiated twice (e.g.
not inside ``gc_loss``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["gradient_reversal", "dann_alpha"]


@jax.custom_vjp
def gradient_reversal(x: jax.Array, alpha: jax.Array | float) -> jax.Array:
    """Returns ``x`` unchanged; its gradient is ``-alpha`` times the incoming cotangent.

    ``x`` may be any pytree of arrays; ``alpha`` a Python or traced scalar (it gets a zero cotangent).

    >>> import jax, jax.numpy as jnp
    >>> jax.grad(lambda x: jnp.sum(gradient_reversal(x, 0.5) * 3.0))(jnp.ones(2))
    Array([-1.5, -1.5], dtype=float32)
    """
    return x


def _forward(x, alpha):
    return x, alpha


def _backward(alpha, cotangent):
    reversed_ct = jax.tree.map(lambda g: (-alpha * g).astype(g.dtype), cotangent)
    return reversed_ct, jnp.zeros_like(jnp.asarray(alpha, dtype=jnp.result_type(float)))


gradient_reversal.defvjp(_forward, _backward)


def dann_alpha(progress: jax.Array | float, alpha_max: float = 1.0) -> jax.Array:
    """The DANN warm-up ``α_p = α_max · (2 / (1 + exp(-10 p)) - 1)`` for progress ``p ∈ [0, 1]``.

    >>> float(dann_alpha(0.0)), round(float(dann_alpha(1.0)), 4)
    (0.0, 0.9999)
    """
    return alpha_max * (2.0 / (1.0 + jnp.exp(-10.0 * jnp.asarray(progress, jnp.float32))) - 1.0)
