"""SalUn: RL restricted to the salient weights (reference: OPTML-Group/Unlearn-Saliency
``generate_mask.py`` and ``unlearn/RL.py``).

Saliency: ``s = |Σ_b ∇_θ mean_{i∈b} (-CE_i)|`` at the original model with BatchNorm in eval mode, the sum
over the batches ``b`` of ``D_f`` in order at ``unlearn.optim.batch_size`` (the reference's forget loader;
the absolute value is taken after summing). Mask: exactly the top ``k = int(unlearn.salun_sparsity · n)``
of the ``n`` weights, ranked over all parameters at once by a stable argsort of ``-s`` (ties go to the
earlier weight in ``jax.tree.leaves`` order, so ties never select more than ``k``).

Update: RL's data stream and loss at ``unlearn.salun_learning_rate`` (0 = ``unlearn.optim``'s); gradients
outside the mask are zeroed and, after every update, weights outside the mask are reset to their original
values, so that momentum and weight decay cannot move them either (they stay bitwise equal)."""

import jax
import jax.numpy as jnp
import numpy as np

from dtl_jax import losses
from dtl_jax.data import pipeline
from dtl_jax.train import steps
from dtl_jax.unlearn.methods._common import forward
from dtl_jax.unlearn.methods.rl import relabel_then_retain
from dtl_jax.unlearn.registry import Context, constant, cycle, register


def saliency(ctx: Context) -> dict:
    """``|Σ_b ∇_θ mean_b(-CE)|`` over the forget batches (a pytree shaped like ``params``)."""
    network, original = ctx.network, ctx.original
    d = ctx.config.data

    def grad_of_batch(params, batch):
        def neg_ce(p):
            logits, _, _ = forward(network, p, original["batch_stats"], batch["image"], train=False)
            return -losses.cross_entropy(logits, batch["label"], batch["mask"])  # mean over real examples

        return jax.grad(neg_ce)(params)

    # data-parallel over every device (the global batch's mean, as on one device)
    batch_grad = steps.DataParallel(grad_of_batch, replicated=1)
    params = batch_grad.replicate(original["params"])  # placed once for every batch
    total = None
    for batch in pipeline.eval_batches(ctx.scenario.forget, ctx.u.optim.batch_size, mean=d.mean, std=d.std):
        g = batch_grad(params, batch)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return jax.tree.map(jnp.abs, total)


def top_k_mask(scores: dict, fraction: float) -> dict:
    """Boolean pytree: True on exactly ``k = int(fraction · n)`` (at least 1) of the ``n`` leaves' entries,
    those with the largest score, ties broken by position (a stable argsort over the flattened leaves)."""
    leaves, treedef = jax.tree.flatten(scores)
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
    k = max(1, int(flat.size * fraction))
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    out, start = [], 0
    for x in leaves:
        out.append(jnp.asarray(keep[start : start + x.size].reshape(x.shape)))
        start += x.size
    return jax.tree.unflatten(treedef, out)


def saliency_mask(ctx: Context) -> dict:
    """Boolean pytree over ``params``: True where the weight is among the most salient."""
    return top_k_mask(saliency(ctx), ctx.u.salun_sparsity)


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
    tx = ctx.optimizer(total, ctx.u.salun_learning_rate or None)
    step = steps.custom_step(loss_fn, tx, project=project)
    aux = (mask, ctx.original["params"])
    return ctx.train(step, ctx.original, tx, cycle(constant(aux), stream), total, "salun")
