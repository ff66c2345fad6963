import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtl_jax.config import ModelConfig
from dtl_jax.models import build


@pytest.mark.parametrize(
    ("config", "image"),
    [
        (ModelConfig(name="mlp", widths=(8,)), (8, 8, 1)),
        (ModelConfig(name="cnn", widths=(4, 8)), (8, 8, 3)),
        (ModelConfig(name="cnn", widths=(4, 8), batch_norm=True), (8, 8, 3)),
        (ModelConfig(name="resnet18", widths=(4, 4, 8, 8)), (16, 16, 3)),
    ],
)
def test_backbone_plus_named_heads(config, image):
    network = build(config)
    variables = network.init(jax.random.PRNGKey(0), image, {"source": 5, "target": 3})
    assert set(variables["params"]["heads"]) == {"source", "target"}
    x = jax.random.normal(jax.random.PRNGKey(1), (4, *image))
    logits, features, stats = network.apply(variables, x, head="target", train=True)
    chex.assert_shape(logits, (4, 3))
    assert features.shape[0] == 4
    has_bn = config.name == "resnet18" or config.batch_norm
    assert bool(variables["batch_stats"]) == has_bn
    if has_bn:  # train mode moves the running statistics; eval mode leaves them and is deterministic
        changed = jax.tree.map(lambda a, b: not np.allclose(a, b), stats, variables["batch_stats"])
        assert any(jax.tree.leaves(changed))
        _, _, same = network.apply(variables, x, head="source", train=False)
        chex.assert_trees_all_equal(same, variables["batch_stats"])
    # the apply is a pure function of its variables: jit gives the same result
    jitted = jax.jit(lambda v, x: network.apply(v, x, head="source", train=False)[0])(variables, x)
    chex.assert_trees_all_close(jitted, network.apply(variables, x, head="source", train=False)[0], rtol=1e-5)
    assert jnp.all(jnp.isfinite(jitted))


@pytest.mark.parametrize("shape", [(4, 8, 8, 3), (2, 7, 9, 5)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_equals_flax_bit_for_bit(shape, ties):
    """``max_pool_2x2`` is ``nn.max_pool(x, (2, 2), (2, 2))`` in value, gradient and HVP (forward-over-
    reverse), also where windows hold tied maxima (rounded inputs): ties go to the first in row-major order."""
    import flax.linen as nn

    from dtl_jax.models.backbones import max_pool_2x2

    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    if ties:
        x = jnp.round(x)  # many windows with equal maxima
    flax_pool = lambda y: nn.max_pool(y, (2, 2), (2, 2))  # noqa: E731
    np.testing.assert_array_equal(max_pool_2x2(x), flax_pool(x))
    weights = jax.random.normal(jax.random.PRNGKey(2), max_pool_2x2(x).shape)
    direction = jax.random.normal(jax.random.PRNGKey(3), shape)
    for pool_derivative in (jax.grad, lambda f: lambda y: jax.jvp(jax.grad(f), (y,), (direction,))[1]):
        ours, theirs = (
            pool_derivative(lambda y, pool=pool: jnp.sum(weights * pool(y) ** 2))(x)
            for pool in (max_pool_2x2, flax_pool)
        )
        np.testing.assert_array_equal(ours, theirs)
