"""Each loss on inputs whose answer can be worked out by hand, jitted and not (``chex.variants``); the
disposal loss map."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtl_jax import losses
from dtl_jax.errors import UserError


class ByHandTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_cross_entropy_by_hand(self):
        logits = jnp.array([[0.0, jnp.log(3.0)], [0.0, 0.0]])  # p = [1/4, 3/4], [1/2, 1/2]
        got = self.variant(losses.cross_entropy)(logits, jnp.array([1, 0]))
        assert float(got) == pytest.approx((-np.log(0.75) - np.log(0.5)) / 2, rel=1e-6)
        masked = self.variant(losses.cross_entropy)(logits, jnp.array([1, 0]), jnp.array([True, False]))
        assert float(masked) == pytest.approx(-np.log(0.75), rel=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_distillation_by_hand(self):
        distillation = self.variant(losses.distillation)
        teacher = jnp.array([[jnp.log(3.0), 0.0]])  # p = [3/4, 1/4] at T=1
        student = jnp.array([[0.0, 0.0]])  # q = [1/2, 1/2]
        expected = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
        assert float(distillation(student, teacher, 1.0)) == pytest.approx(expected, rel=1e-6)
        # T² scaling: at T = 2 the teacher's logits are halved, the loss multiplied by 4
        half = jnp.array([[jnp.log(3.0) * 2, 0.0]])
        assert float(distillation(student, half, 2.0)) == pytest.approx(4 * expected, rel=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_distillation_sends_no_gradient_to_teacher(self):
        grad = self.variant(jax.grad(lambda t: losses.distillation(jnp.zeros((1, 3)), t)))
        assert np.all(np.asarray(grad(jnp.ones((1, 3)) * jnp.arange(3.0))) == 0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_random_target_fooling_never_picks_the_true_label(self):
        labels = jnp.arange(1000) % 5
        logits = jnp.zeros((1000, 5))

        @self.variant
        def targets(key):  # recover the random labels from the gradient of each row
            grad = jax.grad(lambda z: losses.random_target_fooling(z, labels, key))(logits)
            return jnp.argmin(grad, axis=-1)

        chosen = targets(jax.random.PRNGKey(0))
        assert not np.any(np.asarray(chosen) == np.asarray(labels))
        assert len(np.unique(np.asarray(chosen))) == 5
        # uniform logits: CE toward any label is log 5
        value = self.variant(losses.random_target_fooling)(logits, labels, jax.random.PRNGKey(0))
        assert float(value) == pytest.approx(np.log(5))

    @chex.variants(with_jit=True, without_jit=True)
    def test_uniform_target_fooling_is_minimal_at_uniform(self):
        utf = self.variant(losses.uniform_target_fooling)
        assert float(utf(jnp.zeros((2, 4)))) == pytest.approx(np.log(4), rel=1e-6)
        assert float(utf(jnp.array([[5.0, 0.0, 0.0, 0.0]]))) > np.log(4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_ascent_is_negative_cross_entropy(self):
        logits, labels = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([0])
        ga = self.variant(losses.gradient_ascent)(logits, labels)
        assert float(ga) == pytest.approx(-float(losses.cross_entropy(logits, labels)))


# --- the disposal loss map ------------------------------------------------------------------------------


def test_disposal_losses_are_the_methods_definitions():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    labels = jnp.array([0, 2])
    assert set(losses.DISPOSAL_LOSSES) == {"gc", "ngc", "gc_sep", "gc_bound", "gc_sep_bound", "sophon", "rtf", "utf",
                                           "ga"}  # fmt: skip
    gc, ngc = losses.disposal_loss("gc"), losses.disposal_loss("ngc")
    assert gc.collision and not gc.normalized and ngc.collision and ngc.normalized
    assert not (gc.bounded or gc.separate_clip or ngc.bounded or ngc.separate_clip)
    variants = {name: losses.disposal_loss(name) for name in ("gc_sep", "gc_bound", "gc_sep_bound")}
    assert all(v.collision and not v.normalized for v in variants.values())
    assert [(v.bounded, v.separate_clip) for v in variants.values()] == [(False, True), (True, False), (True, True)]
    assert losses.disposal_loss("sophon").family == "sophon" and not losses.disposal_loss("sophon").collision
    rtf, utf, ga = (losses.disposal_loss(name) for name in ("rtf", "utf", "ga"))
    assert rtf.wrong_labels and not (utf.wrong_labels or ga.wrong_labels)
    assert not (rtf.collision or utf.collision or ga.collision)
    # rtf: CE toward the (already drawn) wrong labels it is given; utf: toward uniform; ga: -CE
    assert float(rtf.fooling(logits, labels)) == pytest.approx(float(losses.cross_entropy(logits, labels)))
    assert float(utf.fooling(logits, labels)) == pytest.approx(float(losses.uniform_target_fooling(logits)))
    assert float(ga.fooling(logits, labels)) == pytest.approx(-float(losses.cross_entropy(logits, labels)))


def test_unknown_disposal_method_is_an_error_not_gradient_ascent():
    with pytest.raises(UserError, match=r"unknown disposal loss 'gradient_descent': expected one of gc, ngc"):
        losses.disposal_loss("gradient_descent")
    from dtl_jax.config import DisposalConfig
    from dtl_jax.disposal_objective import DisposalObjective

    with pytest.raises(UserError, match="unknown disposal loss 'mine'"):
        DisposalObjective.from_config(None, "mine", DisposalConfig())


@pytest.mark.parametrize("name", ["rtf", "utf", "ga", "ce", "kd"])
def test_batch_losses_are_means_of_their_per_example_values(name):
    """The disposal objective weights examples (padding out) by evaluating a batch loss example by example
    (``jax.vmap`` over batches of one) and taking a weighted sum (``disposal_objective.batch_mean``): right
    only for a mean of per-example terms, which every retain and fooling loss is."""
    rng = np.random.default_rng(0)
    logits, other = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32), jnp.asarray(rng.normal(size=(7, 4)))
    labels = jnp.asarray(rng.integers(0, 4, 7))
    loss, args = {
        "rtf": (losses.disposal_loss("rtf").fooling, (logits, labels)),
        "utf": (losses.disposal_loss("utf").fooling, (logits, labels)),
        "ga": (losses.disposal_loss("ga").fooling, (logits, labels)),
        "ce": (losses.cross_entropy, (logits, labels)),
        "kd": (lambda s, t: losses.distillation(s, t, 4.0), (logits, other)),
    }[name]
    per_example = jax.vmap(lambda *a: loss(*(x[None] for x in a)))(*args)
    chex.assert_shape(per_example, (7,))
    np.testing.assert_allclose(jnp.mean(per_example), loss(*args), rtol=1e-6)
