"""Gradient reversal layer and the DANN schedule (docs/methods.md §2.1), jitted and not (``chex.variants``)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from dtl_jax.grl import dann_alpha, gradient_reversal


class GradientReversalTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(alpha=[0.0, 0.5, 2.0], dtype=["float32", "bfloat16"])
    def test_identity_forward_negated_scaled_backward(self, alpha, dtype):
        x = jnp.arange(6.0, dtype=dtype).reshape(2, 3)
        cotangent = jnp.linspace(-1.0, 1.0, 6, dtype=dtype).reshape(2, 3)

        @self.variant
        def forward_and_backward(x, alpha, cotangent):
            out, vjp = jax.vjp(gradient_reversal, x, alpha)
            return out, vjp(cotangent)

        out, (dx, dalpha) = forward_and_backward(x, jnp.float32(alpha), cotangent)
        chex.assert_trees_all_equal(out, x)
        chex.assert_type([out, dx], jnp.dtype(dtype))
        chex.assert_trees_all_close(dx, (-alpha * cotangent.astype(jnp.float32)).astype(dtype))
        assert float(dalpha) == 0.0  # alpha is a schedule value, not a parameter

    @chex.variants(with_jit=True, without_jit=True)
    def test_reversed_branch_and_plain_branch_add(self):
        def loss(w, alpha):
            features = w * 2.0
            return jnp.sum(gradient_reversal(features, alpha) ** 2) + jnp.sum(features)

        w = jnp.array([1.0, -3.0])
        grad = self.variant(jax.grad(loss))(w, jnp.float32(0.25))
        # d/dw: the reversed branch -0.25 · 2·features · 2, plus the plain branch's 2
        chex.assert_trees_all_close(grad, -0.25 * 2 * (2 * w) * 2 + 2.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pytree_input(self):
        tree = {"a": jnp.ones(3), "b": (jnp.full((2,), 2.0),)}
        grads = self.variant(jax.grad(lambda t: sum(jnp.sum(x) for x in jax.tree.leaves(gradient_reversal(t, 3.0)))))(
            tree
        )
        chex.assert_trees_all_close(grads, jax.tree.map(lambda x: -3.0 * jnp.ones_like(x), tree))

    @chex.variants(with_jit=True, without_jit=True)
    def test_dann_schedule(self):
        progress = jnp.linspace(0.0, 1.0, 11)
        alphas = self.variant(lambda p: dann_alpha(p, 0.8))(progress)
        expected = 0.8 * (2.0 / (1.0 + np.exp(-10.0 * np.linspace(0.0, 1.0, 11))) - 1.0)
        chex.assert_trees_all_close(alphas, expected.astype(np.float32), rtol=1e-6)
        assert float(alphas[0]) == 0.0 and np.all(np.diff(np.asarray(alphas)) > 0) and float(alphas[-1]) < 0.8
