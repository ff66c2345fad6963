"""SURE (docs/methods.md §2.1): domain-adversarial unlearning in representation space.

``G_f`` is the backbone, ``G_y`` the ``"classes"`` head, ``G_d`` an MLP domain classifier on the pooled
features (``unlearn.sure_domain_depth`` hidden layers of ``unlearn.sure_domain_width`` units, ReLU,
BatchNorm after each hidden layer if ``unlearn.sure_domain_batch_norm``). One step minimises

    CE(G_y(G_f(x_r)), y_r)  +  w · BCE_bal(G_d(R_α(G_f(x))), 1[x ∈ D_f]),   x from D_f ∪ D_v

with ``R_α`` the gradient reversal layer (``dtl_jax.grl``): ``G_d`` learns to tell forget from validation
representations while ``G_f`` is pushed to make them indistinguishable. ``BCE_bal`` is the *balanced*
binary cross-entropy, ``½ (mean over the forget examples + mean over the validation examples)``, so that
its optimum and the classifier's chance level (accuracy ½ on each side) do not depend on the batch's
forget:validation ratio. The domain batch holds ``n_f = round(sure_forget_share · sure_domain_batch)``
forget and ``sure_domain_batch − n_f`` validation examples; it goes through the backbone in the same
forward pass as the retain batch (BatchNorm in the backbone, if any, sees both), so a SURE step costs
little more than an FT step.

``α`` follows the DANN warm-up ``α_max (2 / (1 + exp(−10 p)) − 1)`` with ``p = t / (T − 1)`` the progress
(``sure_schedule=dann``) or stays at ``α_max = sure_alpha`` (``constant``). With SGD, ``w`` sets how fast
``G_d`` learns and ``α · w`` how hard the features are pushed. SURE trains with its own optimiser
``unlearn.sure_optim`` (learning rate, retain batch, epochs: ``T = ⌊|D_r| / batch⌋ · epochs`` steps, the
last partial batch of each epoch dropped), not the baselines' shared ``unlearn.optim``.

Logged every step (``logs/metrics.jsonl``, stage ``sure``, and the report's SURE panel): ``ce`` (retain
cross-entropy), ``domain_bce`` (``BCE_bal``), ``alpha``, ``domain_acc_forget`` / ``domain_acc_val`` (the
fraction of the batch's forget / validation examples that ``G_d`` assigns to their true domain, logit
threshold 0) and ``loss = ce + w · domain_bce``. An accuracy pinned at ½ from the first step means ``G_d``
never separates the domains (nothing to erase, or it is too weak); at 1 throughout, the features are not
made indistinguishable (the push is too weak for the classifier).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtl_jax import losses
from dtl_jax.grl import dann_alpha, gradient_reversal
from dtl_jax.train import steps
from dtl_jax.unlearn.methods._common import forward
from dtl_jax.unlearn.registry import Context, cycle, register


class DomainClassifier(nn.Module):
    """``depth`` hidden layers (Dense, [BatchNorm in train mode], ReLU) and one output logit per example
    (positive = forget). ``depth=0`` is a linear classifier. With ``batch_norm`` the batch statistics are
    always the current batch's (the classifier is discarded after unlearning; running averages are unused)."""

    width: int = 64
    depth: int = 1
    batch_norm: bool = False

    @nn.compact
    def __call__(self, features):
        x = features
        for _ in range(self.depth):
            x = nn.Dense(self.width)(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=False, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(1)(x)[..., 0]


def domain_classifier(u) -> DomainClassifier:
    return DomainClassifier(u.sure_domain_width, u.sure_domain_depth, u.sure_domain_batch_norm)


def domain_split(u) -> tuple[int, int]:
    """``(forget, validation)`` examples in each domain batch."""
    n_forget = int(round(u.sure_forget_share * u.sure_domain_batch))
    return n_forget, u.sure_domain_batch - n_forget


def _domain_batches(ctx: Context, n_forget: int, n_val: int):
    forget = ctx.batches(ctx.scenario.forget, n_forget, seed=10)
    val = ctx.batches(ctx.scenario.val, n_val, seed=11)
    while True:
        f, v = next(forget), next(val)
        domain = np.concatenate([np.ones(len(f["image"]), np.float32), np.zeros(len(v["image"]), np.float32)])
        yield {"image": np.concatenate([f["image"], v["image"]]), "domain": domain}


def init_domain(domain_net: DomainClassifier, feature_dim: int, key: jax.Array) -> dict:
    """``{"params": ..., "batch_stats": ...}`` of a fresh domain classifier (``batch_stats`` empty without
    BatchNorm)."""
    variables = domain_net.init(key, jnp.zeros((2, feature_dim)))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def balanced_domain_terms(domain_logits: jax.Array, is_forget: jax.Array) -> dict:
    """``BCE_bal`` and the per-domain accuracies of ``G_d`` on one batch (``is_forget`` is 1/0 per example)."""
    per_example = optax.sigmoid_binary_cross_entropy(domain_logits, is_forget)
    forget, val = is_forget > 0.5, is_forget <= 0.5
    n_f, n_v = jnp.maximum(jnp.sum(forget), 1), jnp.maximum(jnp.sum(val), 1)
    correct = (domain_logits > 0) == forget
    return {
        "domain_bce": 0.5 * (jnp.sum(per_example * forget) / n_f + jnp.sum(per_example * val) / n_v),
        "domain_acc_forget": jnp.sum(correct & forget) / n_f,
        "domain_acc_val": jnp.sum(correct & val) / n_v,
    }


def make_loss(network, domain_net: DomainClassifier, domain_weight: float, domain_stats: dict | None = None):
    """SURE's ``loss_fn`` for ``steps.custom_step``: ``aux`` is α, the batches are retain and domain.
    ``domain_stats``: the domain classifier's (unused) BatchNorm statistics, when it has BatchNorm."""

    def loss_fn(params, batch_stats, key, alpha, retain, domain):
        # one forward pass over retain and domain images together (BatchNorm sees both)
        n = retain["label"].shape[0]
        images = jnp.concatenate([retain["image"], domain["image"]])
        all_logits, all_features, stats = forward(network, params, batch_stats, images)
        logits, features = all_logits[:n], all_features[n:]
        ce = losses.cross_entropy(logits, retain["label"])
        reversed_features = gradient_reversal(features, alpha)
        if domain_stats:
            variables = {"params": params["domain"], "batch_stats": domain_stats}
            domain_logits, _ = domain_net.apply(variables, reversed_features, mutable=["batch_stats"])
        else:
            domain_logits = domain_net.apply({"params": params["domain"]}, reversed_features)
        terms = balanced_domain_terms(domain_logits, domain["domain"])
        return ce + domain_weight * terms["domain_bce"], (stats, {"ce": ce, "alpha": alpha, **terms})

    return loss_fn


def alpha_schedule(u, total: int):
    """α for each of the ``total`` steps."""
    if u.sure_schedule == "dann":
        return (dann_alpha(t / max(total - 1, 1), u.sure_alpha) for t in range(total))
    return (jnp.float32(u.sure_alpha) for _ in range(total))


@register("sure")
def sure(ctx: Context) -> dict:
    network, u = ctx.network, ctx.u
    optim = u.sure_optim
    domain_net = domain_classifier(u)
    feature_dim = ctx.original["params"]["heads"]["classes"]["kernel"].shape[0]
    domain = init_domain(domain_net, feature_dim, ctx.key("sure-domain-init"))
    variables = {
        "params": {**ctx.original["params"], "domain": domain["params"]},
        "batch_stats": ctx.original["batch_stats"],
    }
    loss_fn = make_loss(network, domain_net, u.sure_domain_weight, domain["batch_stats"])

    retain = ctx.scenario.retain
    total = ctx.steps_per_epoch(retain, optim.batch_size) * optim.epochs
    tx = ctx.optimizer(total, optim=optim)
    step = steps.custom_step(loss_fn, tx)
    inputs = cycle(
        (step.replicate(alpha) for alpha in alpha_schedule(u, total)),  # a value a step, placed with it
        ctx.batches(retain, optim.batch_size, seed=13),
        _domain_batches(ctx, *domain_split(u)),
    )
    out = ctx.train(step, variables, tx, inputs, total, "sure")
    params = {k: v for k, v in out["params"].items() if k != "domain"}
    return {"params": params, "batch_stats": out["batch_stats"]}
