"""L1-sparse: FT plus ``α_e ||θ||_1`` over all parameters, with ``α_e = α(1 - e/E)`` in epoch
``e = 0..E-1`` (``α = unlearn.l1_alpha``, ``E = unlearn.optim.epochs``): constant within an epoch, ``α`` in
the first and ``α/E`` in the last (reference: OPTML-Group/Unlearn-Sparse ``unlearn/FT.py``); ``unlearn.optim`` at
``unlearn.l1_learning_rate`` (0 = ``unlearn.optim``'s)."""

import jax
import jax.numpy as jnp

from dtl_jax import losses
from dtl_jax.train import steps
from dtl_jax.unlearn.methods._common import epochs_of, forward
from dtl_jax.unlearn.registry import Context, cycle, register


def epoch_alphas(alpha: float, epochs: int, per_epoch: int):
    """The L1 coefficient of every step: ``alpha * (1 - e / epochs)`` for the ``per_epoch`` steps of epoch ``e``."""
    for e in range(epochs):
        value = jnp.float32(alpha * (1.0 - e / epochs))
        for _ in range(per_epoch):
            yield value


@register("l1_sparse")
def l1_sparse(ctx: Context) -> dict:
    network = ctx.network

    def loss_fn(params, batch_stats, key, alpha, batch):
        logits, _, stats = forward(network, params, batch_stats, batch["image"])
        l1 = sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params))
        return losses.cross_entropy(logits, batch["label"]) + alpha * l1, (stats, {"l1": l1, "alpha": alpha})

    stream, per_epoch = epochs_of(ctx, ctx.scenario.retain, seed=5)
    epochs = ctx.u.optim.epochs
    total = per_epoch * epochs
    tx = ctx.optimizer(total, ctx.u.l1_learning_rate or None)
    step = steps.custom_step(loss_fn, tx)
    alphas = (step.replicate(a) for a in epoch_alphas(ctx.u.l1_alpha, epochs, per_epoch))  # placed per step
    return ctx.train(step, ctx.original, tx, cycle(alphas, stream), total, "l1_sparse")
