"""L1-sparse: FT plus ``α_t ||θ||_1``, ``α_t`` decaying linearly from ``unlearn.l1_alpha`` to 0."""

import jax
import jax.numpy as jnp

from dtl_jax import losses
from dtl_jax.train import steps
from dtl_jax.unlearn.methods._common import forward
from dtl_jax.unlearn.registry import Context, cycle, register


@register("l1_sparse")
def l1_sparse(ctx: Context) -> dict:
    network = ctx.network

    def loss_fn(params, batch_stats, key, alpha, batch):
        logits, _, stats = forward(network, params, batch_stats, batch["image"])
        l1 = sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params))
        return losses.cross_entropy(logits, batch["label"]) + alpha * l1, (stats, {"l1": l1})

    retain = ctx.scenario.retain
    total = ctx.steps_per_epoch(retain) * ctx.u.optim.epochs
    alphas = (jnp.float32(ctx.u.l1_alpha * (1.0 - t / total)) for t in range(total))
    tx = ctx.optimizer(total)
    step = steps.custom_step(loss_fn, tx)
    return ctx.train(step, ctx.original, tx, cycle(alphas, ctx.batches(retain, seed=5)), total, "l1_sparse")
