"""GC / NGC: values and HVP gradients against independent references (float64), jitted and not
(``chex.variants``); dtypes; compiled memory."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.flatten_util import ravel_pytree

from dtl_jax.gc import gc_loss, pairwise_collision, split_chunks


def _problem(seed=0, n=12, d=3, h=5, c=3, dtype=jnp.float64):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {"w1": jax.random.normal(k1, (d, h), dtype), "w2": jax.random.normal(k2, (h, c), dtype)}
    batch = {"x": jax.random.normal(k3, (n, d), dtype), "y": jax.random.randint(k4, (n,), 0, c)}

    def loss(p, b):
        logits = jnp.tanh(b["x"] @ p["w1"]) @ p["w2"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(b["y"].shape[0]), b["y"]])

    return loss, params, batch


def _flat(tree):
    return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


def _explicit(loss, params, batch, k, normalized):
    """Reference: explicit per-chunk gradients, explicit double sum over pairs i != j."""
    chunks = split_chunks(batch, k)
    grads = [_flat(jax.grad(loss)(params, jax.tree.map(lambda x, i=i: x[i], chunks))) for i in range(k)]
    if normalized:
        grads = [g / jnp.sqrt(g @ g + 1e-12) for g in grads]
    return sum(grads[i] @ grads[j] for i in range(k) for j in range(k) if i != j) / (k * (k - 1))


def _options(mode):
    return {"low_memory": True} if mode == "low_memory" else {"hvp": mode}


@functools.cache
def _hessian_reference(normalized: bool) -> np.ndarray:
    """``Σ_k H_k v_k`` for ``_problem()`` with K = 4, each ``H_k`` materialised (float64; computed once)."""
    loss, params, batch = _problem()
    flat0, unravel = ravel_pytree(params)
    chunks = split_chunks(batch, 4)
    chunk_loss = [lambda f, i=i: loss(unravel(f), jax.tree.map(lambda x: x[i], chunks)) for i in range(4)]
    grads = [jax.grad(fn)(flat0) for fn in chunk_loss]
    directions = jax.grad(lambda gs: pairwise_collision(gs, normalized))(grads)
    return np.asarray(sum(jax.hessian(fn)(flat0) @ v for fn, v in zip(chunk_loss, directions)))


class Float64Test(chex.TestCase):
    """Each test runs with and without ``jax.jit`` around ``gc_loss`` (or ``jax.grad`` of it), in float64."""

    def setUp(self):
        super().setUp()
        jax.config.update("jax_enable_x64", True)

    def tearDown(self):
        jax.config.update("jax_enable_x64", False)
        super().tearDown()

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(normalized=[False, True], k=[2, 3, 4])
    def test_value_matches_explicit_pairs(self, normalized, k):
        loss, params, batch = _problem()
        got = self.variant(lambda p, b: gc_loss(loss, p, b, k, normalized=normalized))(params, batch)
        np.testing.assert_allclose(got, _explicit(loss, params, batch, k, normalized), rtol=1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(mode=["jvp", "linearize", "batched", "low_memory"], normalized=[False, True])
    def test_gradient_matches_hessian_reference(self, mode, normalized):
        """∇GC = Σ_k H_k v_k with H_k from jax.hessian (materialised, tiny model) and v_k = ∂φ/∂g_k."""
        loss, params, batch = _problem()
        expected = _hessian_reference(normalized)
        grad_fn = jax.grad(lambda p, b: gc_loss(loss, p, b, 4, normalized=normalized, **_options(mode)))
        got = _flat(self.variant(grad_fn)(params, batch))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)
        assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) < 1e-5

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(normalized=[False, True], k=[2, 3, 4])
    def test_low_memory_value_and_gradient_equal_default(self, normalized, k):
        loss, params, batch = _problem(seed=2)
        f = lambda p, low: gc_loss(loss, p, batch, k, normalized=normalized, low_memory=low)  # noqa: E731
        value, grad = self.variant(jax.value_and_grad(lambda p: f(p, True)))(params)
        ref_value, ref_grad = jax.value_and_grad(lambda p: f(p, False))(params)
        np.testing.assert_allclose(value, ref_value, rtol=1e-12)
        np.testing.assert_allclose(_flat(grad), _flat(ref_grad), rtol=1e-10, atol=1e-14)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(False, True)
    def test_gradient_matches_finite_differences(self, normalized):
        loss, params, batch = _problem(seed=1)
        f = lambda p: gc_loss(loss, p, batch, 3, normalized=normalized)  # noqa: E731
        grad = self.variant(jax.grad(f))(params)
        direction = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(7), x.shape, x.dtype), params)
        eps = 1e-6
        plus = f(jax.tree.map(lambda p, d: p + eps * d, params, direction))
        minus = f(jax.tree.map(lambda p, d: p - eps * d, params, direction))
        numeric = (plus - minus) / (2 * eps)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_matches_autodiff_of_definition(self):
        """The custom rule agrees with plain reverse-over-reverse autodiff of the definition."""
        loss, params, batch = _problem(seed=2)

        def brute(p):
            chunks = split_chunks(batch, 4)
            grads = [jax.grad(loss)(p, jax.tree.map(lambda x, i=i: x[i], chunks)) for i in range(4)]
            return pairwise_collision(grads)

        got = self.variant(jax.grad(lambda p: gc_loss(loss, p, batch, 4)))(params)
        chex.assert_trees_all_close(got, jax.grad(brute)(params), rtol=1e-10)


# float32 and bfloat16 against float64 on the same (rounded) inputs. Measured worst relative errors (value;
# gradient, relative to its largest entry) over seeds 3-7, GC and NGC, jvp and low_memory: float32 5.7e-7;
# 9.7e-7, bfloat16 8.4e-3; 2.0e-2 (8 mantissa bits: one rounding is up to 3.9e-3; sums of squares are taken
# in float32). The tolerances leave about 10x (float32) and 4-5x (bfloat16) of margin.
TOLERANCE = {"float32": (5e-6, 1e-5), "bfloat16": (4e-2, 8e-2)}


@pytest.mark.slow  # compiles every (dtype, loss, HVP path) twice: most of test_gc's fast-tier time otherwise
class DtypeTest(chex.TestCase):
    """float32 and bfloat16 in: the value and every gradient leaf in the same dtype, within ``TOLERANCE``
    of the float64 computation on the same inputs."""

    def setUp(self):
        super().setUp()
        jax.config.update("jax_enable_x64", True)  # for the reference only; the inputs carry their dtype

    def tearDown(self):
        jax.config.update("jax_enable_x64", False)
        super().tearDown()

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(  # each dtype with GC and NGC, each HVP path with both dtypes
        ("float32", False, "jvp"), ("float32", True, "low_memory"),
        ("bfloat16", False, "low_memory"), ("bfloat16", True, "jvp"),
    )  # fmt: skip
    def test_dtype_in_is_dtype_out_and_close_to_float64(self, dtype, normalized, mode):
        loss, params64, batch64 = _problem(seed=3, n=32, d=8, h=16, c=4)
        params = jax.tree.map(lambda x: x.astype(dtype), params64)
        batch = {"x": batch64["x"].astype(dtype), "y": batch64["y"].astype(jnp.int32)}
        f = lambda p, b: gc_loss(loss, p, b, 4, normalized=normalized, **_options(mode))  # noqa: E731
        value, grads = self.variant(jax.value_and_grad(f))(params, batch)
        chex.assert_type(value, jnp.dtype(dtype))
        chex.assert_type(jax.tree.leaves(grads), jnp.dtype(dtype))
        chex.assert_shape(value, ())
        up = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float64), tree)  # noqa: E731
        ref_value, ref_grads = jax.value_and_grad(f)(up(params), {"x": up(batch["x"]), "y": batch["y"]})
        value_tol, grad_tol = TOLERANCE[dtype]
        assert abs(float(value) - float(ref_value)) <= value_tol * abs(float(ref_value)), (value, ref_value)
        got, want = _flat(up(grads)), _flat(ref_grads)
        assert float(jnp.max(jnp.abs(got - want))) <= grad_tol * float(jnp.max(jnp.abs(want)))


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_low_memory_keeps_fewer_parameter_sized_buffers():
    """XLA's compiled temporary memory (deterministic, not a timing) for a parameter-dominated model: the
    default keeps the K chunk gradients and their directions (about 2K+1 parameter-sized buffers),
    ``low_memory`` G, the HVP sum and one chunk's gradient (about 3)."""
    params = {"w": jax.ShapeDtypeStruct((512, 256), jnp.float32), "v": jax.ShapeDtypeStruct((256, 4), jnp.float32)}
    batch = {"x": jax.ShapeDtypeStruct((32, 512), jnp.float32), "y": jax.ShapeDtypeStruct((32,), jnp.int32)}

    def loss(p, b):
        logits = jnp.tanh(b["x"] @ p["w"]) @ p["v"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(b["y"].shape[0]), b["y"]])

    param_bytes = 4 * (512 * 256 + 256 * 4)
    default = _temp_bytes(jax.grad(lambda p, b: gc_loss(loss, p, b, 4)), params, batch)
    low = _temp_bytes(jax.grad(lambda p, b: gc_loss(loss, p, b, 4, low_memory=True)), params, batch)
    print(f"temp / parameter bytes: default {default / param_bytes:.2f}, low_memory {low / param_bytes:.2f}")
    assert default >= 5 * param_bytes, (default, param_bytes)
    assert low <= 4 * param_bytes, (low, param_bytes)


@pytest.mark.slow  # compiles a conv net's GC gradient twice (about 10 s of the fast tier otherwise)
def test_low_memory_keeps_one_chunk_of_activations_in_a_conv_net():
    """Activation-dominated: the default keeps every chunk's activations for the HVPs, ``low_memory`` one
    chunk's at a time (measured 0.27x the default's temporary memory)."""
    from dtl_jax.config import ModelConfig
    from dtl_jax.models import build

    network = build(ModelConfig(name="cnn", widths=(8, 16)))
    variables = network.init(jax.random.PRNGKey(0), (16, 16, 3), {"source": 4})
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables["params"])
    batch = {"x": jax.ShapeDtypeStruct((64, 16, 16, 3), jnp.float32), "y": jax.ShapeDtypeStruct((64,), jnp.int32)}

    def loss(p, b):
        logits, _, _ = network.apply({"params": p, "batch_stats": {}}, b["x"], head="source", train=True)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(b["y"].shape[0]), b["y"]])

    default = _temp_bytes(jax.grad(lambda p, b: gc_loss(loss, p, b, 4)), params, batch)
    low = _temp_bytes(jax.grad(lambda p, b: gc_loss(loss, p, b, 4, low_memory=True)), params, batch)
    print(f"low_memory / default temporary memory: {low / default:.2f}")
    assert low <= 0.5 * default, (low, default)


def _batch_norm_problem(model_config, num_examples: int):
    """A float64 network with BatchNorm in train mode (its statistics per call, so per chunk under GC), its
    variables, a batch of 8x8 images with 3 classes, and its cross-entropy ``ce(params, batch)``."""
    from dtl_jax.models import build

    network = build(model_config)
    variables = jax.tree.map(
        lambda x: x.astype(jnp.float64), network.init(jax.random.PRNGKey(0), (8, 8, 3), {"source": 3})
    )
    images = jax.random.normal(jax.random.PRNGKey(1), (num_examples, 8, 8, 3), jnp.float64)
    batch = {"image": images, "label": jnp.arange(num_examples) % 3}

    def ce(p, b):
        logits, _, _ = network.apply(
            {"params": p, "batch_stats": variables["batch_stats"]}, b["image"], head="source", train=True
        )
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(b["label"].shape[0]), b["label"]])

    return variables, batch, ce


def _batched_and_jvp(ce, params, batch, num_chunks, normalized=False):
    def run(mode):
        loss = lambda p: gc_loss(ce, p, batch, num_chunks, normalized=normalized, hvp=mode)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    return run("batched"), run("jvp")


@pytest.mark.parametrize("normalized", [False, True])
def test_batched_equals_unrolled_with_per_chunk_batch_norm(normalized, x64):
    """``hvp="batched"`` (chunks side by side under ``jax.vmap``) on a conv net with BatchNorm in train mode:
    each chunk keeps its own batch statistics, so the value and gradient equal the unrolled ``"jvp"`` mode's
    (float64; the vmapped path meets a max-pool, grouped convolutions and the BatchNorm reductions)."""
    from dtl_jax.config import ModelConfig

    variables, batch, ce = _batch_norm_problem(ModelConfig(name="cnn", widths=(4, 6), batch_norm=True), 12)
    (value, grad), (ref_value, ref_grad) = _batched_and_jvp(ce, variables["params"], batch, 3, normalized)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    scale = float(jnp.max(jnp.abs(_flat(ref_grad))))
    np.testing.assert_allclose(_flat(grad), _flat(ref_grad), rtol=1e-9, atol=1e-12 * scale)
    # the statistics are the chunks' own: the mean of the chunk losses is not the whole batch's loss
    chunks = [jax.tree.map(lambda x, k=k: x[4 * k : 4 * k + 4], batch) for k in range(3)]
    per_chunk = sum(float(ce(variables["params"], c)) for c in chunks) / 3
    assert abs(per_chunk - float(ce(variables["params"], batch))) > 1e-6


@pytest.mark.slow  # compiles ResNet-18's GC gradient twice in float64 (about 40 s on two cores)
def test_batched_equals_unrolled_on_resnet18_in_float64(x64):
    """The same on ResNet-18 (narrow: residual blocks, strided convolutions, projection shortcuts, BatchNorm in
    train mode per chunk). In float32 the two modes differ by up to a few 1e-2 in a leaf's largest entry at
    full width (``benchmarks/gc_precision.py``), but so does each from the float64 value: float32 rounding in
    GC's cancellations, not a bug. In float64 the modes must agree to rounding, leaf by leaf."""
    from dtl_jax.config import ModelConfig

    variables, batch, ce = _batch_norm_problem(ModelConfig(name="resnet18", widths=(4, 4, 8, 8)), 8)
    (value, grad), (ref_value, ref_grad) = _batched_and_jvp(ce, variables["params"], batch, 4)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for leaf, ref in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(leaf, ref, rtol=1e-9, atol=1e-11 * float(jnp.max(jnp.abs(ref))) + 1e-300)


def test_jit_agrees_with_eager_and_closure_over_traced_values():
    loss, params, batch = _problem(dtype=jnp.float32)

    def outer(p, scale):  # loss_fn closes over a traced array: closure_convert must hoist it
        return gc_loss(lambda q, b: scale * loss(q, b), p, batch, 4)

    eager = jax.value_and_grad(outer)(params, jnp.float32(2.0))
    jitted = jax.jit(jax.value_and_grad(outer))(params, jnp.float32(2.0))
    chex.assert_trees_all_close(eager, jitted, rtol=1e-5)
    linearized = jax.jit(
        jax.value_and_grad(lambda p, s: gc_loss(lambda q, b: s * loss(q, b), p, batch, 4, hvp="linearize"))
    )(params, jnp.float32(2.0))
    chex.assert_trees_all_close(eager, linearized, rtol=1e-5)
    batched = jax.jit(
        jax.value_and_grad(lambda p, s: gc_loss(lambda q, b: s * loss(q, b), p, batch, 4, hvp="batched"))
    )(params, jnp.float32(2.0))
    chex.assert_trees_all_close(eager, batched, rtol=1e-5)
    # scale enters GC quadratically: GC(2·loss) = 4·GC(loss)
    np.testing.assert_allclose(eager[0], 4 * gc_loss(loss, params, batch, 4), rtol=1e-5)


def test_orthogonal_chunk_gradients_give_zero_and_aligned_give_norm():
    loss = lambda w, b: jnp.mean(b["x"] @ w)  # noqa: E731
    w = jnp.zeros(2)
    orthogonal = {"x": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    aligned = {"x": jnp.array([[1.0, 1.0], [1.0, 1.0]])}
    assert float(gc_loss(loss, w, orthogonal, 2)) == 0.0
    assert float(gc_loss(loss, w, aligned, 2)) == pytest.approx(2.0)
    assert float(gc_loss(loss, w, aligned, 2, normalized=True)) == pytest.approx(1.0, abs=1e-6)
    opposed = {"x": jnp.array([[1.0, 1.0], [-1.0, -1.0]])}
    assert float(gc_loss(loss, w, opposed, 2, normalized=True)) == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize(("k", "n", "message"), [(1, 4, "at least 2"), (3, 4, "not divisible")])
def test_bad_chunking_is_rejected(k, n, message):
    loss = lambda w, b: jnp.mean(b["x"] @ w)  # noqa: E731
    with pytest.raises(ValueError, match=message):
        gc_loss(loss, jnp.zeros(2), {"x": jnp.ones((n, 2))}, k)


@pytest.mark.parametrize("axis_name", [("a", "a"), ("a", None), ("a", "b", "c")])
def test_bad_axis_name_is_rejected(axis_name):
    loss = lambda w, b: jnp.mean(b["x"] @ w)  # noqa: E731
    with pytest.raises(ValueError, match="axis_name"):
        gc_loss(loss, jnp.zeros(2), {"x": jnp.ones((4, 2))}, 2, axis_name=axis_name)
