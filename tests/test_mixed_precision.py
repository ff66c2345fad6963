"""Mixed precision (``model.dtype=bfloat16``): bfloat16 compute, float32 parameters, and GC's value and
gradient in bfloat16 against float32 on the same float32 parameters.

Measured here (jax 0.10.2, CPU; GC with K = 5 class chunks of 8, 16x16 inputs, random initialisation;
relative errors of the value and of the gradient's norm-2 difference): the default CNN 1.9e-3 and 8.0e-3;
a ResNet-18 of widths 16-128 4.4e-2 and 0.34 (cosine 0.94), where even the plain cross-entropy gradient
is 0.26 off (bfloat16's 8 mantissa bits over 17 layers with BatchNorm). The tolerances leave 3-5x margin.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtl_jax.config import ModelConfig
from dtl_jax.gc import gc_loss
from dtl_jax.losses import cross_entropy
from dtl_jax.models import build


def _gc(config: ModelConfig, dtype: str):
    net = build(dataclasses.replace(config, dtype=dtype))
    key = jax.random.PRNGKey(0)
    variables = net.init(key, (16, 16, 3), {"source": 5})
    batch = {"image": jax.random.normal(key, (40, 16, 16, 3)), "label": jnp.repeat(jnp.arange(5), 8)}

    def ce(params, b):
        logits, features, _ = net.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, b["image"], head="source", train=True
        )
        assert features.dtype == jnp.float32 and logits.dtype == jnp.float32
        return cross_entropy(logits, b["label"])

    value, grads = jax.jit(jax.value_and_grad(lambda p: gc_loss(ce, p, batch, 5)))(variables["params"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(grads))
    return float(value), np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)])


def _errors(config):
    (v32, g32), (v16, g16) = _gc(config, "float32"), _gc(config, "bfloat16")
    value = abs(v16 - v32) / abs(v32)
    grad = np.linalg.norm(g16 - g32) / np.linalg.norm(g32)
    cosine = float(g16 @ g32 / np.linalg.norm(g16) / np.linalg.norm(g32))
    return value, grad, cosine


def test_gc_in_bfloat16_against_float32_default_cnn():
    value, grad, cosine = _errors(ModelConfig())
    assert value <= 1e-2 and grad <= 4e-2 and cosine >= 0.999
    assert value > 0  # the two really ran in different precisions


@pytest.mark.slow
def test_gc_in_bfloat16_against_float32_resnet18():
    value, grad, cosine = _errors(ModelConfig(name="resnet18", widths=(16, 32, 64, 128)))
    assert value <= 0.15 and grad <= 0.8 and cosine >= 0.8


def test_bfloat16_compute_float32_parameters():
    net = build(ModelConfig(dtype="bfloat16", batch_norm=True))
    variables = net.init(jax.random.PRNGKey(0), (8, 8, 3), {"source": 3})
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    hlo = (
        jax.jit(lambda v, x: net.apply(v, x, head="source", train=False)[0])
        .lower(variables, jnp.zeros((2, 8, 8, 3)))
        .as_text()
    )
    assert "bf16" in hlo  # the convolutions run in bfloat16
