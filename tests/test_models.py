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
