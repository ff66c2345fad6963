"""SURE (METHODS.md §2.1): domain-adversarial unlearning in representation space.

``G_f`` is the backbone, ``G_y`` the ``"classes"`` head, ``G_d`` a one-hidden-layer MLP domain classifier
on the pooled features. One step minimises

    CE(G_y(G_f(x_r)), y_r)  +  w · BCE(G_d(R_α(G_f(x))), 1[x ∈ D_f]),   x from D_f ∪ D_v, balanced

with ``R_α`` the gradient reversal layer (``dtl_jax.grl``): ``G_d`` learns to tell forget from validation
representations while ``G_f`` is pushed to make them indistinguishable. ``α`` follows the DANN warm-up
(``unlearn.sure_schedule=dann``) or stays at ``unlearn.sure_alpha`` (``constant``). The domain batch
(``unlearn.sure_domain_batch``, default 16) is half forget, half validation examples; it goes through the
backbone in the same forward pass as the retain batch, so a SURE step costs little more than an FT step.
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
    width: int = 64

    @nn.compact
    def __call__(self, features):
        return nn.Dense(1)(nn.relu(nn.Dense(self.width)(features)))[..., 0]


def _domain_batches(ctx: Context, half: int):
    forget = ctx.batches(ctx.scenario.forget, half, seed=10)
    val = ctx.batches(ctx.scenario.val, half, seed=11)
    domain = np.concatenate([np.ones(half, np.float32), np.zeros(half, np.float32)])
    while True:
        f, v = next(forget), next(val)
        yield {"image": np.concatenate([f["image"], v["image"]]), "domain": domain}


def make_loss(network, domain_net: DomainClassifier, domain_weight: float):
    """SURE's ``loss_fn`` for ``steps.custom_step``: ``aux`` is α, the batches are retain and domain."""

    def loss_fn(params, batch_stats, key, alpha, retain, domain):
        # one forward pass over retain and domain images together (BatchNorm sees both)
        n = retain["label"].shape[0]
        images = jnp.concatenate([retain["image"], domain["image"]])
        all_logits, all_features, stats = forward(network, params, batch_stats, images)
        logits, features = all_logits[:n], all_features[n:]
        classification = losses.cross_entropy(logits, retain["label"])
        domain_logits = domain_net.apply({"params": params["domain"]}, gradient_reversal(features, alpha))
        bce = jnp.mean(optax.sigmoid_binary_cross_entropy(domain_logits, domain["domain"]))
        domain_acc = jnp.mean((domain_logits > 0) == (domain["domain"] > 0.5))
        return classification + domain_weight * bce, (stats, {"bce": bce, "domain_acc": domain_acc})

    return loss_fn


@register("sure")
def sure(ctx: Context) -> dict:
    network, u = ctx.network, ctx.u
    domain_net = DomainClassifier(u.sure_domain_width)
    feature_dim = ctx.original["params"]["heads"]["classes"]["kernel"].shape[0]
    domain_params = domain_net.init(jax.random.PRNGKey(ctx.seed + 12), jnp.zeros((1, feature_dim)))["params"]
    variables = {
        "params": {**ctx.original["params"], "domain": domain_params},
        "batch_stats": ctx.original["batch_stats"],
    }

    loss_fn = make_loss(network, domain_net, u.sure_domain_weight)

    retain = ctx.scenario.retain
    total = ctx.steps_per_epoch(retain) * u.optim.epochs
    if u.sure_schedule == "dann":
        alphas = (dann_alpha(t / max(total - 1, 1), u.sure_alpha) for t in range(total))
    else:
        alphas = (jnp.float32(u.sure_alpha) for _ in range(total))
    tx = ctx.optimizer(total)
    step = steps.custom_step(loss_fn, tx)
    inputs = cycle(alphas, ctx.batches(retain, seed=13), _domain_batches(ctx, u.sure_domain_batch // 2))
    out = ctx.train(step, variables, tx, inputs, total, "sure")
    params = {k: v for k, v in out["params"].items() if k != "domain"}
    return {"params": params, "batch_stats": out["batch_stats"]}
