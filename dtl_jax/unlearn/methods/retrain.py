"""Retrain (the oracle): train from scratch on ``D_r`` with the original model's budget."""

from dtl_jax.train.optim import make_optimizer
from dtl_jax.unlearn.methods._common import supervised
from dtl_jax.unlearn.registry import HEAD, Context, register


@register("retrain")
def retrain(ctx: Context) -> dict:
    optim = ctx.u.original
    retain = ctx.scenario.retain
    shape = tuple(retain.images.shape[1:])
    variables = ctx.network.init(ctx.key("retrain-init"), shape, {HEAD: ctx.scenario.num_classes})
    total = ctx.steps_per_epoch(retain, optim.batch_size) * optim.epochs
    tx = make_optimizer(optim, total)
    return supervised(ctx, variables, ctx.batches(retain, optim.batch_size, seed=1), total, "retrain", tx)
