"""GA: gradient ascent, ``-CE`` on ``D_f`` (at ``unlearn.ga_learning_rate``)."""

from dtl_jax import losses
from dtl_jax.train import steps
from dtl_jax.unlearn.methods._common import forward
from dtl_jax.unlearn.registry import Context, constant, cycle, register


@register("ga")
def gradient_ascent(ctx: Context) -> dict:
    network = ctx.network

    def loss_fn(params, batch_stats, key, aux, batch):
        logits, _, stats = forward(network, params, batch_stats, batch["image"])
        return losses.gradient_ascent(logits, batch["label"]), (stats, {})

    forget = ctx.scenario.forget
    total = ctx.steps_per_epoch(forget) * ctx.u.optim.epochs
    tx = ctx.optimizer(total, learning_rate=ctx.u.ga_learning_rate)
    step = steps.custom_step(loss_fn, tx)
    return ctx.train(step, ctx.original, tx, cycle(constant(0.0), ctx.batches(forget, seed=3)), total, "ga")
