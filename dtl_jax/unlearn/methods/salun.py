"""SalUn: RL restricted to the salient weights. The mask keeps the top ``unlearn.salun_sparsity`` of
``|∇_θ(-CE on D_f)|`` at the original model, ranked over all weights at once; gradients outside the mask
are zeroed and, after every update, weights outside the mask are reset to their original values, so that
momentum and weight decay cannot move them either (they stay bitwise equal)."""

import jax
import jax.numpy as jnp
import numpy as np

from dtl_jax import losses
from dtl_jax.data import pipeline
from dtl_jax.train import steps
from dtl_jax.unlearn.methods._common import forward
from dtl_jax.unlearn.methods.rl import relabel_then_retain
from dtl_jax.unlearn.registry import Context, constant, cycle, register


def saliency_mask(ctx: Context) -> dict:
    """Boolean pytree over ``params``: True where the weight is among the most salient."""
    network, original = ctx.network, ctx.original
    d = ctx.config.data

    @jax.jit
    def abs_grad(params, batch):
        def neg_ce(p):
            logits, _, _ = forward(network, p, original["batch_stats"], batch["image"], train=False)
            return -losses.cross_entropy(logits, batch["label"], batch["mask"]) * jnp.sum(batch["mask"])

        return jax.tree.map(jnp.abs, jax.grad(neg_ce)(params))

    total = None
    for batch in pipeline.eval_batches(ctx.scenario.forget, ctx.config.eval.batch_size, mean=d.mean, std=d.std):
        g = abs_grad(original["params"], batch)  # summed |grad| of the batch sums
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(total)])
    k = max(1, int(round(ctx.u.salun_sparsity * flat.size)))
    threshold = np.partition(flat, flat.size - k)[flat.size - k]
    return jax.tree.map(lambda x: jnp.asarray(x) >= threshold, total)


@register("salun")
def salun(ctx: Context) -> dict:
    network = ctx.network
    mask = saliency_mask(ctx)

    def loss_fn(params, batch_stats, key, aux, batch):
        mask, _ = aux
        # stop the gradient outside the mask: masked weights get a zero gradient
        params = jax.tree.map(lambda p, m: jnp.where(m, p, jax.lax.stop_gradient(p)), params, mask)
        logits, _, stats = forward(network, params, batch_stats, batch["image"])
        return losses.cross_entropy(logits, batch["label"]), (stats, {})

    def project(params, aux):
        mask, original = aux
        return jax.tree.map(lambda p, m, o: jnp.where(m, p, o), params, mask, original)

    stream, total = relabel_then_retain(ctx, seed=6)
    tx = ctx.optimizer(total)
    step = steps.custom_step(loss_fn, tx, project=project)
    aux = (mask, ctx.original["params"])
    return ctx.train(step, ctx.original, tx, cycle(constant(aux), stream), total, "salun")
