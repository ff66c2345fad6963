"""GA: gradient ascent, ``-CE`` on ``D_f``, for ``unlearn.ga_epochs`` epochs (reference 5) at
``unlearn.ga_learning_rate`` (reference 1e-4) with ``unlearn.optim``'s optimiser and batch size, every
forget example once an epoch. ``-CE`` is unbounded below: the divergence guard halts a runaway loss."""

from dtl_jax import losses
from dtl_jax.train import steps
from dtl_jax.unlearn.methods._common import epochs_of, forward
from dtl_jax.unlearn.registry import Context, constant, cycle, register


@register("ga")
def gradient_ascent(ctx: Context) -> dict:
    network = ctx.network

    def loss_fn(params, batch_stats, key, aux, batch):
        logits, _, stats = forward(network, params, batch_stats, batch["image"])
        return losses.gradient_ascent(logits, batch["label"]), (stats, {})

    stream, per_epoch = epochs_of(ctx, ctx.scenario.forget, seed=3)
    total = per_epoch * ctx.u.ga_epochs
    tx = ctx.optimizer(total, learning_rate=ctx.u.ga_learning_rate)
    step = steps.custom_step(loss_fn, tx)
    return ctx.train(step, ctx.original, tx, cycle(constant(0.0), stream), total, "ga")
