"""SURE (docs/methods.md §2.1): the domain classifier, the balanced domain loss, the reversed gradient, the
per-step diagnostics, the report panel, and stability over seeds."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dtl_jax import report
from dtl_jax.config import Config, DataConfig, ModelConfig, OptimConfig, TaskConfig, UnlearnConfig
from dtl_jax.data.tasks import make_task
from dtl_jax.grl import dann_alpha
from dtl_jax.models import build
from dtl_jax.unlearn.methods import sure
from dtl_jax.unlearn.registry import HEAD, Context, load_methods
from dtl_jax.unlearn.scenario import make_scenario


def tiny(**changes) -> Config:
    unlearn = UnlearnConfig(
        task=TaskConfig(dataset="digits"),
        original=OptimConfig(learning_rate=0.01, epochs=3, batch_size=32),
        optim=OptimConfig(optimizer="sgd", learning_rate=0.01, epochs=1, batch_size=32),
        sure_optim=OptimConfig(optimizer="sgd", learning_rate=0.01, epochs=1, batch_size=32),
    )
    return Config(
        data=DataConfig(image_size=0, channels=1, flip=False),
        model=ModelConfig(name="mlp", widths=(32,)),
        unlearn=dataclasses.replace(unlearn, **changes),
    )


class Capture:
    def __init__(self):
        self.rows = {}

    def write(self, stage, rows):
        self.rows.setdefault(stage, []).extend(rows)


# --- the domain classifier and its loss ----------------------------------------------------------------


@pytest.mark.parametrize(("depth", "batch_norm"), [(0, False), (1, False), (2, True)])
def test_domain_classifier_layers(depth, batch_norm):
    net = sure.DomainClassifier(width=8, depth=depth, batch_norm=batch_norm)
    variables = sure.init_domain(net, 5, jax.random.PRNGKey(0))
    dense = sorted(k for k in variables["params"] if k.startswith("Dense"))
    assert len(dense) == depth + 1 and variables["params"][dense[-1]]["kernel"].shape == (8 if depth else 5, 1)
    assert len([k for k in variables["params"] if k.startswith("BatchNorm")]) == (depth if batch_norm else 0)
    assert bool(variables["batch_stats"]) == batch_norm


def test_domain_batch_norm_uses_the_current_batch():
    """With BatchNorm the logits of a batch do not depend on the (unused) running statistics: shifting every
    feature by a constant changes nothing after a normalised first layer."""
    net = sure.DomainClassifier(width=4, depth=1, batch_norm=True)
    v = sure.init_domain(net, 3, jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    out = net.apply(v, x, mutable=["batch_stats"])[0]
    shifted = net.apply(v, x + 5.0, mutable=["batch_stats"])[0]
    chex.assert_trees_all_close(out, shifted, atol=1e-4)


def test_balanced_bce_and_per_domain_accuracy():
    logits = jnp.array([2.0, -1.0, 0.5, 3.0, -2.0])  # 3 forget (1), 2 validation (0)
    is_forget = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
    terms = sure.balanced_domain_terms(logits, is_forget)
    bce = np.asarray(optax.sigmoid_binary_cross_entropy(logits, is_forget))
    np.testing.assert_allclose(terms["domain_bce"], 0.5 * (bce[:3].mean() + bce[3:].mean()), rtol=1e-6)
    np.testing.assert_allclose(terms["domain_acc_forget"], 2 / 3)  # 2.0 and 0.5 are > 0
    np.testing.assert_allclose(terms["domain_acc_val"], 1 / 2)  # -2.0 only
    # the balanced loss does not change when one domain's examples are repeated (the batch ratio)
    repeated = sure.balanced_domain_terms(
        jnp.concatenate([logits[:3], logits[:3], logits[3:]]), jnp.array([1.0] * 6 + [0.0] * 2)
    )
    np.testing.assert_allclose(repeated["domain_bce"], terms["domain_bce"], rtol=1e-6)


@pytest.mark.parametrize(("share", "batch", "expected"), [(0.5, 16, (8, 8)), (0.25, 16, (4, 12)), (0.75, 6, (4, 2))])
def test_domain_split(share, batch, expected):
    u = UnlearnConfig(sure_forget_share=share, sure_domain_batch=batch)
    assert sure.domain_split(u) == expected


def _loss_setup(alpha_max=1.0):
    config = tiny()
    network = build(config.model)
    variables = network.init(jax.random.PRNGKey(0), (8, 8, 1), {HEAD: 10})
    net = sure.DomainClassifier(16)
    domain = sure.init_domain(net, 32, jax.random.PRNGKey(3))
    params = {**variables["params"], "domain": domain["params"]}
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    retain = {"image": jax.random.normal(keys[0], (6, 8, 8, 1)), "label": jnp.arange(6) % 10}
    dom = {"image": jax.random.normal(keys[1], (4, 8, 8, 1)), "domain": jnp.array([1.0, 1.0, 0.0, 0.0])}
    return network, net, params, variables["batch_stats"], retain, dom


def test_reversed_gradient_reaches_the_backbone_negated():
    """∇_backbone of (CE + w·BCE through R_α) = ∇CE − α·w·∇BCE, and the domain classifier gets +w·∇BCE."""
    network, net, params, stats, retain, dom = _loss_setup()
    w = 0.7

    @jax.jit  # α and w are arguments: one compilation for the five gradients
    def jitted(alpha, weight):
        loss_fn = sure.make_loss(network, net, weight)
        return jax.grad(lambda p: loss_fn(p, stats, None, alpha, retain, dom)[0])(params)

    def grads(alpha, weight):
        return jitted(jnp.float32(alpha), jnp.float32(weight))

    ce_only = grads(0.0, 0.0)
    plain = jax.tree.map(lambda a, b: (a - b) / w, grads(-1.0, w), ce_only)  # α = −1: ∇BCE, not reversed
    for alpha in (0.0, 0.5, 2.0):
        g = grads(alpha, w)
        expected = jax.tree.map(lambda c, p, a=alpha: c - a * w * p, ce_only["backbone"], plain["backbone"])
        chex.assert_trees_all_close(g["backbone"], expected, atol=1e-5)
        chex.assert_trees_all_close(g["domain"], jax.tree.map(lambda p: w * p, plain["domain"]), atol=1e-5)
    assert optax.global_norm(plain["backbone"]) > 0 and optax.global_norm(plain["domain"]) > 0


# --- a run: diagnostics logged every step -------------------------------------------------------------


def _context(config, writer=None):
    u = config.unlearn
    task = make_task("unlearn", u.task, config.data, config.seed)
    scenario = make_scenario(task, u, config.data.val_fraction, config.seed)
    network = build(config.model)
    shape = tuple(scenario.retain.images.shape[1:])
    original = network.init(jax.random.PRNGKey(0), shape, {HEAD: scenario.num_classes})
    return Context(config, network, scenario, original, 1000, quiet=True, writer=writer)


@pytest.mark.parametrize("schedule", ["dann", "constant"])
def test_run_logs_the_adversarial_game_every_step(schedule):
    config = tiny(sure_schedule=schedule, sure_alpha=0.8, sure_domain_weight=0.5, sure_domain_depth=2,
                  sure_domain_batch_norm=True, sure_domain_batch=12, sure_forget_share=0.25)  # fmt: skip
    capture = Capture()
    ctx = _context(config, capture)
    out = load_methods()["sure"](ctx)
    assert "domain" not in out["params"] and set(out["params"]) == set(ctx.original["params"])
    rows = capture.rows["sure"]
    total = ctx.steps_per_epoch(ctx.scenario.retain, 32) * 1
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    alphas = np.array([r["alpha"] for r in rows])
    if schedule == "dann":
        expected = [float(dann_alpha(t / (total - 1), 0.8)) for t in range(total)]
        np.testing.assert_allclose(alphas, expected, rtol=1e-5, atol=1e-7)
    else:
        np.testing.assert_allclose(alphas, 0.8)
    for r in rows:
        assert math.isclose(r["loss"], r["ce"] + 0.5 * r["domain_bce"], rel_tol=1e-5, abs_tol=1e-6)
        # 3 forget and 9 validation examples a step: accuracies are multiples of 1/3 and 1/9
        assert min(abs(r["domain_acc_forget"] * 3 - k) for k in range(4)) < 1e-5
        assert min(abs(r["domain_acc_val"] * 9 - k) for k in range(10)) < 1e-5


def test_report_has_a_sure_panel(tmp_path):
    rows = [{"step": i, "loss": 1.0, "ce": 0.9, "domain_bce": 0.69, "alpha": i / 10, "domain_acc_forget": 0.5,
             "domain_acc_val": 0.75, "grad_norm": 1.0} for i in range(1, 11)]  # fmt: skip
    path = report.sure_panel({"sure": rows}, tmp_path / "sure.png")
    assert path is not None and path.stat().st_size > 1000
    assert report.sure_panel({"ft": [{"step": 1, "loss": 1.0}]}, tmp_path / "none.png") is None


# --- stability over seeds (issue 14) --------------------------------------------------------------------


@pytest.mark.slow
def test_ua_spread_over_seeds_is_bounded_by_retrains(tmp_path):
    """On the embedded default (partial class: half of class 0 forgotten, 250 examples), SURE's UA over
    seeds 0-2 varies at most 1.5x as much as Retrain's on the same seeds, plus one binomial standard error
    of a UA measured on |D_f| examples (sqrt(UA (1 - UA) / |D_f|) at Retrain's mean UA, ~0.025: a spread
    that small is the noise of counting 250 examples). The defaults before the search failed this by far
    (UA 0.97 / 0.66 / 0.68 against Retrain's 0.79-0.84 in issue 14's measurement)."""
    from dtl_jax.unlearn import runner

    ua = {"retrain": [], "sure": []}
    forget_size = None
    for seed in (0, 1, 2):
        config = Config(seed=seed)
        config = dataclasses.replace(config, unlearn=dataclasses.replace(config.unlearn, methods=("retrain", "sure")))
        results = runner.run(config, tmp_path / f"seed-{seed}", quiet=True)
        for name in ua:
            ua[name].append(results["methods"][name]["ua"])
        forget_size = results["scenario"]["sizes"]["forget"]
    retrain_sd, sure_sd = np.std(ua["retrain"], ddof=1), np.std(ua["sure"], ddof=1)
    mean = float(np.mean(ua["retrain"]))
    bound = 1.5 * retrain_sd + math.sqrt(mean * (1 - mean) / forget_size)
    assert sure_sd <= bound, f"SURE UA {ua['sure']} (sd {sure_sd:.3f}) vs Retrain {ua['retrain']}: bound {bound:.3f}"
