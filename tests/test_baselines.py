"""The unlearning baselines as their references wrote them (docs/methods.md §2.2-2.3, issue 11): data flow
(every example once an epoch), SCRUB's one optimiser and two batch sizes, L1-sparse's per-epoch α, SalUn's
exactly-k mask, Boundary shrink's pixel-space FGSM, MIA-efficacy against scikit-learn, the reference preset.

Spies wrap ``pipeline.to_batch`` (which examples a training stream draws) and ``steps.custom_step`` (what
each step receives), so the methods run unchanged."""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.svm import SVC

from dtl_jax import losses
from dtl_jax.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TaskConfig,
    UnlearnConfig,
    load,
    unlearn_default,
)
from dtl_jax.data import pipeline
from dtl_jax.data.sources import ImageSplit
from dtl_jax.data.tasks import make_task
from dtl_jax.models import build
from dtl_jax.train import steps
from dtl_jax.train.mesh import default_devices
from dtl_jax.unlearn import metrics
from dtl_jax.unlearn.registry import HEAD, Context, load_methods
from dtl_jax.unlearn.scenario import make_scenario

BATCH = 32  # neither the 58 forget nor the 1,171 retain examples of the fixture are a multiple of it


def small_config(**changes) -> Config:
    unlearn = UnlearnConfig(
        task=TaskConfig(dataset="digits"),
        scenario="partial_class",
        forget_class=2,
        original=OptimConfig(learning_rate=0.01, epochs=3, batch_size=BATCH),
        optim=OptimConfig(
            optimizer="sgd", learning_rate=0.01, momentum=0.9, weight_decay=5e-4, epochs=2, batch_size=BATCH
        ),  # fmt: skip
        ga_epochs=3,
        scrub_epochs=3,
        scrub_max_epochs=2,
        scrub_forget_batch=40,
    )
    return Config(
        data=DataConfig(image_size=0, channels=1, flip=False),
        model=ModelConfig(name="mlp", widths=(32,)),
        unlearn=dataclasses.replace(unlearn, **changes),
    )


@pytest.fixture(scope="module")
def trained():
    """An MLP trained on the digits training pool (D_r ∪ D_f) and the partial-class scenario."""
    config = small_config()
    task = make_task("unlearn", config.unlearn.task, config.data, 0)
    scenario = make_scenario(task, config.unlearn, 0.1, seed=0)
    assert len(scenario.forget) % BATCH and len(scenario.retain) % BATCH
    network = build(config.model)
    variables = network.init(jax.random.PRNGKey(0), scenario.retain.images.shape[1:], {HEAD: 10})
    ctx = Context(config, network, scenario, variables, 0, quiet=True)
    everything = dataclasses.replace(scenario, retain=scenario.train)
    original = load_methods()["retrain"](dataclasses.replace(ctx, scenario=everything))
    return config, network, scenario, original


@pytest.fixture(params=[1, 4], ids=["1-device", "4-devices"])
def devices(request):
    """The preprocessing passes (SalUn's saliency, Boundary shrink's labels) on one device and on four: the
    steps built without a mesh of their own run on that many (``mesh.default_devices``)."""
    with default_devices(request.param):
        yield request.param


def context(trained, seed=1, **changes) -> Context:
    config, network, scenario, original = trained
    config = dataclasses.replace(config, unlearn=dataclasses.replace(config.unlearn, **changes))
    return Context(config, network, scenario, original, seed, quiet=True)


# --- spies ---------------------------------------------------------------------------------------------


@pytest.fixture
def drawn(monkeypatch):
    """``{id(images array): [index arrays]}`` of every batch a *training* stream (``shuffled_batches``) built."""
    seen = {}
    real = pipeline.to_batch

    def spy(split, index, *args, **kwargs):
        if sys._getframe(1).f_code.co_name == "shuffled_batches":
            seen.setdefault(id(split.images), []).append(np.array(index))
        return real(split, index, *args, **kwargs)

    monkeypatch.setattr(pipeline, "to_batch", spy)
    return seen


@pytest.fixture
def step_calls(monkeypatch):
    """Every call of every ``steps.custom_step`` step: which step (creation order), its aux, batch size,
    and the optimiser state it received and returned (host copies)."""
    calls, created = [], []
    real = steps.custom_step

    def spy(loss_fn, tx, *args, **kwargs):
        step, kind = real(loss_fn, tx, *args, **kwargs), len(created)
        created.append(loss_fn)

        def wrapped(state, aux, *batches):
            before = jax.tree.map(np.array, state["opt_state"])
            new, out = step(state, aux, *batches)
            calls.append({"kind": kind, "aux": aux, "batch": int(batches[0]["image"].shape[0]), "before": before,
                          "after": jax.tree.map(np.array, new["opt_state"])})  # fmt: skip
            return new, out

        wrapped.replicate = step.replicate  # the step's placement of per-step arguments (L1's alpha)
        return wrapped

    monkeypatch.setattr(steps, "custom_step", spy)
    return calls


def assert_whole_epochs(indices: list, n: int, epochs: int):
    """The concatenated draws are exactly ``epochs`` permutations of ``range(n)``, one after another."""
    flat = np.concatenate(indices)
    assert len(flat) == epochs * n, (len(flat), epochs, n)
    for e in range(epochs):
        np.testing.assert_array_equal(np.sort(flat[e * n : (e + 1) * n]), np.arange(n))


# --- data flow: every example of D_f (and D_r) once an epoch ------------------------------------------


def test_shuffled_batches_keep_the_last_partial_batch_when_asked():
    split = ImageSplit(np.zeros((10, 2, 2, 1), np.uint8), np.arange(10, dtype=np.int32))
    stream = pipeline.shuffled_batches(split, 4, seed=0, mean=0.0, std=1.0, flip=False, drop_last=False)
    epochs = [[next(stream)["label"] for _ in range(3)] for _ in range(2)]
    for epoch in epochs:
        assert [len(b) for b in epoch] == [4, 4, 2]
        assert sorted(np.concatenate(epoch)) == list(range(10))
    assert pipeline.steps_per_epoch(split, 4, drop_last=False) == 3 and pipeline.steps_per_epoch(split, 4) == 2
    small = next(pipeline.shuffled_batches(split, 16, seed=0, mean=0.0, std=1.0, flip=False, drop_last=False))
    assert sorted(small["label"]) == list(range(10))  # the whole split once, no replacement
    dropped = pipeline.shuffled_batches(split, 4, seed=0, mean=0.0, std=1.0, flip=False)  # other stages: unchanged
    assert [len(next(dropped)["label"]) for _ in range(4)] == [4, 4, 4, 4]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ft", "ga", "rl", "l1_sparse", "salun", "scrub", "boundary_shrink"])
def test_every_example_is_visited_every_epoch(trained, drawn, name):
    _, _, scenario, _ = trained
    ctx = context(trained)
    load_methods()[name](ctx)
    u = ctx.u
    e = u.optim.epochs
    forget_epochs = {"ga": u.ga_epochs, "rl": e, "salun": e, "boundary_shrink": e, "scrub": u.scrub_max_epochs}
    retain_epochs = {"ft": e, "rl": e, "l1_sparse": e, "salun": e, "scrub": u.scrub_epochs}
    forget_epochs, retain_epochs = forget_epochs.get(name, 0), retain_epochs.get(name, 0)
    forget = drawn.pop(id(scenario.forget.images), [])
    retain = drawn.pop(id(scenario.retain.images), [])
    assert not drawn  # no other split is trained on
    if forget_epochs:
        assert_whole_epochs(forget, len(scenario.forget), forget_epochs)
    else:
        assert not forget
    if retain_epochs:
        assert_whole_epochs(retain, len(scenario.retain), retain_epochs)
    else:
        assert not retain


# --- L1-sparse ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_l1_coefficient_is_constant_within_an_epoch_and_alpha_over_E_in_the_last(trained, step_calls):
    _, _, scenario, _ = trained
    epochs, alpha = 3, 1e-3
    ctx = context(trained, l1_alpha=alpha, optim=dataclasses.replace(small_config().unlearn.optim, epochs=epochs))
    load_methods()["l1_sparse"](ctx)
    per_epoch = -(-len(scenario.retain) // BATCH)
    seen = np.array([float(c["aux"]) for c in step_calls])
    assert len(seen) == epochs * per_epoch
    for e in range(epochs):
        np.testing.assert_allclose(seen[e * per_epoch : (e + 1) * per_epoch], alpha * (1 - e / epochs), rtol=1e-6)
    np.testing.assert_allclose(seen[-1], alpha / epochs, rtol=1e-6)


# --- SCRUB ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_scrub_keeps_one_optimiser_state_and_two_batch_sizes(trained, step_calls):
    _, _, scenario, _ = trained
    ctx = context(trained)
    u = ctx.u
    load_methods()["scrub"](ctx)
    n_f, n_r = len(scenario.forget), len(scenario.retain)
    per_forget, per_retain = -(-n_f // u.scrub_forget_batch), -(-n_r // BATCH)
    kinds = [c["kind"] for c in step_calls]
    expected = ([0] * per_forget + [1] * per_retain) * u.scrub_max_epochs
    expected += [1] * per_retain * (u.scrub_epochs - u.scrub_max_epochs)
    assert kinds == expected  # m epochs of max then min phases, then min phases only
    # forget batch 40 in max-steps (58 = 40 + 18), retain batch 32 in min-steps (1171 = 36 x 32 + 19)
    assert [c["batch"] for c in step_calls[:per_forget]] == [40, n_f - 40]
    assert [c["batch"] for c in step_calls[per_forget : per_forget + per_retain]] == [BATCH] * (per_retain - 1) + [
        n_r % BATCH
    ]
    # one optimiser state throughout: each step receives what the previous one returned, across phases
    for prev, call in zip(step_calls, step_calls[1:]):
        jax.tree.map(np.testing.assert_array_equal, call["before"], prev["after"])
    first_min = step_calls[per_forget]
    momentum = [x for x in jax.tree.leaves(first_min["before"]) if x.dtype == np.float32 and x.ndim == 2]
    assert momentum and any(np.abs(m).max() > 0 for m in momentum)  # the max phase's momentum carried over
    assert not any(np.abs(x).max() > 0 for x in jax.tree.leaves(step_calls[0]["before"]))  # fresh at the start


@pytest.mark.slow
def test_scrub_divergence_halts_every_later_phase(trained):
    ctx = context(trained, scrub_learning_rate=1e4, scrub_epochs=3, scrub_max_epochs=2)
    out = load_methods()["scrub"](ctx)
    first = next(i for i, h in enumerate(ctx.history) if h["halted_at"] is not None)
    assert first < len(ctx.history) - 1 and ctx.history[first]["steps"] > 0
    assert all(h["steps"] == 0 for h in ctx.history[first + 1 :])  # nothing runs after the guard fired
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out["params"]))


# --- SalUn ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_salun_selects_exactly_k_weights_under_ties(trained, devices):
    from dtl_jax.unlearn.methods.salun import saliency_mask

    config, network, scenario, original = trained
    dead = jax.tree.map(jnp.array, original)  # every hidden ReLU dead: only the head's bias has a gradient
    hidden = dead["params"]["backbone"]["Dense_0"]
    hidden["bias"] = jnp.full_like(hidden["bias"], -1e4)
    ctx = Context(config, network, scenario, dead, 1, quiet=True)
    mask = saliency_mask(ctx)
    n = sum(x.size for x in jax.tree.leaves(mask))
    chosen = sum(int(np.sum(x)) for x in jax.tree.leaves(mask))
    assert chosen == int(0.5 * n)  # not every weight, although more than half of the gradients are exactly 0
    head_bias = np.asarray(mask["heads"][HEAD]["bias"])
    assert head_bias.all()  # the non-zero gradients rank first


def reference_mask(ctx: Context, sparsity: float) -> np.ndarray:
    """The reference's mask, flat: Σ over in-order batches of ``unlearn.optim.batch_size`` of the gradient
    of the *mean* ``-CE`` (eval mode), abs after summing, top ``int(sparsity · n)`` by a stable argsort."""
    network, original, forget, d = ctx.network, ctx.original, ctx.scenario.forget, ctx.config.data
    flat0, unravel = jax.flatten_util.ravel_pytree(original["params"])

    def neg_ce(flat, images, labels):
        variables = {"params": unravel(flat), "batch_stats": original["batch_stats"]}
        logits, _, _ = network.apply(variables, pipeline.normalize(images, d.mean, d.std), head=HEAD, train=False)
        return -losses.cross_entropy(logits, labels)

    total = np.zeros(flat0.shape, np.float64)
    size = ctx.u.optim.batch_size
    for start in range(0, len(forget), size):
        total += np.asarray(
            jax.grad(neg_ce)(flat0, forget.images[start : start + size], forget.labels[start : start + size])
        )
    order = np.argsort(-np.abs(total), kind="stable")
    keep = np.zeros(total.size, bool)
    keep[order[: int(sparsity * total.size)]] = True
    return keep


@pytest.mark.slow
def test_salun_mask_is_the_reference_ranking_and_ignores_eval_batch_size(trained, devices):
    from dtl_jax.unlearn.methods.salun import saliency_mask

    config, network, scenario, original = trained
    masks = []
    for eval_batch in (7, 500):
        c = dataclasses.replace(config, eval=dataclasses.replace(config.eval, batch_size=eval_batch))
        c = dataclasses.replace(c, unlearn=dataclasses.replace(c.unlearn, salun_sparsity=0.3))
        ctx = Context(c, network, scenario, original, 1, quiet=True)
        masks.append(np.asarray(jax.flatten_util.ravel_pytree(saliency_mask(ctx))[0]).astype(bool))
    np.testing.assert_array_equal(masks[0], masks[1])
    expected = reference_mask(ctx, 0.3)
    assert np.sum(masks[0]) == int(0.3 * masks[0].size)
    # float32 sums in another order may swap weights whose scores tie to rounding at the k-th place
    assert np.mean(masks[0] != expected) < 1e-3, np.sum(masks[0] != expected)


# --- Boundary shrink ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fgsm_neighbour_steps_exactly_epsilon_in_pixel_space_then_clamps_and_rounds(trained):
    from dtl_jax.unlearn.methods.boundary_shrink import make_neighbours

    config, network, scenario, original = trained
    d = config.data
    images, labels = scenario.forget.images[:16], scenario.forget.labels[:16]
    raw, neighbours = (np.asarray(a) for a in make_neighbours(network, original, 0.1, d.mean, d.std)(images, labels))
    x = images.astype(np.float32) / 255.0
    moved = raw != x
    assert moved.mean() > 0.5  # the gradient is non-zero for most pixels
    np.testing.assert_allclose(np.abs(raw - x)[moved], 0.1, atol=1e-6)  # 0.1 in [0, 1] units, before clamping
    assert neighbours.min() >= 0.0 and neighbours.max() <= 1.0
    np.testing.assert_allclose(neighbours * 255.0, np.round(neighbours * 255.0), atol=1e-4)  # multiples of 1/255
    np.testing.assert_allclose(neighbours, np.round(np.clip(raw, 0, 1) * 255) / 255, atol=1e-6)


@pytest.mark.slow
def test_boundary_neighbour_labels_match_the_reference_procedure(trained, devices):
    from dtl_jax.unlearn.methods.boundary_shrink import neighbour_labels

    config, network, scenario, original = trained
    d = config.data
    ctx = Context(config, network, scenario, original, 1, quiet=True)

    def ce(z, labels):  # the reference's model takes pixels; sign(∇_x) = sign(∇_z) since z = (x - mean)/std
        logits, _, _ = network.apply(original, z, head=HEAD, train=False)
        return losses.cross_entropy(logits, labels)

    # float32 throughout, as in PyTorch: x + 0.1 is 25.5 grey levels, exactly halfway between two, so the
    # rounding (half to even) is decided by float32 arithmetic in the reference too
    f32 = np.float32
    x = scenario.forget.images.astype(f32) / f32(255)
    z = jnp.asarray((x - f32(d.mean)) / f32(d.std))
    sign = np.sign(np.asarray(jax.grad(ce)(z, scenario.forget.labels))).astype(f32)
    neighbour = np.round(np.clip(x + f32(0.1) * sign, f32(0), f32(1)) * f32(255)) / f32(255)
    logits, _, _ = network.apply(original, ((neighbour - d.mean) / d.std).astype(np.float32), head=HEAD, train=False)
    expected = np.argmax(np.asarray(logits), -1)
    np.testing.assert_array_equal(neighbour_labels(ctx), expected)


@pytest.mark.slow
def test_boundary_labels_are_those_of_the_batch_as_trained_on(trained):
    """The step labels each batch as it is trained on, after the random flips (the references recompute the
    neighbour labels per batch inside the loop): on flipped images, the labels are the reference procedure's
    on the flipped pixels."""
    from dtl_jax.data.pipeline import normalize
    from dtl_jax.unlearn.methods.boundary_shrink import batch_neighbour_labels

    config, network, scenario, original = trained
    d = config.data
    images, labels = scenario.forget.images[:, :, ::-1], scenario.forget.labels  # every image flipped
    f32 = np.float32
    x = images.astype(f32) / f32(255)

    def ce(z):
        logits, _, _ = network.apply(original, z, head=HEAD, train=False)
        return losses.cross_entropy(logits, labels)

    sign = np.sign(np.asarray(jax.grad(ce)(jnp.asarray((x - f32(d.mean)) / f32(d.std))))).astype(f32)
    neighbour = np.round(np.clip(x + f32(0.1) * sign, f32(0), f32(1)) * f32(255)) / f32(255)
    logits, _, _ = network.apply(original, ((neighbour - d.mean) / d.std).astype(np.float32), head=HEAD, train=False)
    label = jax.jit(lambda z, y: batch_neighbour_labels(network, original, z, y, 0.1, d.mean, d.std))
    got = np.asarray(label(normalize(images, d.mean, d.std), labels))
    np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), -1))


@pytest.mark.slow
def test_salun_and_boundary_preprocessing_run_on_every_device(trained, monkeypatch, all_devices):
    """The saliency pass and the neighbour labels are ``steps.DataParallel`` over every device (4 here:
    ``tests/conftest.py``; the tests above check their results on 1 and on 4)."""
    from dtl_jax.train import steps
    from dtl_jax.unlearn.methods.boundary_shrink import neighbour_labels
    from dtl_jax.unlearn.methods.salun import saliency

    built = []
    original_init = steps.DataParallel.__init__

    def spy(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(steps.DataParallel, "__init__", spy)
    config, network, scenario, original = trained
    ctx = Context(config, network, scenario, original, 1, quiet=True)
    for preprocess in (saliency, neighbour_labels):
        built.clear()
        preprocess(ctx)
        assert built, f"{preprocess.__name__} ran no steps.DataParallel"
        assert {p.devices for p in built} == {jax.device_count()}


# --- MIA-efficacy ---------------------------------------------------------------------------------------


def svc_mia_reference(retain_conf, test_conf, forget_conf) -> float:
    """OPTML-Group ``SVC_MIA`` as ``main_forget.py`` calls it: shadow_train = the first len(test) retain
    examples, shadow_test = the test set, target_test = the forget set; ``1 - mean(predict)``."""
    shadow_train = retain_conf[: len(test_conf)].reshape(-1, 1)
    x = np.concatenate([shadow_train, test_conf.reshape(-1, 1)])
    y = np.concatenate([np.ones(len(shadow_train)), np.zeros(len(test_conf))])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return float(1 - clf.predict(forget_conf.reshape(-1, 1)).mean())


@pytest.mark.parametrize(("n_retain", "n_test"), [(6000, 5400), (300, 500), (900, 200)])
def test_mia_efficacy_equals_the_reference(n_retain, n_test):
    rng = np.random.default_rng(n_test)
    retain = rng.beta(6, 1, n_retain)  # members: confident
    test = rng.beta(2, 1.5, n_test)
    forget = np.concatenate([rng.beta(6, 1, 200), rng.beta(2, 1.5, 200)])
    ours = metrics.mia_efficacy(retain, test, forget)
    assert abs(ours - svc_mia_reference(retain, test, forget)) <= 1e-9
    assert 0.0 < ours < 1.0  # a non-trivial split of the forget set


# --- the references' settings ---------------------------------------------------------------------------


def test_reference_preset_and_default_optimiser():
    reference = load(str(Path(__file__).resolve().parent.parent / "configs" / "unlearn_reference.py")).unlearn
    assert reference.optim == OptimConfig(optimizer="sgd", learning_rate=0.01, momentum=0.9, weight_decay=5e-4,
                                          schedule="constant", epochs=10, batch_size=256)  # fmt: skip
    assert (reference.ga_learning_rate, reference.ga_epochs) == (1e-4, 5)
    assert (reference.scrub_learning_rate, reference.scrub_epochs, reference.scrub_max_epochs) == (5e-4, 3, 2)
    assert (reference.scrub_forget_batch, reference.kd_temperature, reference.boundary_step) == (512, 4.0, 0.1)
    assert (reference.l1_alpha, reference.salun_sparsity) == (5e-4, 0.5)
    own = ("ft", "rl", "l1", "salun", "boundary")  # every other method at the references' shared rate, 0.01
    assert all(getattr(reference, f"{m}_learning_rate") == 0.0 for m in own)
    for default in (Config().unlearn, unlearn_default().unlearn):  # the CPU-scale defaults: batch 64
        assert dataclasses.replace(default.optim, batch_size=256) == reference.optim
        assert default.scrub_forget_batch == 2 * default.optim.batch_size
        assert (default.ga_epochs, default.scrub_epochs) == (5, 3)


@pytest.mark.slow
def test_unlearning_optimiser_applies_weight_decay(trained):
    ctx = context(trained, optim=dataclasses.replace(Config().unlearn.optim, momentum=0.0))
    tx = ctx.optimizer(10)
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.zeros(3)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.01 * 5e-4 * np.ones(3), rtol=1e-6)  # -lr · wd · θ at zero gradient


def test_mia_members_are_a_seeded_mix_of_a_class_sorted_retain_set():
    labels = np.repeat(np.arange(10), 100)  # stored class by class, like the embedded and folder datasets
    order = metrics.member_order(1000, seed=0)
    assert set(labels[order[:200]]) == set(range(10))  # the first 200 of labels itself: classes 0 and 1 only
    np.testing.assert_array_equal(order, metrics.member_order(1000, seed=0))
    assert not np.array_equal(order, metrics.member_order(1000, seed=1))
    rng = np.random.default_rng(0)
    outputs = {k: (rng.normal(size=(n, 10)), rng.normal(size=(n, 4)), rng.integers(0, 10, n))
               for k, n in (("forget", 50), ("retain", 1000), ("test", 200))}  # fmt: skip
    conf = {k: metrics.confidence(v[0], v[2]) for k, v in outputs.items()}
    expected = metrics.mia_efficacy(conf["retain"][order], conf["test"], conf["forget"])
    assert metrics.unlearning_metrics(outputs, seed=0)["mia_efficacy"] == expected
