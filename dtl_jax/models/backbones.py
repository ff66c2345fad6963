"""Backbones (Flax Linen): each maps images ``[B, H, W, C]`` to features ``[B, D]``.

``train`` switches BatchNorm between batch statistics (and updating the running averages in the
``batch_stats`` collection) and the running averages.

``dtype`` is the compute dtype (mixed precision, the flax ImageNet example's ``half_precision``):
``jnp.bfloat16`` runs every convolution, dense layer and activation in bfloat16 while the parameters
(``param_dtype``), BatchNorm's statistics (flax reduces them in float32) and the optimiser state stay
float32; the features are returned in float32, so heads, losses and GC's inner products are float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


@jax.custom_jvp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 (VALID: an odd last row or column is dropped): ``nn.max_pool(x, (2, 2),
    (2, 2))`` in value and in derivative, bit for bit, written as elementwise maxima of four strided views
    so that its gradient is a compare-and-select rather than XLA's ``select_and_scatter``, which is much
    slower on XLA:CPU (``benchmarks/gc_step.py`` times the small CNN's steps).

    Ties (frequent: flat image regions give equal convolution outputs) go where ``nn.max_pool`` sends them:
    the whole derivative to the first maximal element of the window in row-major order. (``jnp.max``'s own
    rule would split it evenly: also a subgradient, but a different training trajectory.)
    """
    return _max4(*_windows(x))


def _windows(x):
    x = x[:, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2]
    return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


def _max4(a, b, c, d):
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _first_maximal(a, b, c, d):
    """Masks ``(take_a, take_b, take_c)`` (else ``d``) of the first maximal view in row-major order, from
    comparisons between the views alone."""
    take_a = (a >= b) & (a >= c) & (a >= d)
    take_b = ~take_a & (b >= c) & (b >= d)
    take_c = ~take_a & ~take_b & (c >= d)
    return take_a, take_b, take_c


@max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
    # The tangent of the first maximal view, chosen by comparing the views with each other. (Not by
    # comparing each view with the pooled output: under jit XLA may recompute the input in two fusions with
    # different rounding (BatchNorm's arithmetic before the pool does), and then no view equalled the output
    # and the tangent went to the last view: a wrong gradient, seen with BatchNorm and only jitted;
    # tests/test_models.py.)
    views, (ta, tb, tc, td) = _windows(primals[0]), _windows(tangents[0])
    out = max_pool_2x2(primals[0])  # itself, so that derivatives of this rule use this rule
    take_a, take_b, take_c = _first_maximal(*views)
    return out, jnp.where(take_a, ta, jnp.where(take_b, tb, jnp.where(take_c, tc, td)))


def _compute(x: jax.Array, dtype) -> jax.Array:
    """The input in the compute dtype (unchanged when there is none: float32, or float64 in tests)."""
    return x if dtype is None else x.astype(dtype)


def _features(x: jax.Array, dtype) -> jax.Array:
    """Features leave a reduced-precision backbone in float32 (heads, losses and GC in float32)."""
    return x if dtype is None else x.astype(jnp.float32)


class MLP(nn.Module):
    """Flatten, then ``Dense -> ReLU`` for each width."""

    widths: Sequence[int] = (128, 128)
    dtype: jnp.dtype | None = None  # compute dtype; None: the inputs' and parameters' own

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = _compute(x.reshape(x.shape[0], -1), self.dtype)
        for width in self.widths:
            x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
        return _features(x, self.dtype)


class CNN(nn.Module):
    """Small CNN: per width, two 3x3 convolutions (optional BatchNorm) with ReLU, then 2x2 max-pool;
    global average pooling at the end. ``widths=(16, 32, 64)`` is 6 convolutions, 64 features."""

    widths: Sequence[int] = (16, 32, 64)
    batch_norm: bool = False
    dtype: jnp.dtype | None = None  # compute dtype; None: the inputs' and parameters' own

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _compute(x, self.dtype)
        for width in self.widths:
            for _ in range(2):
                x = nn.Conv(width, (3, 3), use_bias=not self.batch_norm, dtype=self.dtype)(x)
                if self.batch_norm:
                    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
                x = nn.relu(x)
            x = max_pool_2x2(x)
        return jnp.mean(_features(x, self.dtype), axis=(1, 2))


class BasicBlock(nn.Module):
    width: int
    stride: int = 1
    dtype: jnp.dtype | None = None  # compute dtype; None: the inputs' and parameters' own

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)  # noqa: E731
        conv = lambda *a, **k: nn.Conv(*a, use_bias=False, dtype=self.dtype, **k)  # noqa: E731
        y = conv(self.width, (3, 3), (self.stride, self.stride))(x)
        y = nn.relu(norm()(y))
        y = conv(self.width, (3, 3))(y)
        y = norm()(y)
        if self.stride != 1 or x.shape[-1] != self.width:
            x = conv(self.width, (1, 1), (self.stride, self.stride))(x)
            x = norm()(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: a 3x3 stem (no max-pool), four stages of two basic blocks."""

    widths: Sequence[int] = (64, 128, 256, 512)
    dtype: jnp.dtype | None = None  # compute dtype; None: the inputs' and parameters' own

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.widths[0], (3, 3), use_bias=False, dtype=self.dtype)(_compute(x, self.dtype))
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x))
        for stage, width in enumerate(self.widths):
            for block in range(2):
                x = BasicBlock(width, 2 if stage > 0 and block == 0 else 1, self.dtype)(x, train)
        return jnp.mean(_features(x, self.dtype), axis=(1, 2))
